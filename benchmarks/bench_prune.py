"""Pruning numbers (issue 4). The anchors: magnitude pruning (the classic baseline) for quality at
equal sparsity, the dense model on ONNX Runtime for the speed of structured pruning, and the
issue's absolute targets for how long pruning itself takes.

- quality: output SQNR against the dense model on held-out data (top-1 on the digits test set),
  for magnitude, Wanda and SparseGPT (layer by layer and one-shot) × 50/70/90 % × unstructured /
  2:4 / 4:8 / block:4x4, on every zoo model, no retraining; calibration from the zoo's
  calibration sets;
- structured: 50 % channel pruning of resnet_s (parameters, ORT CPU latency against the dense
  model, 1 thread, interleaved), digits_cnn at 25 % channels with and without --correct, head
  pruning of transformer_s;
- speed: SparseGPT on one 4096×4096 MatMul with 128 calibration rows, and magnitude pruning of
  the 134 MB MLP of `build_zoo.py --large`, each end to end in a fresh process.

    .venv/bin/python benchmarks/bench_prune.py [--runs 3] [--only quality,structured,speed]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from bench_foundation import build_large
from bench_quantize import batches, calib_path, eval_data, latency
from common import OUT, ROOT, interleave, machine, median, spread, write_json

sys.path.insert(0, str(ROOT))
MODELS = ROOT / "models"
ZOO = ["digits_mlp", "digits_cnn", "resnet_s", "mobilenetv2_s", "transformer_s"]
# (column, prune options): sparsegpt layer by layer (the default) and one-shot.
METHODS = {
    "magnitude": "method=magnitude",
    "wanda": "method=wanda",
    "sparsegpt": "method=sparsegpt",
    "sparsegpt one-shot": "method=sparsegpt,sequential=false",
}
# (pattern, sparsities): N:M fixes its own sparsity.
PATTERNS = [
    ("unstructured", [0.5, 0.7, 0.9]),
    ("2:4", [0.5]),
    ("4:8", [0.5]),
    ("block:4x4", [0.5, 0.7, 0.9]),
]
SECTIONS = ["quality", "structured", "speed"]


# ---------------------------------------------------------------------------------- helpers


def zoo_source(name: str):
    from polaris_opt.calib_data import open_calibration

    model = onnx.load(MODELS / f"{name}.onnx")
    return open_calibration(str(calib_path(name)), model, batch_size=16)


def run(name: str, pipeline: str, source=None) -> tuple[onnx.ModelProto, list]:
    """The zoo model `name` through `pipeline`; returns the model and the pass reports."""
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.passes_api import PassContext
    from polaris_opt.pipeline import Pipeline

    model = onnx.load(MODELS / f"{name}.onnx")
    result = run_pipeline(model, Pipeline.parse(pipeline), ctx=PassContext(calib=source))
    return result.model, result.reports


def fidelity(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds, labels) -> dict:
    from polaris_opt.fidelity import compare_models, overall, top1_accuracy
    from polaris_opt.numerics import make_session

    reference, candidate = make_session(dense), make_session(pruned)
    pooled = overall(compare_models(reference, candidate, batches(feeds, 64)))
    result = {"sqnr_db": round(pooled.sqnr_db, 2)}
    # Class scores [batch, classes]: top-1 agreement stands in for accuracy where no labels exist.
    if len(dense.graph.output[0].type.tensor_type.shape.dim) == 2:
        result["agreement"] = round(100 * pooled.top1_agreement, 2)
    if labels is not None:
        result["top1"] = round(100 * top1_accuracy(candidate, batches(feeds, 64), labels), 2)
    return result


def parameters(model: onnx.ModelProto) -> int:
    return sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    )


def dense_baseline(name: str) -> tuple[onnx.ModelProto, dict]:
    """The cleaned dense model (the reference every pruned model is compared with) and its top-1."""
    dense, _ = run(name, "cleanup")
    feeds, labels = eval_data(name)
    row = {"params": parameters(dense)}
    if labels is not None:
        from polaris_opt.fidelity import top1_accuracy
        from polaris_opt.numerics import make_session

        row["top1"] = round(100 * top1_accuracy(make_session(dense), batches(feeds, 64), labels), 2)
    return dense, row


# ---------------------------------------------------------------------------------- quality


def bench_quality() -> dict:
    table: dict = {}
    for name in ZOO:
        dense, baseline = dense_baseline(name)
        feeds, labels = eval_data(name)
        source = zoo_source(name)
        table[name] = {"dense": baseline}
        for pattern, sparsities in PATTERNS:
            for sparsity in sparsities:
                key = f"{pattern}@{sparsity:.0%}"
                table[name][key] = {}
                for method, options in METHODS.items():
                    step = f"prune{{sparsity={sparsity},{options},pattern={pattern}}}"
                    started = time.perf_counter()
                    pruned, reports = run(name, f"cleanup,{step}", source)
                    row = fidelity(dense, pruned, feeds, labels)
                    row["seconds"] = round(time.perf_counter() - started, 2)
                    row["sparsity"] = round(float(reports[-1].stats.get("sparsity", 0.0)), 4)
                    table[name][key][method] = row
                print("quality", name, key, table[name][key], flush=True)
    return table


# ------------------------------------------------------------------------------- structured


def bench_structured(runs: int) -> dict:
    results = {}
    # resnet_s: 50 % of the channels of every safe group, the L2 importance.
    dense, baseline = dense_baseline("resnet_s")
    pruned, reports = run("resnet_s", "cleanup,prune-structured{kind=channel,sparsity=0.5}")
    step = "prune-structured{kind=channel,sparsity=0.5,correct=true}"
    corrected, _ = run("resnet_s", f"cleanup,{step}", zoo_source("resnet_s"))
    feeds, _ = eval_data("resnet_s")
    speed = {}
    for batch in (1, 8):
        sample = {k: v[:batch] for k, v in feeds.items()}
        ms = latency({"dense": dense, "pruned": pruned}, sample, rounds=10 * runs)
        speed[f"batch{batch}"] = {**ms, "speedup": round(ms["dense"] / ms["pruned"], 3)}
    results["resnet_s_channel_50"] = {
        "params_dense": baseline["params"],
        "params_pruned": parameters(pruned),
        "params_ratio": round(parameters(pruned) / baseline["params"], 4),
        "sqnr_db": fidelity(dense, pruned, feeds, None)["sqnr_db"],
        "sqnr_db_correct": fidelity(dense, corrected, feeds, None)["sqnr_db"],
        "groups": len(reports[-1].details.get("groups", [])),
        "skipped": len(reports[-1].details.get("skipped", [])),
        "latency_ms": speed,
    }
    print("structured resnet_s", results["resnet_s_channel_50"], flush=True)

    # digits_cnn at 25 % channels: top-1 with and without the correction.
    dense, baseline = dense_baseline("digits_cnn")
    feeds, labels = eval_data("digits_cnn")
    source = zoo_source("digits_cnn")
    row = {"top1_dense": baseline["top1"]}
    for importance in ("l2", "taylor"):
        for correct in ("false", "true"):
            step = f"prune-structured{{kind=channel,sparsity=0.25,importance={importance},correct={correct}}}"
            pruned, _ = run("digits_cnn", f"cleanup,{step}", source)
            measured = fidelity(dense, pruned, feeds, labels)
            key = f"{importance}{'+correct' if correct == 'true' else ''}"
            row[key] = {**measured, "drop": round(baseline["top1"] - measured["top1"], 2)}
    row["params_ratio"] = round(parameters(pruned) / baseline["params"], 4)
    results["digits_cnn_channel_25"] = row
    print("structured digits_cnn", row, flush=True)

    # transformer_s: half the heads.
    dense, baseline = dense_baseline("transformer_s")
    feeds, _ = eval_data("transformer_s")
    pruned, _ = run("transformer_s", "cleanup,prune-structured{kind=head,sparsity=0.5}")
    sample = {k: v[:8] for k, v in feeds.items()}
    ms = latency({"dense": dense, "pruned": pruned}, sample, rounds=10 * runs)
    results["transformer_s_head_50"] = {
        "params_ratio": round(parameters(pruned) / baseline["params"], 4),
        "sqnr_db": fidelity(dense, pruned, feeds, None)["sqnr_db"],
        "latency_ms": {**ms, "speedup": round(ms["dense"] / ms["pruned"], 3)},
    }
    print("structured transformer_s", results["transformer_s_head_50"], flush=True)
    return results


# ------------------------------------------------------------------------------------ speed


def big_matmul_model(path: Path, size: int = 4096) -> None:
    """One MatMul with a [size, size] float32 weight, batch dimension dynamic."""
    rng = np.random.default_rng(4096)
    weight = onnx.numpy_helper.from_array(
        (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), "weight"
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "weight"], ["y"], name="matmul")],
        "big_matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", size])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", size])],
        [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    # 128 calibration rows with unequal feature scales, as real activations have.
    scales = np.exp(rng.standard_normal(size)).astype(np.float32)
    np.savez(path.with_suffix(".calib.npz"), x=rng.standard_normal((128, size)).astype(np.float32) * scales)


def prune_body(model: Path, out: Path, pipeline: str, calib: Path | None) -> str:
    """A child process: load, run the pipeline, save — what `polaris-opt prune` does."""
    source = f"open_calibration({str(calib)!r}, model, batch_size=16)" if calib else "None"
    return (
        "from polaris_opt.calib_data import open_calibration\n"
        "from polaris_opt.compiler import run_pipeline\n"
        "from polaris_opt.graph_io import load_model, save_model\n"
        "from polaris_opt.passes_api import PassContext\n"
        "from polaris_opt.pipeline import Pipeline\n"
        f"model = load_model({str(model)!r})\n"
        f"outcome = run_pipeline(model, Pipeline.parse({pipeline!r}), ctx=PassContext(calib={source}))\n"
        f"save_model(outcome.model, {str(out)!r}, pipeline={pipeline!r})\n"
        "result = {r.step: round(r.seconds, 3) for r in outcome.reports}\n"
    )


def bench_speed(tmp: Path, runs: int) -> dict:
    matmul = tmp / "matmul4096.onnx"
    big_matmul_model(matmul)
    # Built by models/build_zoo.py --large (134 MB, not committed) when not there yet.
    large = build_large(OUT / "large" / "large_mlp.onnx")
    contenders = {
        "sparsegpt_4096": prune_body(
            matmul,
            tmp / "m.out.onnx",
            "prune{sparsity=0.5,method=sparsegpt}",
            matmul.with_suffix(".calib.npz"),
        ),
        "magnitude_134MB": prune_body(large, tmp / "l.out.onnx", "cleanup,prune{sparsity=0.9}", None),
    }
    samples = interleave(contenders, runs=runs, warmup=0)
    results = {}
    for name, measured in samples.items():
        results[name] = {
            "wall_s": round(median(measured, "wall"), 2),
            "spread": round(spread(measured, "wall"), 3),
            "peak_mb": round(median(measured, "peak_mb"), 1),
            "pass_seconds": measured[-1]["result"],
        }
        print("speed", name, results[name], flush=True)
    results["magnitude_134MB"]["model_mb"] = round(large.stat().st_size / 1e6, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = parser.parse_args()
    chosen = args.only.split(",")
    report = {"machine": machine(), "command": " ".join(["benchmarks/bench_prune.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as folder:
        runners = {
            "quality": bench_quality,
            "structured": lambda: bench_structured(args.runs),
            "speed": lambda: bench_speed(Path(folder), args.runs),
        }
        for section in SECTIONS:
            if section in chosen:
                report[section] = runners[section]()
    previous = OUT / "prune.json"
    if previous.exists():
        report = {**json.loads(previous.read_text()), **report}
    print(write_json("prune", report))


if __name__ == "__main__":
    main()
