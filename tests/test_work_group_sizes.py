"""Launchers built with a work-group size other than the profile's, as `polaris-opt tune` may choose.

Every tunable kernel (the sparse SpMV and tile kernels, the QMatMul and MatMulInt4 GEMMs) must
launch with the tuned LOCAL_SIZE and still match the NumPy reference; the helper kernels
(transpose, quantization) keep the profile's size. Both layouts run on the machine's device:
its own profile (PoCL: cpu) and the polaris GPU layout, which PoCL executes correctly, only
more slowly. Launches are observed by wrapping the environment's `enqueue`.
"""

from __future__ import annotations

import numpy as np
import pytest

from polaris_opt import tuning
from polaris_opt.cl_env import open_env
from polaris_opt.int4 import pack_nibbles, packed_weight, quantize_blocks
from polaris_opt.ops.reference import REFERENCES, int4_weight, quantize_dynamic
from polaris_opt.runtime.launchers import LAUNCHERS
from polaris_opt.sparse import from_dense, to_dense

U = 2.0**-24
RNG = np.random.default_rng(5)
NATIVE = open_env()
ENVS = {"native": NATIVE, "polaris": open_env(profile="polaris") if NATIVE is not None else None}
pytestmark = pytest.mark.skipif(NATIVE is None, reason="no OpenCL platform/device on this machine")
# (layout, overriding defines): sizes below and above each profile's default of 64
CASES = [
    ("native", {"LOCAL_SIZE": "16"}),
    ("native", {"LOCAL_SIZE": "256", "TILE_M": "4"}),
    ("polaris", {"LOCAL_SIZE": "16"}),
    ("polaris", {"LOCAL_SIZE": "128", "TILE_M": "4"}),
]
TUNED_KERNELS = ("_spmv_", "_spmm_tile", "qgemm_", "matmul_int4_")  # what a tuned LOCAL_SIZE reaches


@pytest.fixture(autouse=True)
def no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # only the trial's defines apply
    tuning.forget_loaded()
    yield
    tuning.forget_loaded()


def recorded_launches(env, monkeypatch) -> list[tuple[str, int]]:
    """(kernel name, local size) of every launch on `env` from now on."""
    launches = []
    real = env.enqueue

    def enqueue(kernel, global_size, *args, **options):
        launches.append((kernel.function_name, env.local_size_of(kernel)))
        return real(kernel, global_size, *args, **options)

    monkeypatch.setattr(env, "enqueue", enqueue)
    return launches


def run_tuned(layout: str, defines: dict, monkeypatch, op_type: str, attrs: dict, constants: dict, x):
    """The op's output for `x` from a launcher built with `defines`; checks each launch's local size."""
    import pyopencl.array as cl_array

    env = ENVS[layout]
    with tuning.trial(defines):
        launcher = LAUNCHERS[op_type](env, attrs, constants)
    launches = recorded_launches(env, monkeypatch)
    y = launcher.launch({0: cl_array.to_device(env.queue, x)}).get()
    tuned = [(name, size) for name, size in launches if any(part in name for part in TUNED_KERNELS)]
    helpers = [(name, size) for name, size in launches if (name, size) not in tuned]
    assert len(tuned) == 1 and tuned[0][1] == int(defines["LOCAL_SIZE"]), launches
    assert all(size == env.local_size for _, size in helpers), launches
    return y, tuned[0][0]


@pytest.mark.parametrize("layout, defines", CASES)
@pytest.mark.parametrize("format", ["csr", "bsr", "sell"])
@pytest.mark.parametrize("batch", [1, 5])
def test_sparse_kernels_at_a_tuned_local_size(layout, defines, format, batch, monkeypatch):
    # 30 % dense rows of K = 150: ~45 entries a row, so the GPU CSR SpMV's default ROW_LANES (64)
    # exceeds a LOCAL_SIZE of 16 and must shrink to fit one work-group.
    w = RNG.standard_normal((37, 150)).astype(np.float32)
    w[RNG.random(w.shape) < 0.7] = 0
    matrix = from_dense(w, format, slice_height=8)
    attrs = {
        "format": format,
        "shape": list(matrix.shape),
        "block": list(matrix.block),
        "slice_height": matrix.slice_height,
        "activation": "none",
    }
    constants = {1: matrix.data, 2: matrix.indices, 3: matrix.indptr}
    x = RNG.standard_normal((batch, 150)).astype(np.float32)
    y, kernel = run_tuned(layout, defines, monkeypatch, "SparseMatMul", attrs, constants, x)
    assert kernel.endswith("_spmm_tile" if batch > 1 else ("_spmv_vector", "_spmv_row", "_spmv_rows"))
    dense = to_dense(matrix)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, defines", CASES)
@pytest.mark.parametrize("batch", [1, 5])
def test_qmatmul_at_a_tuned_local_size(layout, defines, batch, monkeypatch):
    n, k = 37, 130
    w_q = RNG.integers(-128, 128, (n, k), dtype=np.int8)
    w_scale = RNG.uniform(1e-3, 2e-2, n).astype(np.float32)
    x = RNG.standard_normal((batch, k)).astype(np.float32)
    constants = {1: w_q, 2: w_scale}  # dynamic quantization: its kernels keep the default size
    y, kernel = run_tuned(layout, defines, monkeypatch, "QMatMul", {}, constants, x)
    assert kernel.startswith("qgemm_")
    expected = REFERENCES["QMatMul"]([x, w_q, w_scale], {})
    x_q, scale, zero_point = quantize_dynamic(x)
    steps = np.abs(x_q.astype(np.float64) - float(zero_point)) * float(scale)
    bound = 1e-6 * (steps @ np.abs(w_q * w_scale.astype(np.float64)[:, None]).T)  # the epilogue's rounding
    assert np.all(np.abs(y - expected) <= bound)


@pytest.mark.parametrize("layout, defines", CASES)
@pytest.mark.parametrize("batch", [1, 5])
def test_matmul_int4_at_a_tuned_local_size(layout, defines, batch, monkeypatch):
    n, k, block_size = 21, 130, 32
    codes, scales, points = quantize_blocks(RNG.standard_normal((k, n)).astype(np.float32), block_size, False)
    constants = {1: packed_weight(codes, block_size), 2: scales, 3: pack_nibbles(points)}
    attrs = {"K": k, "N": n, "block_size": block_size}
    x = RNG.standard_normal((batch, k)).astype(np.float32)
    y, kernel = run_tuned(layout, defines, monkeypatch, "MatMulInt4", attrs, constants, x)
    assert kernel.startswith("matmul_int4_")
    weight = int4_weight(constants[1], scales, constants[3], attrs).astype(np.float64)
    gamma = k * U / (1 - k * U)  # float32 sums of k products in any order, twice (reference and kernel)
    bound = 2 * gamma * (np.abs(x).astype(np.float64) @ np.abs(weight).T)
    assert np.all(np.abs(y - REFERENCES["MatMulInt4"]([x, *constants.values()], attrs)) <= bound)
