"""SparseMatMul and SparseConv on OpenCL (kernels/spmm.cl, kernels/im2col.cl) == their NumPy reference.

Every case runs the launcher on PoCL's CPU device (the `cpu` profile: a row per work-item, AVX2
tiles) and a subset on the same device with the `polaris` profile, which runs the GPU layouts
(csr vector with local-memory reduction, SELL a row per work-item, float4 tiles): PoCL executes
any work-group shape, so the GPU code paths are checked for correctness here too.

Tolerances: float32 sums in another order differ by rounding only, bounded by
rtol · (|X|·|W|ᵀ + |bias|) per output with rtol = 1e-5. fp16 and int8 kernels compute exactly
what the stored values say (so the same bound holds against to_dense); against the original
float32 weight their stated bounds are 2^-11 relative per weight (fp16) and half a step,
scale[row] / 2, per weight (int8); fp16 subnormals are within 2^-25.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from polaris_opt.cl_env import ClEnv, open_env
from polaris_opt.devices import list_devices
from polaris_opt.errors import BadInput
from polaris_opt.ops.reference import REFERENCES
from polaris_opt.runtime.launchers import LAUNCHERS, Launcher
from polaris_opt.sparse import SparseMatrix, from_dense, to_dense

needs_opencl = pytest.mark.skipif(not list_devices(), reason="no OpenCL platform/device on this machine")
pytestmark = needs_opencl
RTOL = 1e-5


@pytest.fixture(scope="module")
def env() -> ClEnv:
    return open_env()


@pytest.fixture(scope="module")
def gpu_env() -> ClEnv:
    return open_env(profile="polaris")


def random_weight(rng, rows: int, cols: int, sparsity: float) -> np.ndarray:
    """W with about `sparsity` zeros, row 1 empty and row 2 fully dense (when there are rows)."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random((rows, cols)) < sparsity] = 0
    if rows > 2:
        w[1] = 0
        w[2] = rng.standard_normal(cols)
    return w


def sparse_attrs(m: SparseMatrix, activation: str = "none", **conv) -> dict:
    return {
        "format": m.format,
        "shape": list(m.shape),
        "block": list(m.block),
        "slice_height": m.slice_height,
        "activation": activation,
        **conv,
    }


def sparse_inputs(m: SparseMatrix, bias: np.ndarray | None) -> list:
    """The node's inputs after X: data, indices, indptr, bias, scale (None when absent)."""
    return [m.data, m.indices, m.indptr, bias, m.scale]


def constants_of(inputs: list) -> dict[int, np.ndarray]:
    return {index: value for index, value in enumerate(inputs, start=1) if value is not None}


def launch(launcher: Launcher, x: np.ndarray) -> np.ndarray:
    import pyopencl.array as cl_array

    return launcher.launch({0: cl_array.to_device(launcher.env.queue, x)}).get()


def run_op(env: ClEnv, op: str, attrs: dict, inputs: list, x: np.ndarray) -> np.ndarray:
    return launch(LAUNCHERS[op](env, attrs, constants_of(inputs)), x)


def assert_within(got: np.ndarray, expected: np.ndarray, scale: np.ndarray, rtol: float = RTOL) -> None:
    """|got − expected| ≤ rtol · scale elementwise (scale: the sum of magnitudes behind each output)."""
    assert got.shape == expected.shape and got.dtype == np.float32
    excess = np.abs(got - expected) - rtol * scale - 1e-30
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else None
    assert excess.size == 0 or excess.max() <= 0, (
        f"at {worst}: got {got[worst]}, expected {expected[worst]}, allowed {rtol * scale[worst]}"
    )


def magnitude(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """|X|·|W|ᵀ + |bias|: what rounding errors of X·Wᵀ + bias scale with."""
    scale = np.abs(x) @ np.abs(w).T
    return scale + (np.abs(bias) if bias is not None else 0)


def dense_matmul(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, activation: str) -> np.ndarray:
    y = x @ w.T + (bias if bias is not None else 0)
    return np.maximum(y, 0) if activation == "relu" else y


# ---------------------------------------------------------------------------- SparseMatMul


def check_matmul(
    env,
    rng,
    w,
    batch_shape,
    fmt,
    *,
    values="fp32",
    index="auto",
    bias=True,
    activation="none",
    block=(4, 3),
    slice_height=8,
):
    m = from_dense(w, fmt, values=values, index=index, block=block, slice_height=slice_height)
    stored = to_dense(m)
    b = rng.standard_normal(w.shape[0]).astype(np.float32) if bias else None
    x = rng.standard_normal((*batch_shape, w.shape[1])).astype(np.float32)
    inputs = sparse_inputs(m, b)
    attrs = sparse_attrs(m, activation)
    got = run_op(env, "SparseMatMul", attrs, inputs, x)
    reference = REFERENCES["SparseMatMul"]([x, *inputs], attrs)
    scale = magnitude(x, stored, b)
    assert_within(got, reference, scale)
    assert_within(got, dense_matmul(x, stored, b, activation), scale)
    return got, x, b, m


@pytest.mark.parametrize("batch", [1, 3, 32, 100])
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "sell"])
def test_matmul_matches_the_reference(env, fmt, values, batch):
    rng = np.random.default_rng(batch)
    w = random_weight(rng, 37, 53, sparsity=0.7)  # odd N and K: ragged blocks, slices and tiles
    activation = "relu" if batch % 2 else "none"
    check_matmul(env, rng, w, (batch,), fmt, values=values, bias=batch != 3, activation=activation)


@pytest.mark.parametrize("batch", [2, 5, 8, 16, 17, 24])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "sell"])
def test_a_handful_of_rows_matches_the_reference(env, fmt, batch):
    """Small batches take the tile kernel with just enough vectors (1 to 3 on the CPU: 17 and 24
    rows are 3 vectors, a width that is no power of two); each ragged tile edge is exercised."""
    rng = np.random.default_rng(100 + batch)
    w = random_weight(rng, 41, 67, sparsity=0.9)
    check_matmul(env, rng, w, (batch,), fmt, activation="relu" if batch % 2 else "none")


def test_tile_vectors_follow_the_batch(env, tmp_path, monkeypatch):
    # The launcher's own rule: an empty cache folder keeps any `polaris-opt tune` result out.
    from polaris_opt import tuning

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tuning.forget_loaded()
    m = from_dense(random_weight(np.random.default_rng(3), 20, 30, sparsity=0.5), "csr")
    launcher = LAUNCHERS["SparseMatMul"](env, sparse_attrs(m), constants_of(sparse_inputs(m, None)))
    width = launcher.weight.vec_width
    assert [launcher.weight.tile_vectors(width * v) for v in (1, 2, 3, 4, 5)] == [1, 2, 3, 4, 4]
    assert launcher.weight.tile_vectors(width * 2 + 1) == 3


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "sell"])
def test_gpu_layouts_match_the_reference(gpu_env, fmt, values, batch):
    rng = np.random.default_rng(10 + batch)
    w = random_weight(rng, 45, 70, sparsity=0.8)
    check_matmul(gpu_env, rng, w, (batch,), fmt, values=values, activation="relu")


@pytest.mark.parametrize("index", ["int32", "uint16"])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "sell"])
def test_both_index_types(env, fmt, index):
    rng = np.random.default_rng(3)
    w = random_weight(rng, 19, 300, sparsity=0.9)
    for batch in (1, 9):
        _, _, _, m = check_matmul(env, rng, w, (batch,), fmt, index=index)
        assert m.indices.dtype == np.dtype(index)


@pytest.mark.parametrize("sparsity", [0.0, 0.99, 1.0])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "sell"])
def test_dense_nearly_empty_and_empty_weights(env, fmt, sparsity):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 65)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    for batch in (1, 12):
        got, x, b, _ = check_matmul(env, rng, w, (batch,), fmt, block=(2, 8), slice_height=16)
        if sparsity == 1.0:
            np.testing.assert_array_equal(got, np.broadcast_to(b, got.shape))


def test_leading_axes_pass_through(env):
    rng = np.random.default_rng(5)
    w = random_weight(rng, 11, 16, sparsity=0.5)
    got, *_ = check_matmul(env, rng, w, (2, 3), "csr")
    assert got.shape == (2, 3, 11)
    got, *_ = check_matmul(env, rng, w, (), "bsr")  # X [K] -> Y [N]
    assert got.shape == (11,)
    m = from_dense(w, "csr")
    nothing = np.zeros((0, 16), np.float32)
    empty = run_op(env, "SparseMatMul", sparse_attrs(m), sparse_inputs(m, None), nothing)
    assert empty.shape == (0, 11)


@pytest.mark.parametrize("values", ["fp16", "int8"])
def test_narrow_values_within_their_stated_bound(env, values):
    rng = np.random.default_rng(6)
    w = random_weight(rng, 40, 90, sparsity=0.6)
    w[3, :5] = [1e-6, -3e-7, 6e4, -2e-5, 5e-8]  # fp16 subnormals and a large value
    got, x, b, m = check_matmul(env, rng, w, (7,), "csr", values=values)
    exact = dense_matmul(x, w, b, "none")
    if values == "fp16":  # 2^-11 relative for normal numbers, 2^-25 absolute for subnormals
        allowed = 2.0**-11 * np.abs(x) @ np.abs(w).T + 2.0**-25 * np.abs(x).sum(axis=1, keepdims=True)
    else:  # int8: each weight within half a step of its row's scale
        allowed = 0.5 * np.abs(x).sum(axis=1, keepdims=True) * m.scale[None, :]
    assert_within(got, exact, allowed + RTOL * magnitude(x, w, b), rtol=1.0)
    assert np.abs(got - exact).max() > 0  # the narrow values really are narrower


def test_every_float16_value_decodes_exactly(env, gpu_env):
    """All 65536 bit patterns (subnormals, infinities, NaNs): row r holds value r in 9 columns, so
    with X = 1 both the vector path (8 at a time) and the scalar tail read it: Y = 9·value, exact."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    m = from_dense(np.repeat(values[:, None], 9, axis=1), "csr", values="fp16")
    assert m.nnz == 9 * np.count_nonzero(values)  # ±0 are not stored
    with np.errstate(invalid="ignore"):  # signalling NaNs among the patterns
        expected = 9 * values.astype(np.float32)
    for device in (env, gpu_env):
        for batch in (1, 2):  # SpMV (vector path and tail) and tile kernels (one value at a time)
            got = run_op(
                device,
                "SparseMatMul",
                sparse_attrs(m),
                sparse_inputs(m, None),
                np.ones((batch, 9), np.float32),
            )
            np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))


def test_bsr_never_reads_x_past_k(env):
    """The last block column overhangs K; X's buffer continues with NaNs there, which must not leak in."""
    import pyopencl as cl
    import pyopencl.array as cl_array

    rng = np.random.default_rng(15)
    w = random_weight(rng, 8, 13, sparsity=0.3)
    m = from_dense(w, "bsr", block=(4, 8))  # 13 columns in blocks of 8: 3 padded columns
    x = rng.standard_normal(13).astype(np.float32)
    flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
    backing = cl.Buffer(env.context, flags, hostbuf=np.concatenate([x, np.full(64, np.nan, np.float32)]))
    launcher = LAUNCHERS["SparseMatMul"](env, sparse_attrs(m), constants_of(sparse_inputs(m, None)))
    got = launcher.launch({0: cl_array.Array(env.queue, (13,), np.float32, data=backing)}).get()
    assert_within(got, w @ x, magnitude(x, w, None))


def test_bsr_blocks_that_overhang_both_edges(env):
    rng = np.random.default_rng(7)
    w = random_weight(rng, 10, 13, sparsity=0.5)  # 10 = 2·4 + 2 rows, 13 = 2·5 + 3 columns
    for batch in (1, 4, 17):
        check_matmul(env, rng, w, (batch,), "bsr", block=(4, 5))


def test_sell_slices_wider_than_the_vector_and_ell(env):
    rng = np.random.default_rng(8)
    w = random_weight(rng, 33, 40, sparsity=0.7)
    for slice_height in (1, 3, 8, 64):  # 64 >= N: ELL
        check_matmul(env, rng, w, (1,), "sell", slice_height=slice_height)
        check_matmul(env, rng, w, (6,), "sell", slice_height=slice_height)


def test_a_launcher_is_reused_across_calls_and_batch_sizes(env):
    rng = np.random.default_rng(9)
    w = random_weight(rng, 30, 50, sparsity=0.8)
    m = from_dense(w, "csr")
    launcher = LAUNCHERS["SparseMatMul"](env, sparse_attrs(m), constants_of(sparse_inputs(m, None)))
    batches = [1, 40, 1, 3, 40]
    for batch in batches:  # the first pass builds what each batch size needs
        launch(launcher, rng.standard_normal((batch, 50)).astype(np.float32))
    built = env.cached_programs()
    for batch in batches:
        x = rng.standard_normal((batch, 50)).astype(np.float32)
        assert_within(launch(launcher, x), x @ w.T, magnitude(x, w, None))
    assert env.cached_programs() == built


def test_concurrent_launches_from_several_threads(env):
    rng = np.random.default_rng(10)
    w = random_weight(rng, 64, 96, sparsity=0.8)
    m = from_dense(w, "csr")
    launcher = LAUNCHERS["SparseMatMul"](env, sparse_attrs(m), constants_of(sparse_inputs(m, None)))
    feeds = [rng.standard_normal((batch, 96)).astype(np.float32) for batch in (1, 16, 1, 33, 2, 16, 1, 9)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: launch(launcher, x), feeds))
    for x, got in zip(feeds, results, strict=True):
        assert_within(got, x @ w.T, magnitude(x, w, None))


@pytest.mark.parametrize("values", ["fp16", "int8"])
def test_cost_counts_stored_values_and_bytes(env, values):
    w = random_weight(np.random.default_rng(11), 20, 30, sparsity=0.5)
    m = from_dense(w, "csr", values=values)
    bias = np.ones(20, np.float32)
    launcher = LAUNCHERS["SparseMatMul"](env, sparse_attrs(m), constants_of(sparse_inputs(m, bias)))
    weight_bytes = m.nbytes + bias.nbytes  # nbytes holds data, indices, indptr and an int8 scale
    flops, moved = launcher.cost({0: (4, 30)})
    assert flops == 2 * m.nnz * 4
    assert moved == weight_bytes + 4 * 4 * (20 + 30) + 8 * 4 * 30  # weight, X and Y, transpose
    assert launcher.cost({0: (1, 30)}) == (2 * m.nnz, weight_bytes + 4 * (20 + 30))


def test_registry():
    assert LAUNCHERS["SparseMatMul"].op_type == "SparseMatMul"
    assert LAUNCHERS["SparseConv"].op_type == "SparseConv"


# ------------------------------------------------------------------------------ SparseConv

CONV_CASES = [
    # batch, channels, height, width, out channels, kernel, pads, strides, dilations
    (1, 5, 7, 9, 6, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1)),
    (2, 3, 8, 8, 4, (3, 2), (0, 1, 2, 0), (2, 1), (1, 2)),
    (1, 4, 4, 4, 7, (1, 1), (0, 0, 0, 0), (1, 1), (1, 1)),  # pointwise, 16 pixels: X read in place
    (1, 4, 3, 5, 7, (1, 1), (0, 0, 0, 0), (1, 1), (1, 1)),  # pointwise, 15 pixels: a padded copy
    (3, 4, 5, 6, 7, (1, 1), (0, 0, 0, 0), (1, 1), (1, 1)),  # pointwise, batch 3: images side by side
    (1, 4, 3, 3, 9, (3, 3), (0, 0, 0, 0), (1, 1), (1, 1)),  # one output pixel: an SpMV
    (2, 2, 6, 7, 5, (1, 1), (1, 0, 0, 1), (2, 3), (1, 1)),  # 1x1 but padded and strided: im2col
]


def conv_weight(rng, out_channels: int, channels: int, kernel) -> np.ndarray:
    w = rng.standard_normal((out_channels, channels, *kernel)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    w[0] = 0  # an output channel with no weights
    return w


def conv_reference_ort(x, w, b, pads, strides, dilations) -> np.ndarray:
    """The dense Conv by ONNX Runtime: an anchor that shares no code with ours."""
    import onnx
    from onnx import helper, numpy_helper

    from polaris_opt.numerics import run_model

    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], pads=list(pads), strides=list(strides), dilations=list(dilations)
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return run_model(model, {"x": x})["y"]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("fmt", ["csr", "bsr", "sell"])
def test_conv_matches_the_reference_and_onnxruntime(env, gpu_env, fmt, case):
    batch, channels, height, width, out_channels, kernel, pads, strides, dilations = CONV_CASES[case]
    rng = np.random.default_rng(case)
    w4 = conv_weight(rng, out_channels, channels, kernel)
    m = from_dense(w4.reshape(out_channels, -1), fmt, block=(2, 4), slice_height=4)
    b = rng.standard_normal(out_channels).astype(np.float32)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    attrs = sparse_attrs(m, "relu", kernel_shape=kernel, pads=pads, strides=strides, dilations=dilations)
    inputs = sparse_inputs(m, b)
    reference = REFERENCES["SparseConv"]([x, *inputs], attrs)
    anchor = np.maximum(conv_reference_ort(x, w4, b, pads, strides, dilations), 0)
    # The bound as for a product: sum |x|·|w| over each output's receptive field, by the conv itself.
    scale = conv_reference_ort(np.abs(x), np.abs(w4), np.abs(b), pads, strides, dilations)
    for device in (env, gpu_env):
        got = run_op(device, "SparseConv", attrs, inputs, x)
        assert_within(got, reference, scale)
        assert_within(got, anchor, scale)


def test_conv_cost_counts_the_columns_only_when_built(env):
    rng = np.random.default_rng(12)
    m = from_dense(conv_weight(rng, 6, 4, (1, 1)).reshape(6, -1), "csr")
    attrs = sparse_attrs(m, kernel_shape=(1, 1))
    launcher = LAUNCHERS["SparseConv"](env, attrs, constants_of(sparse_inputs(m, None)))
    flops, moved = launcher.cost({0: (1, 4, 4, 4)})  # 16 pixels: read in place
    assert flops == 2 * m.nnz * 16 and moved == m.nbytes + 4 * 16 * (6 + 4)
    _, moved_batched = launcher.cost({0: (2, 4, 4, 4)})  # two images: columns built
    assert moved_batched == m.nbytes + 4 * 32 * (6 + 4) + 8 * 32 * 4


# ------------------------------------------------------------------------------ bad input


def csr_case(rng=None):
    w = random_weight(rng or np.random.default_rng(13), 6, 10, sparsity=0.5)
    m = from_dense(w, "csr", index="int32")
    return m, sparse_attrs(m), sparse_inputs(m, None)


def test_weights_that_are_not_constants_are_refused(env):
    m, attrs, inputs = csr_case()
    constants = constants_of(inputs)
    del constants[2]
    with pytest.raises(BadInput, match="SparseMatMul: indices must be initializers"):
        LAUNCHERS["SparseMatMul"](env, attrs, constants)


def test_corrupt_weights_are_refused_before_any_kernel_reads_them(env):
    m, attrs, inputs = csr_case()
    far = m.indices.copy()
    far[-1] = 10  # past K
    with pytest.raises(BadInput, match=r"corrupt: an index lies outside 0\.\.9"):
        LAUNCHERS["SparseMatMul"](env, attrs, constants_of([m.data, far, m.indptr]))
    backwards = m.indptr.copy()
    backwards[2], backwards[3] = backwards[3], backwards[2] - 1
    with pytest.raises(BadInput, match="corrupt: indptr decreases"):
        LAUNCHERS["SparseMatMul"](env, attrs, constants_of([m.data, m.indices, backwards]))
    with pytest.raises(BadInput, match="int32 or uint16"):
        LAUNCHERS["SparseMatMul"](env, attrs, constants_of([m.data, m.indices.astype(np.int64), m.indptr]))


def test_bad_attributes_bias_and_x_are_refused(env):
    import pyopencl.array as cl_array

    m, attrs, inputs = csr_case()
    with pytest.raises(BadInput, match="unknown format 'csc'"):
        LAUNCHERS["SparseMatMul"](env, {**attrs, "format": "csc"}, constants_of(inputs))
    with pytest.raises(BadInput, match="unknown activation 'gelu'"):
        LAUNCHERS["SparseMatMul"](env, {**attrs, "activation": "gelu"}, constants_of(inputs))
    with pytest.raises(BadInput, match=r"bias must have shape \[6\]"):
        LAUNCHERS["SparseMatMul"](env, attrs, constants_of([*inputs[:3], np.zeros(5, np.float32)]))
    launcher = LAUNCHERS["SparseMatMul"](env, attrs, constants_of(inputs))
    with pytest.raises(BadInput, match=r"X's last axis must be K = 10; got shape \(2, 9\)"):
        launch(launcher, np.zeros((2, 9), np.float32))
    with pytest.raises(BadInput, match="X must be float32; got float64"):
        launcher.launch({0: cl_array.to_device(env.queue, np.zeros((2, 10)))})
    with pytest.raises(BadInput, match=r"input 0 \(X\) is missing"):
        launcher.launch({})


def test_bad_conv_input_is_refused(env):
    rng = np.random.default_rng(14)
    m = from_dense(conv_weight(rng, 3, 2, (3, 3)).reshape(3, -1), "csr")
    attrs = sparse_attrs(m, kernel_shape=(3, 3), dilations=(2, 2))
    launcher = LAUNCHERS["SparseConv"](env, attrs, constants_of(sparse_inputs(m, None)))
    with pytest.raises(BadInput, match=r"X must be \[B, 2, H, W\]; got shape \(1, 3, 8, 8\)"):
        launch(launcher, np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(BadInput, match="4×4 input is smaller than the dilated kernel"):
        launch(launcher, np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(BadInput, match="not C·kh·kw"):
        LAUNCHERS["SparseConv"](env, {**attrs, "kernel_shape": (2, 2)}, constants_of(sparse_inputs(m, None)))


def test_repeated_shapes_reuse_scratch_without_overwriting_held_results(env):
    rng = np.random.default_rng(11)
    w = random_weight(rng, 40, 72, sparsity=0.85)
    m = from_dense(w, "csr")
    launcher = LAUNCHERS["SparseMatMul"](env, sparse_attrs(m), constants_of(sparse_inputs(m, None)))
    feeds = [rng.standard_normal((batch, 72)).astype(np.float32) for batch in (16, 16, 4, 16, 30, 4)]
    import pyopencl.array as cl_array

    # device outputs kept, read only after every later call has reused the scratch
    held = [launcher.launch({0: cl_array.to_device(env.queue, x)}) for x in feeds]
    for x, y in zip(feeds, held, strict=True):
        assert_within(y.get(), x @ w.T, magnitude(x, w, None))


def test_concurrent_launches_of_one_shape_share_scratch_safely(env):
    rng = np.random.default_rng(12)
    w = random_weight(rng, 256, 128, sparsity=0.9)
    m = from_dense(w, "csr")
    launcher = LAUNCHERS["SparseMatMul"](env, sparse_attrs(m), constants_of(sparse_inputs(m, None)))
    feeds = [rng.standard_normal((8, 128)).astype(np.float32) for _ in range(24)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: launch(launcher, x), feeds))
    for x, got in zip(feeds, results, strict=True):
        assert_within(got, x @ w.T, magnitude(x, w, None))


@pytest.mark.parametrize("op", ["SparseMatMul", "SparseConv"])
def test_launch_reusing_keeps_one_output_per_thread_and_launch_never_does(env, op):
    import pyopencl.array as cl_array

    rng = np.random.default_rng(13)
    if op == "SparseMatMul":
        w = random_weight(rng, 24, 40, sparsity=0.7)
        attrs, shapes = sparse_attrs(from_dense(w, "csr")), [(6, 40), (6, 40), (3, 40)]
    else:
        w = conv_weight(rng, 5, 3, (3, 3)).reshape(5, -1)
        attrs = sparse_attrs(from_dense(w, "csr"), kernel_shape=(3, 3), pads=(1, 1, 1, 1))
        shapes = [(1, 3, 6, 6), (1, 3, 6, 6), (2, 3, 5, 5)]
    inputs = sparse_inputs(from_dense(w, "csr"), None)
    launcher = LAUNCHERS[op](env, attrs, constants_of(inputs))
    feeds = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]

    def reused(x):
        return launcher.launch_reusing({0: cl_array.to_device(env.queue, x)})

    first = reused(feeds[0])
    first_values = first.get()
    second = reused(feeds[1])
    assert second is first  # kept: the same shape writes the same array again
    third = reused(feeds[2])
    assert third is not first  # a new shape replaces it
    magnitudes = sparse_inputs(from_dense(np.abs(w), "csr"), None)
    for x, got in ((feeds[0], first_values), (feeds[1], second.get()), (feeds[2], third.get())):
        scale = REFERENCES[op]([np.abs(x), *magnitudes], attrs)  # Σ|x|·|w| behind each output
        assert_within(got, REFERENCES[op]([x, *inputs], attrs), scale)
    with ThreadPoolExecutor(1) as pool:  # another thread keeps its own
        elsewhere = pool.submit(reused, feeds[2]).result()
    assert elsewhere is not reused(feeds[2])
    fresh = [launcher.launch({0: cl_array.to_device(env.queue, feeds[2])}) for _ in range(2)]
    assert fresh[0] is not fresh[1] and all(array is not third for array in fresh)
