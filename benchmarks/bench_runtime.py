"""The runtime shim's own costs (issue 5): overhead over plain ONNX Runtime, cost per partition
boundary, and where the scheduler puts a large sparse layer.

1. Overhead: `Session` on each zoo model (no ai.polaris node: one ORT session) against
   `make_session` on the same file. Target: within 1.05x.
2. Boundary cost: a chain of L blocks `Tanh → SparseMatMul(16x16)`, run by `Session` (2L
   boundaries between ORT steps and polaris steps), against ONNX Runtime on its dense twin (one
   session). Per boundary = (t_session - t_dense - L * t_reference) / 2L, where t_reference is the
   NumPy reference called directly: what remains is dispatch, feeds and fetches.
3. Placement: x → MatMul → SparseMatMul(1024x1024, 90% zeros) → Relu, host vs device vs auto.

Timing: in one process, contenders interleaved round by round, the median of the rounds'
per-call times; 1 ORT thread.

    .venv/bin/python benchmarks/bench_runtime.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json  # noqa: E402

from polaris_opt.numerics import make_session  # noqa: E402
from polaris_opt.ops.reference import REFERENCES  # noqa: E402
from polaris_opt.runtime import Session  # noqa: E402
from polaris_opt.sparse.formats import from_dense, to_dense  # noqa: E402

MODELS = ROOT / "models"
ZOO = ["digits_mlp", "digits_cnn", "resnet_s", "mobilenetv2_s", "transformer_s"]


def per_call_seconds(contenders: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of the mean time per call; contenders alternate within each round."""
    for run in contenders.values():  # warm: first calls allocate and build kernels
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - started) / calls)
    return {name: statistics.median(times) for name, times in samples.items()}


def calls_for(seconds_per_call: float, budget: float = 0.05) -> int:
    return max(3, min(2000, int(budget / max(seconds_per_call, 1e-7))))


# ---------------------------------------------------------------------------------- 1. overhead


def zoo_feeds(name: str, batch: int) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{name}.input.npz") as archive:
        return {k: np.repeat(archive[k][:1], batch, axis=0) for k in archive.files}


def overhead(rounds: int, batches: list[int]) -> list[dict]:
    rows = []
    for name in ZOO:
        path = MODELS / f"{name}.onnx"
        plain, shim = make_session(onnx.load(path)), Session(path)
        for batch in batches:
            feeds = zoo_feeds(name, batch)
            contenders = {
                "ort": lambda plain=plain, feeds=feeds: plain.run(None, feeds),
                "session": lambda shim=shim, feeds=feeds: shim.run(None, feeds),
            }
            probe = per_call_seconds({"ort": contenders["ort"]}, 1, 3)["ort"]
            times = per_call_seconds(contenders, rounds, calls_for(probe))
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "ort_us": times["ort"] * 1e6,
                    "session_us": times["session"] * 1e6,
                    "ratio": times["session"] / times["ort"],
                }
            )
            print(f"overhead {name:14s} batch {batch:3d}: {rows[-1]['ratio']:.3f}x", file=sys.stderr)
    return rows


# -------------------------------------------------------------------------------- 2. boundaries


def smm_node(name: str, x: str, y: str, matrix) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    arrays = {"data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr}
    weights = [numpy_helper.from_array(a, f"{name}.{k}") for k, a in arrays.items()]
    node = helper.make_node(
        "SparseMatMul",
        [x, *(f"{name}.{k}" for k in arrays)],
        [y],
        name=name,
        domain="ai.polaris",
        format=matrix.format,
        shape=list(matrix.shape),
    )
    return node, weights


def model_of(nodes, weights, width_in: int, width_out: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width_out])],
        initializer=weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.polaris", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def chain(blocks: int, width: int = 16) -> tuple[onnx.ModelProto, onnx.ModelProto, object]:
    """L blocks of Tanh → SparseMatMul, and the dense twin (Tanh → MatMul)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((width, width)).astype(np.float32)
    w[rng.random(w.shape) > 0.5] = 0.0
    matrix = from_dense(w, "csr")
    sparse_nodes, sparse_weights, dense_nodes = [], [], []
    dense_weights = [numpy_helper.from_array(np.ascontiguousarray(to_dense(matrix).T), "wt")]
    for i in range(blocks):
        x, y = ("x" if i == 0 else f"h{i}"), ("y" if i == blocks - 1 else f"h{i + 1}")
        node, weights = smm_node(f"smm{i}", f"t{i}", y, matrix)
        sparse_nodes += [helper.make_node("Tanh", [x], [f"t{i}"]), node]
        sparse_weights += weights
        dense_nodes += [
            helper.make_node("Tanh", [x], [f"t{i}"]),
            helper.make_node("MatMul", [f"t{i}", "wt"], [y]),
        ]
    return (
        model_of(sparse_nodes, sparse_weights, width, width),
        model_of(dense_nodes, dense_weights, width, width),
        matrix,
    )


def boundaries(rounds: int, blocks: int, device: bool) -> dict:
    sparse, dense, matrix = chain(blocks)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 16), dtype=np.float32)}
    plain = make_session(dense)
    contenders = {"dense_ort": lambda: plain.run(None, feeds)}
    host = Session(sparse, placement="host")
    contenders["session_host"] = lambda: host.run(None, feeds)
    if device:
        on_device = Session(sparse, placement="device")
        contenders["session_device"] = lambda: on_device.run(None, feeds)
    inputs = [feeds["x"], matrix.data, matrix.indices, matrix.indptr]
    attrs = {"format": "csr", "shape": list(matrix.shape)}
    contenders["reference_call"] = lambda: REFERENCES["SparseMatMul"](inputs, attrs)
    times = per_call_seconds(contenders, rounds, 200)
    count = 2 * blocks
    result = {"blocks": blocks, "boundaries": count, **{f"{k}_us": v * 1e6 for k, v in times.items()}}
    extra = times["session_host"] - times["dense_ort"] - blocks * times["reference_call"]
    result["per_boundary_host_us"] = extra / count * 1e6
    if device:
        result["per_boundary_device_us"] = (times["session_device"] - times["dense_ort"]) / count * 1e6
    print(f"boundaries: {result}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------------- 3. placement


def large_layer() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((256, 1024)).astype(np.float32) * 0.05
    w = rng.standard_normal((1024, 1024)).astype(np.float32)
    w[rng.random(w.shape) > 0.1] = 0.0
    matrix = from_dense(w, "csr")
    smm, weights = smm_node("smm", "h", "s", matrix)
    head = helper.make_node("MatMul", ["x", "w0"], ["h"])
    sparse = model_of(
        [head, smm, helper.make_node("Relu", ["s"], ["y"])],
        [numpy_helper.from_array(w0, "w0"), *weights],
        256,
        1024,
    )
    dense_nodes = [
        head,
        helper.make_node("MatMul", ["h", "wt"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    dense_weights = [
        numpy_helper.from_array(w0, "w0"),
        numpy_helper.from_array(np.ascontiguousarray(to_dense(matrix).T), "wt"),
    ]
    return sparse, model_of(dense_nodes, dense_weights, 256, 1024)


def placement(rounds: int, batches: list[int], device: bool) -> list[dict]:
    sparse, dense = large_layer()
    plain = make_session(dense)
    sessions = {"host": Session(sparse, placement="host")}
    if device:
        sessions |= {"device": Session(sparse, placement="device"), "auto": Session(sparse, placement="auto")}
    rows = []
    for batch in batches:
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 256), dtype=np.float32)}
        contenders = {"dense_ort": lambda feeds=feeds: plain.run(None, feeds)}
        contenders |= {name: (lambda s=s, feeds=feeds: s.run(None, feeds)) for name, s in sessions.items()}
        times = per_call_seconds(contenders, rounds, 20)
        row = {"batch": batch, **{f"{k}_us": v * 1e6 for k, v in times.items()}}
        if device:
            trace = []
            sessions["auto"].run(None, feeds, trace=trace)
            row["auto_chose"] = next(r.placement for r in trace if r.op_type == "SparseMatMul")
        rows.append(row)
        print(f"placement: {row}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and sizes (a smoke run)")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    from polaris_opt.cl_env import open_env

    device = open_env() is not None
    data = {
        "machine": machine(),
        "overhead": overhead(rounds, [1] if args.quick else [1, 16]),
        "boundaries": [boundaries(rounds, blocks, device) for blocks in ([4] if args.quick else [4, 16])],
        "placement": placement(rounds, [1, 64] if args.quick else [1, 8, 64], device),
    }
    print(write_json("runtime", data))


if __name__ == "__main__":
    main()
