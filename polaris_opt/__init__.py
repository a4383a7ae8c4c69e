"""polaris-opt: an optimizing compiler and command line for ONNX models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The Python API is imported on first use, so `import polaris_opt` (and the CLI's --help)
    # stays free of onnxruntime.
    if name == "quantize":
        from polaris_opt.quantization import quantize

        return quantize
    if name == "prune":
        from polaris_opt.pruning.api import prune

        return prune
    raise AttributeError(f"module 'polaris_opt' has no attribute '{name}'")
