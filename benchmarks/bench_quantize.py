"""Quantization numbers (issue 3), each side by side with onnxruntime.quantization on the same
model, calibration data, method and thread count:

- fidelity: output SQNR against FP32 on held-out data (top-1 on the digits test set), per
  calibration method, ours and ORT's (quantize_static, QDQ, per-channel, U8S8);
- calibrate+quantize wall time and peak RSS, each in a fresh process, interleaved; peak RSS
  with 10x the calibration samples;
- coverage: a Paddle-style model whose weights are Constant nodes;
- latency of the quantized models on ONNX Runtime CPU (1 thread), interleaved;
- sizes, dynamic INT8, FP16, and INT4 against matmul_nbits_quantizer (RTN, same block size).

    .venv/bin/python benchmarks/bench_quantize.py [--runs 3] [--only fidelity,speed,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import OUT, ROOT, interleave, machine, median, spread, write_json

sys.path.insert(0, str(ROOT))
MODELS = ROOT / "models"
ZOO = ["digits_mlp", "digits_cnn", "resnet_s", "mobilenetv2_s", "transformer_s"]
OURS = ["minmax", "percentile", "entropy", "mse"]
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
EVAL_SAMPLES = 64
SECTIONS = ["fidelity", "speed", "memory", "coverage", "latency", "size", "int4"]


# ------------------------------------------------------------------------------------- data


def calib_path(name: str) -> Path:
    return MODELS / f"{name}.calib.npz"


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def eval_data(name: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Held-out inputs: the digits test split (with labels), else fresh standard-normal samples —
    the distribution the random-weight models were built for — from a seed no calibration set uses."""
    if name.startswith("digits"):
        test = load_npz(MODELS / "digits_test.npz")
        return {"input": test["x_mlp" if name == "digits_mlp" else "x_cnn"]}, test["y"]
    model = onnx.load(MODELS / f"{name}.onnx")
    rng = np.random.default_rng(20261121)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or EVAL_SAMPLES for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds, None


def batches(feeds: dict[str, np.ndarray], size: int = 16):
    rows = len(next(iter(feeds.values())))
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, rows, size)]


class NpzReader:
    """An ONNX Runtime CalibrationDataReader over an .npz, in batches of 16 (as ours uses)."""

    def __init__(self, path: Path, batch_size: int = 16):
        self.items = batches(load_npz(path), batch_size)
        self.position = 0

    def get_next(self):
        if self.position >= len(self.items):
            return None
        self.position += 1
        return self.items[self.position - 1]

    def rewind(self):
        self.position = 0


# ---------------------------------------------------------------------------------- fidelity


def fidelity(model_path: Path, quantized: onnx.ModelProto | Path, feeds, labels) -> dict:
    from polaris_opt.fidelity import compare_models, overall, top1_accuracy
    from polaris_opt.numerics import make_session

    reference = make_session(str(model_path))
    candidate = make_session(quantized if isinstance(quantized, onnx.ModelProto) else str(quantized))
    pooled = overall(compare_models(reference, candidate, batches(feeds, 64)))
    result = {"sqnr_db": round(pooled.sqnr_db, 2), "cosine": round(pooled.cosine, 6)}
    if labels is not None:
        result["top1_fp32"] = round(100 * top1_accuracy(reference, batches(feeds, 64), labels), 2)
        result["top1"] = round(100 * top1_accuracy(candidate, batches(feeds, 64), labels), 2)
    return result


def ort_static(model_path: Path, out: Path, method: str, calib: Path) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(model_path),
        str(out),
        NpzReader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
    )
    return out


def ort_preprocess(model_path: Path, out: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(model_path), str(out))
    return out


def ours_static(model_path: Path, method: str, calib: Path, **options) -> onnx.ModelProto:
    import polaris_opt

    return polaris_opt.quantize(str(model_path), str(calib), mode="int8", method=method, **options).model


def bench_fidelity(tmp: Path) -> dict:
    table = {}
    for name in ZOO:
        model_path = MODELS / f"{name}.onnx"
        feeds, labels = eval_data(name)
        rows = {}
        for method in OURS:
            rows[f"ours {method}"] = fidelity(
                model_path, ours_static(model_path, method, calib_path(name)), feeds, labels
            )
        for method in OURS:
            corrected = ours_static(model_path, method, calib_path(name), bias_correction=True)
            rows[f"ours {method}+bias-correction"] = fidelity(model_path, corrected, feeds, labels)
        # ORT as called on the model, and after the pre-processing its docs recommend (which folds
        # BatchNormalization, as our cleanup does): its best is the anchor.
        preprocessed = ort_preprocess(model_path, tmp / f"{name}.pre.onnx")
        for method in ORT_METHODS:
            out = ort_static(model_path, tmp / f"{name}.ort.{method}.onnx", method, calib_path(name))
            rows[f"ort {method}"] = fidelity(model_path, out, feeds, labels)
            out = ort_static(preprocessed, tmp / f"{name}.ort.pre.{method}.onnx", method, calib_path(name))
            rows[f"ort {method} (pre-processed)"] = fidelity(model_path, out, feeds, labels)
        table[name] = rows
        print(name, {k: v["sqnr_db"] for k, v in rows.items()}, flush=True)
    return table


# --------------------------------------------------------------------------- time and memory


def ours_body(model_path: Path, method: str, calib: Path, out: Path) -> str:
    return (
        "import polaris_opt, onnx\n"
        # ORT's calibrator builds its session with default options, i.e. one thread per core;
        # ours gets the same thread count.
        f"r = polaris_opt.quantize({str(model_path)!r}, {str(calib)!r}, mode='int8', method={method!r}, "
        f"threads={os.cpu_count()})\n"
        f"onnx.save(r.model, {str(out)!r})"
    )


def ort_body(model_path: Path, method: str, calib: Path, out: Path) -> str:
    return (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from bench_quantize import ort_static\n"
        "from pathlib import Path\n"
        f"ort_static(Path({str(model_path)!r}), Path({str(out)!r}), {method!r}, Path({str(calib)!r}))"
    )


def tenfold_calibration(tmp: Path, name: str) -> Path:
    """10x the samples of the zoo calibration set, drawn from the same N(0, 1) distribution."""
    big = tmp / f"{name}.calib10x.npz"
    if not big.exists():
        base = load_npz(calib_path(name))
        rng = np.random.default_rng(5)
        np.savez(
            big,
            **{k: rng.standard_normal((len(v) * 10, *v.shape[1:])).astype(v.dtype) for k, v in base.items()},
        )
    return big


def bench_speed(tmp: Path, runs: int, name: str = "resnet_s") -> dict:
    """Calibrate+quantize in a fresh process per run (imports included), interleaved with ORT, on
    the zoo set (64 samples: start-up dominates) and on 10x as many (calibration dominates)."""
    model_path = MODELS / f"{name}.onnx"
    results = {}
    for calib in (calib_path(name), tenfold_calibration(tmp, name)):
        samples_in = len(next(iter(load_npz(calib).values())))
        for method in ORT_METHODS:
            contenders = {
                "ours": ours_body(model_path, method, calib, tmp / "ours.onnx"),
                "ort": ort_body(model_path, method, calib, tmp / "ort.onnx"),
            }
            samples = interleave(contenders, runs)
            row = {
                who: {
                    "wall_s": round(median(s, "wall"), 3),
                    "peak_mb": round(median(s, "peak_mb"), 1),
                    "spread": round(spread(s, "wall"), 2),
                }
                for who, s in samples.items()
            }
            row["time_ratio"] = round(row["ours"]["wall_s"] / row["ort"]["wall_s"], 3)
            row["rss_ratio"] = round(row["ours"]["peak_mb"] / row["ort"]["peak_mb"], 3)
            results[f"{method} {samples_in} samples"] = row
            print(name, method, samples_in, row, flush=True)
    return results


def bench_memory(tmp: Path, runs: int, name: str = "resnet_s") -> dict:
    """Peak RSS of entropy calibration with N and 10N samples (same distribution)."""
    model_path = MODELS / f"{name}.onnx"
    rows = len(next(iter(load_npz(calib_path(name)).values())))
    big = tenfold_calibration(tmp, name)
    contenders = {
        f"ours {rows}": ours_body(model_path, "entropy", calib_path(name), tmp / "a.onnx"),
        f"ours {rows * 10}": ours_body(model_path, "entropy", big, tmp / "b.onnx"),
        f"ort {rows}": ort_body(model_path, "entropy", calib_path(name), tmp / "c.onnx"),
        f"ort {rows * 10}": ort_body(model_path, "entropy", big, tmp / "d.onnx"),
    }
    samples = interleave(contenders, runs, warmup=0)
    result = {
        k: {"peak_mb": round(median(s, "peak_mb"), 1), "wall_s": round(median(s, "wall"), 2)}
        for k, s in samples.items()
    }
    result["ours_growth"] = round(
        result[f"ours {rows * 10}"]["peak_mb"] / result[f"ours {rows}"]["peak_mb"] - 1, 4
    )
    result["ort_growth"] = round(
        result[f"ort {rows * 10}"]["peak_mb"] / result[f"ort {rows}"]["peak_mb"] - 1, 4
    )
    print("memory", result, flush=True)
    return result


# -------------------------------------------------------------------------------- coverage


def paddle_style_model(path: Path) -> Path:
    """A weight-dominated MLP whose weights are Constant nodes, as Paddle exports them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes, width, current = [], [256, 512, 512, 10], "x"
    for index, (d_in, d_out) in enumerate(zip(width[:-1], width[1:], strict=True)):
        w = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
        b = (rng.standard_normal(d_out) * 0.1).astype(np.float32)
        nodes += [
            helper.make_node("Constant", [], [f"w{index}"], value=numpy_helper.from_array(w)),
            helper.make_node("Constant", [], [f"b{index}"], value=numpy_helper.from_array(b)),
            helper.make_node("MatMul", [current, f"w{index}"], [f"mm{index}"]),
            helper.make_node("Add", [f"mm{index}", f"b{index}"], [f"y{index}"]),
        ]
        current = f"y{index}"
        if index < len(width) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "paddle_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    np.savez(path.with_suffix(".calib.npz"), x=rng.standard_normal((64, 256)).astype(np.float32))
    return path


def bench_coverage(tmp: Path) -> dict:
    model_path = paddle_style_model(tmp / "paddle_style.onnx")
    calib = model_path.with_suffix(".calib.npz")
    ours = tmp / "paddle.ours.onnx"
    onnx.save(ours_static(model_path, "minmax", calib), ours)
    ort = ort_static(model_path, tmp / "paddle.ort.onnx", "minmax", calib)
    fp32 = model_path.stat().st_size
    feeds = {"x": np.random.default_rng(9).standard_normal((64, 256)).astype(np.float32)}
    result = {
        "fp32_bytes": fp32,
        "ours_ratio": round(ours.stat().st_size / fp32, 3),
        "ort_ratio": round(ort.stat().st_size / fp32, 3),
        "ours_sqnr_db": fidelity(model_path, ours, feeds, None)["sqnr_db"],
        "ort_sqnr_db": fidelity(model_path, ort, feeds, None)["sqnr_db"],
    }
    print("coverage", result, flush=True)
    return result


# --------------------------------------------------------------------------------- latency


def latency(paths: dict[str, Path | onnx.ModelProto], feeds, rounds: int = 30, per_round: int = 20) -> dict:
    """Median per-run latency of each model, the contenders alternating round by round."""
    from polaris_opt.numerics import make_session

    sessions = {k: make_session(v if isinstance(v, onnx.ModelProto) else str(v)) for k, v in paths.items()}
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    for key, session in sessions.items():
        for _ in range(5):
            session.run(names[key], feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            started = time.perf_counter()
            for _ in range(per_round):
                session.run(names[key], feeds)
            times[key].append((time.perf_counter() - started) / per_round)
    return {k: round(1000 * float(np.median(v)), 4) for k, v in times.items()}


def bench_latency(tmp: Path) -> dict:
    results = {}
    for name in ZOO:
        model_path = MODELS / f"{name}.onnx"
        ours = ours_static(model_path, "minmax", calib_path(name))
        ort = ort_static(model_path, tmp / f"{name}.ort.lat.onnx", "minmax", calib_path(name))
        feeds, _ = eval_data(name)
        batch8 = {k: v[:8] for k, v in feeds.items()}
        ms = latency({"fp32": model_path, "ours": ours, "ort": ort}, batch8)
        ms["ours_vs_ort"] = round(ms["ours"] / ms["ort"], 3)
        ms["fp32_vs_ours"] = round(ms["fp32"] / ms["ours"], 3)
        results[name] = ms
        print("latency ms (batch 8, 1 thread)", name, ms, flush=True)
    return results


# ----------------------------------------------------------------------------------- sizes


def bench_size(tmp: Path) -> dict:
    from onnxruntime.quantization import quantize_dynamic

    import polaris_opt

    results = {}
    for name in ZOO:
        model_path = MODELS / f"{name}.onnx"
        feeds, labels = eval_data(name)
        fp32 = model_path.stat().st_size
        row = {"fp32_bytes": fp32}
        for label, model in [
            ("int8", ours_static(model_path, "minmax", calib_path(name))),
            ("int8-dynamic", polaris_opt.quantize(str(model_path), mode="int8-dynamic").model),
            ("fp16", polaris_opt.quantize(str(model_path), mode="fp16").model),
        ]:
            path = tmp / f"{name}.{label}.onnx"
            onnx.save(model, path)
            row[label] = {
                "size_ratio": round(path.stat().st_size / fp32, 3),
                **fidelity(model_path, path, feeds, labels),
            }
        ort_dyn = tmp / f"{name}.ort.dynamic.onnx"
        quantize_dynamic(str(model_path), str(ort_dyn), per_channel=True)
        row["ort int8-dynamic"] = {
            "size_ratio": round(ort_dyn.stat().st_size / fp32, 3),
            **fidelity(model_path, ort_dyn, feeds, labels),
        }
        results[name] = row
        print("size", name, row, flush=True)
    return results


def nbits_weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the packed weights, scales and zero points every MatMulNBits node reads, against
    the K·N float32 weights they stand for."""
    stored = {
        t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer
    }
    int4 = fp32 = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        fp32 += 4 * attrs["K"] * attrs["N"]
        int4 += sum(stored.get(name, 0) for name in node.input[1:4])
    return {"int4_bytes": int4, "fp32_bytes": fp32, "ratio": round(int4 / fp32, 4) if fp32 else None}


def bench_int4(tmp: Path, block_size: int = 32) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    import polaris_opt

    results = {}
    for name in ["transformer_s", "digits_mlp"]:
        model_path = MODELS / f"{name}.onnx"
        feeds, labels = eval_data(name)
        row = {}
        for symmetric in (True, False):
            kind = "sym" if symmetric else "asym"
            ours = polaris_opt.quantize(
                str(model_path), mode="int4", block_size=block_size, symmetric=symmetric
            ).model
            config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric)
            quantizer = MatMulNBitsQuantizer(onnx.load(model_path), algo_config=config)
            quantizer.process()
            theirs = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
            row[f"ours rtn {kind}"] = {
                **fidelity(model_path, ours, feeds, labels),
                **nbits_weight_bytes(ours),
            }
            row[f"ort rtn {kind}"] = {
                **fidelity(model_path, theirs, feeds, labels),
                **nbits_weight_bytes(theirs),
            }
        gptq = polaris_opt.quantize(
            str(model_path), str(calib_path(name)), mode="int4", method="gptq", block_size=block_size
        ).model
        row["ours gptq sym"] = {
            **fidelity(model_path, gptq, feeds, labels),
            **nbits_weight_bytes(gptq),
        }
        results[name] = row
        print("int4", name, row, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = parser.parse_args()
    # onnxruntime.quantization logs advice on every call; only the numbers matter here.
    logging.getLogger().setLevel(logging.ERROR)
    chosen = args.only.split(",")
    report = {"machine": machine(), "command": " ".join(["benchmarks/bench_quantize.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        runners = {
            "fidelity": lambda: bench_fidelity(tmp),
            "speed": lambda: bench_speed(tmp, args.runs),
            "memory": lambda: bench_memory(tmp, max(1, args.runs - 1)),
            "coverage": lambda: bench_coverage(tmp),
            "latency": lambda: bench_latency(tmp),
            "size": lambda: bench_size(tmp),
            "int4": lambda: bench_int4(tmp),
        }
        for section in SECTIONS:
            if section in chosen:
                report[section] = runners[section]()
    # Sections run alone (--only) update their part of the last full report.
    previous = OUT / "quantize.json"
    if previous.exists():
        report = {**json.loads(previous.read_text()), **report}
    print(write_json("quantize", report))


if __name__ == "__main__":
    main()
