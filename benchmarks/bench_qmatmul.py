"""INT8 and INT4 GEMM speed (issue 5): our OpenCL kernels on PoCL next to ONNX Runtime's CPU ops.

One 4096×4096 layer (N = K = 4096) at batch 1 (memory-bound GEMV) and batch 32:

- int8: QMatMul (kernels/qmatmul.cl) with dynamic and with static activation quantization,
  against ONNX Runtime's MatMulInteger (uint8 X already quantized, int32 out: the bare integer
  GEMM) and com.microsoft.DynamicQuantizeMatMul (float X in, float Y out: the same work as our
  dynamic QMatMul), with float32 MatMul for scale;
- int4: MatMulInt4 (kernels/int4.cl) against com.microsoft.MatMulNBits (same weight layout,
  block 32, float accumulation; accuracy_level 0).

Our kernels are timed two ways: "device" (X already on the device, Y left there, as between two
ai.polaris nodes of the runtime shim) and "host" (X uploaded and Y read back each call, as ONNX
Runtime's numbers are). Each contender runs in its own fresh process, contenders alternate
(benchmarks/common.py `interleave`), and each process reports the median time of `--calls`
calls after warming up; the table shows the median over `--runs` processes and the max/min
spread. ONNX Runtime gets as many intra-op threads as the machine has cores; PoCL uses them all.
A correctness check first compares our dynamic QMatMul with DynamicQuantizeMatMul.

    .venv/bin/python benchmarks/bench_qmatmul.py [--runs 3] [--calls 20] [--only int8,int4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, interleave, machine, median, spread, write_json  # noqa: E402

sys.path.insert(0, str(ROOT))
N = K = 4096
BATCHES = (1, 32)
BLOCK_SIZE = 32
SEED = 5
INT8 = ["ours_dynamic", "ours_static", "ort_matmulinteger", "ort_dynamicquantizematmul", "ort_matmul_fp32"]
INT4 = ["ours_int4", "ort_matmulnbits"]
X_SCALE, X_ZERO_POINT = np.float32(4.0 / 255), np.uint8(128)  # the static pair: X in [-2, 2]


# ---------------------------------------------------------------------------------- the layer


def layer() -> dict[str, np.ndarray]:
    """The int8 weight (w_q [N, K], per-row scale), a float weight for fp32, a bias: seeded."""
    rng = np.random.default_rng(SEED)
    weight = rng.standard_normal((N, K)).astype(np.float32) * 0.02
    w_scale = (np.abs(weight).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.rint(weight / w_scale[:, None]), -127, 127).astype(np.int8)
    return {
        "weight": weight,
        "w_q": w_q,
        "w_scale": w_scale,
        "bias": rng.standard_normal(N).astype(np.float32),
    }


def activations(batch: int) -> np.ndarray:
    return np.random.default_rng(SEED + batch).standard_normal((batch, K)).astype(np.float32)


def int4_layer(weight: np.ndarray) -> dict[str, np.ndarray]:
    from polaris_opt.int4 import pack_nibbles, packed_weight, quantize_blocks

    codes, scales, zero_points = quantize_blocks(weight.T, BLOCK_SIZE, symmetric=False)
    return {
        "packed": packed_weight(codes, BLOCK_SIZE),
        "scales": scales,
        "zero_points": pack_nibbles(zero_points),
    }


# ------------------------------------------------------------------------------ contenders


def ort_model(kind: str, arrays: dict[str, np.ndarray]):
    """A one-op ONNX model of ONNX Runtime's contender `kind`, input 'x', output 'y'."""
    ms = "com.microsoft"
    if kind == "ort_matmulinteger":
        inputs = [("x", TensorProto.UINT8)]
        node = helper.make_node("MatMulInteger", ["x", "w", "x_zero_point"], ["y"])
        weights = {"w": arrays["w_q"].T.copy(), "x_zero_point": np.array(X_ZERO_POINT)}
    elif kind == "ort_dynamicquantizematmul":
        inputs = [("x", TensorProto.FLOAT)]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "w_scale", "", "bias"], ["y"], domain=ms)
        weights = {"w": arrays["w_q"].T.copy(), "w_scale": arrays["w_scale"], "bias": arrays["bias"]}
    elif kind == "ort_matmul_fp32":
        inputs = [("x", TensorProto.FLOAT)]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        weights = {"w": arrays["weight"].T.copy()}
    else:  # ort_matmulnbits
        inputs = [("x", TensorProto.FLOAT)]
        node = helper.make_node(
            "MatMulNBits", ["x", "packed", "scales", "zero_points"], ["y"], domain=ms,
            K=K, N=N, bits=4, block_size=BLOCK_SIZE,
        )  # fmt: skip
        weights = {key: arrays[key] for key in ("packed", "scales", "zero_points")}
    graph = helper.make_graph(
        [node],
        kind,
        [helper.make_tensor_value_info(name, dtype, ["batch", K]) for name, dtype in inputs],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.INT32 if kind == "ort_matmulinteger" else TensorProto.FLOAT, None
            )
        ],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def ort_call(kind: str, batch: int):
    """A no-argument function running ONNX Runtime's contender once on the batch."""
    from polaris_opt.numerics import make_session

    arrays = layer()
    if kind == "ort_matmulnbits":
        arrays |= int4_layer(arrays["weight"])
    session = make_session(ort_model(kind, arrays), threads=os.cpu_count() or 1)
    x = activations(batch)
    if kind == "ort_matmulinteger":
        x = np.clip(np.rint(x / X_SCALE) + X_ZERO_POINT, 0, 255).astype(np.uint8)
    return lambda: session.run(None, {"x": x})[0]


def ours_launcher(kind: str):
    """Our launcher for `kind` on the default OpenCL device, and its environment."""
    from polaris_opt.cl_env import open_env
    from polaris_opt.runtime.launchers.quant import MatMulInt4, QMatMul

    env = open_env()
    if env is None:
        raise SystemExit("no OpenCL device: our kernels cannot be measured here")
    arrays = layer()
    if kind == "ours_int4":
        int4 = int4_layer(arrays["weight"])
        constants = {1: int4["packed"], 2: int4["scales"], 3: int4["zero_points"], 4: arrays["bias"]}
        return MatMulInt4(env, {"K": K, "N": N, "block_size": BLOCK_SIZE}, constants), env
    constants = {1: arrays["w_q"], 2: arrays["w_scale"], 3: arrays["bias"]}
    if kind == "ours_static":
        constants |= {4: np.array(X_SCALE), 5: np.array(X_ZERO_POINT)}
    return QMatMul(env, {}, constants), env


def ours_call(kind: str, batch: int, resident: bool):
    """A function running our kernel once: X and Y on the device (resident) or host arrays."""
    import pyopencl.array as cl_array

    launcher, env = ours_launcher(kind)
    x = activations(batch)
    if resident:
        x_device = cl_array.to_device(env.queue, x)

        def call():
            launcher.launch({0: x_device})
            env.queue.finish()

        return call
    return lambda: launcher.launch({0: cl_array.to_device(env.queue, x)}).get()


def time_contender(name: str, batch: int, calls: int) -> dict:
    """In a child process: build `name`, warm it up, and time `calls` calls (median seconds)."""
    kind, _, where = name.partition("@")
    call = ours_call(kind, batch, where == "device") if kind.startswith("ours") else ort_call(kind, batch)
    for _ in range(3):  # first calls build kernels and allocate
        call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times)}


# -------------------------------------------------------------------------------- measuring


def contenders(section: str) -> list[str]:
    ours = ["ours_dynamic", "ours_static"] if section == "int8" else ["ours_int4"]
    theirs = INT8[2:] if section == "int8" else INT4[1:]
    return [f"{kind}@{where}" for kind in ours for where in ("device", "host")] + theirs


def bench_batch(section: str, batch: int, runs: int, calls: int) -> dict:
    bodies = {
        name: (
            "import sys; sys.path.insert(0, 'benchmarks'); from bench_qmatmul import time_contender; "
            f"result = time_contender({name!r}, {batch}, {calls})"
        )
        for name in contenders(section)
    }
    samples = interleave(bodies, runs=runs, warmup=0)
    rows = {}
    for name, runs_of in samples.items():
        per_call = [{"seconds": sample["result"]["median_s"]} for sample in runs_of]
        seconds = median(per_call, "seconds")
        weight_bytes = N * K // (2 if section == "int4" else 1) * (4 if "fp32" in name else 1)
        rows[name] = {
            "ms": round(seconds * 1e3, 3),
            "spread": round(spread(per_call, "seconds"), 2),
            "gmac_per_s": round(batch * N * K / seconds / 1e9, 1),
            "weight_gb_per_s": round(weight_bytes / seconds / 1e9, 1),
        }
    return rows


def agreement() -> dict:
    """Our dynamic QMatMul against DynamicQuantizeMatMul on the same layer and batch 32."""
    import pyopencl.array as cl_array

    launcher, env = ours_launcher("ours_dynamic")
    x = activations(32)
    ours = launcher.launch({0: cl_array.to_device(env.queue, x)}).get()
    theirs = ort_call("ort_dynamicquantizematmul", 32)()
    fp32 = x @ layer()["weight"].T + layer()["bias"]
    return {
        "max_abs_diff_vs_ort": float(np.abs(ours - theirs).max()),
        "max_abs_output": float(np.abs(theirs).max()),
        "sqnr_db_vs_fp32": float(
            10 * np.log10(np.sum(fp32.astype(np.float64) ** 2) / np.sum((ours - fp32) ** 2.0))
        ),
    }


def print_table(section: str, batch: int, rows: dict) -> None:
    print(f"\n{section}, N = K = {N}, batch {batch}")
    print(f"  {'contender':34} {'ms':>9} {'spread':>7} {'GMAC/s':>8} {'weight GB/s':>12}")
    for name, row in rows.items():
        speed = f"{row['gmac_per_s']:8.1f} {row['weight_gb_per_s']:12.1f}"
        print(f"  {name:34} {row['ms']:9.3f} {row['spread']:7.2f} {speed}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per contender (median taken)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per process (median taken)")
    parser.add_argument("--only", default="int8,int4", help="comma-separated sections: int8, int4")
    args = parser.parse_args()
    sections = [s for s in args.only.split(",") if s]
    result = {"machine": machine(), "shape": {"N": N, "K": K, "int4_block_size": BLOCK_SIZE}}
    result["settings"] = {"runs": args.runs, "calls": args.calls, "ort_threads": os.cpu_count()}
    # Other work on the machine slows every contender alike (they alternate) but widens spreads.
    result["load_average_before"] = os.getloadavg()
    if "int8" in sections:
        result["agreement"] = agreement()
        print("agreement with DynamicQuantizeMatMul:", result["agreement"])
    for section in sections:
        result[section] = {}
        for batch in BATCHES:
            rows = bench_batch(section, batch, args.runs, args.calls)
            result[section][f"batch_{batch}"] = rows
            print_table(section, batch, rows)
    result["load_average_after"] = os.getloadavg()
    print("\nwrote", write_json("qmatmul", result))


if __name__ == "__main__":
    main()
