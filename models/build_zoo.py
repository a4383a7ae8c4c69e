"""Build the polaris-opt model zoo: small ONNX models shaped like real exporters' output.

    python models/build_zoo.py [--out models] [--seed 0]   # the committed zoo and zoo.json
    python models/build_zoo.py --large PATH                # ~134 MB model, never committed
    python models/build_zoo.py --calib-sets [--out models]  # only the .calib.npz / .eval.npz sets

Every model has opset 17, IR version 8, a dynamic "batch" dimension, PyTorch-export naming and
passes `onnx.checker.check_model(full_check=True)`. Each draws from its own random stream,
keyed by (seed, model name), so any one model can be rebuilt alone and comes out
byte-identical; the tests rely on that. Rebuilding the digits models needs scikit-learn
(the `zoo` extra).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or via importlib
from zoo import digits, large, transformer, vision  # noqa: E402
from zoo.graph import IR_VERSION, OPSET, count_parameters, save_npz  # noqa: E402

Builder = Callable[[np.random.Generator], tuple[onnx.ModelProto, dict[str, np.ndarray]]]

BUILDERS: dict[str, Builder] = {
    "digits_mlp": digits.build_mlp,
    "digits_cnn": digits.build_cnn,
    "mobilenetv2_s": vision.build_mobilenetv2,
    "resnet_s": vision.build_resnet,
    "transformer_s": transformer.build_transformer,
}
DIGITS_TEST = "digits_test.npz"
ACCURACY_INPUTS = {"digits_mlp": "x_mlp", "digits_cnn": "x_cnn"}  # model -> array in DIGITS_TEST
# Samples in each <model>.calib.npz: the digits sets come from the training split, the others
# are N(0, 1) noise like the sample inputs.
CALIB_SAMPLES = {
    "digits_mlp": 256,
    "digits_cnn": 256,
    "mobilenetv2_s": 64,
    "resnet_s": 64,
    "transformer_s": 64,
}
# Keys the calibration noise apart from the model's own stream (weights, then sample input).
CALIB_STREAM = 1
DEFAULT_OUT = Path(__file__).resolve().parent

log = logging.getLogger("build_zoo")


def model_rng(name: str, seed: int) -> np.random.Generator:
    """One stream per model: rebuilding one model alone reproduces it exactly."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def sample_input_path(model_path: Path) -> Path:
    """models/resnet_s.onnx -> models/resnet_s.input.npz"""
    return model_path.with_name(f"{model_path.stem}.input.npz")


def calibration_set_path(model_path: Path) -> Path:
    """models/resnet_s.onnx -> models/resnet_s.calib.npz"""
    return model_path.with_name(f"{model_path.stem}.calib.npz")


def calibration_arrays(name: str, model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """A calibration set for a zoo model, in its input layout (each zoo model has one input).

    The digits models get the first rows of the training split (already shuffled, stratified);
    the random-init models get standard-normal noise drawn like their sample input, from a
    stream of its own so it never repeats the sample input.
    """
    (value,) = model.graph.input
    dims = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
    count = CALIB_SAMPLES[name]
    if name in ACCURACY_INPUTS:
        rows = digits.load_split().x_train[:count]
        return {value.name: rows.reshape(count, *dims).astype(np.float32)}
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), CALIB_STREAM])
    return {value.name: rng.standard_normal((count, *dims)).astype(np.float32)}


def write_calibration_sets(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write <model>.calib.npz beside each zoo model in out_dir; the models are read, not rebuilt."""
    written = []
    for name in BUILDERS:
        model_path = Path(out_dir) / f"{name}.onnx"
        path = calibration_set_path(model_path)
        save_npz(path, calibration_arrays(name, onnx.load(model_path), seed))
        log.info("%-14s %9d bytes  %s", name, path.stat().st_size, path.name)
        written.append(path)
    return written


def write_eval_sets(out_dir: Path) -> list[Path]:
    """Write <model>.eval.npz for the digits models: the held-out split as the model's input plus
    `labels`, the form `polaris-opt quantize --eval` reads."""
    written = []
    with np.load(Path(out_dir) / DIGITS_TEST, allow_pickle=False) as test:
        for name, key in ACCURACY_INPUTS.items():
            path = Path(out_dir) / f"{name}.eval.npz"
            save_npz(path, {"input": test[key], "labels": test["y"]})
            written.append(path)
    return written


def write_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Build one zoo model; write it and its sample input into out_dir."""
    model, feeds = BUILDERS[name](model_rng(name, seed))
    path = Path(out_dir) / f"{name}.onnx"
    onnx.save(model, path)
    save_npz(sample_input_path(path), feeds)
    return path


def describe_values(values) -> list[dict]:
    def dim(d):
        return d.dim_param if d.HasField("dim_param") else d.dim_value

    return [
        {
            "name": v.name,
            "shape": [dim(d) for d in v.type.tensor_type.shape.dim],
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
        }
        for v in values
    ]


def measure_accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> dict:
    """Top-1 accuracy of the saved file as ONNX Runtime runs it, not the training-time one."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    correct = int((logits.argmax(axis=1) == y).sum())
    return {"data": DIGITS_TEST, "fp32": correct / len(y), "correct": correct, "total": len(y)}


def zoo_entry(path: Path, test_data: dict[str, np.ndarray]) -> dict:
    model = onnx.load(path)
    entry = {
        "file": path.name,
        "sample_input": sample_input_path(path).name,
        "description": model.doc_string,
        "inputs": describe_values(model.graph.input),
        "outputs": describe_values(model.graph.output),
        "size_bytes": path.stat().st_size,
        "parameters": count_parameters(model),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
    }
    name = path.stem
    if name in ACCURACY_INPUTS:
        entry["accuracy"] = measure_accuracy(path, test_data[ACCURACY_INPUTS[name]], test_data["y"])
    return entry


def build_zoo(out_dir: Path, seed: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    test_data = digits.test_arrays()
    save_npz(out_dir / DIGITS_TEST, test_data)
    entries = {}
    for name in BUILDERS:
        start = time.perf_counter()
        path = write_model(name, out_dir, seed)
        entries[name] = zoo_entry(path, test_data)
        log.info("%-14s %9d bytes  %.1f s", name, entries[name]["size_bytes"], time.perf_counter() - start)
    index = {
        "seed": seed,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "test_data": DIGITS_TEST,
        "models": entries,
    }
    (out_dir / "zoo.json").write_text(json.dumps(index, indent=2) + "\n")
    write_calibration_sets(out_dir, seed)
    write_eval_sets(out_dir)
    return index


def build_large_model(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model, feeds = large.build_large(model_rng("large", seed))
    onnx.save(model, path)
    save_npz(sample_input_path(path), feeds)
    log.info("%s: %d bytes, %d parameters", path, path.stat().st_size, count_parameters(model))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="zoo folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--large",
        type=Path,
        metavar="PATH",
        help="build only the large model at PATH (sample input beside it)",
    )
    parser.add_argument(
        "--calib-sets",
        action="store_true",
        help="write only the calibration and evaluation sets (<model>.calib.npz, <model>.eval.npz)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.calib_sets:
        write_calibration_sets(args.out, args.seed)
        write_eval_sets(args.out)
    elif args.large:
        build_large_model(args.large, args.seed)
    else:
        build_zoo(args.out, args.seed)


if __name__ == "__main__":
    main()
