"""polaris-opt: an optimizing compiler and command line for ONNX models."""

__version__ = "0.1.0"
