"""QMatMul, QGemm and MatMulInt4 kernels (kernels/qmatmul.cl, kernels/int4.cl) through their launchers.

Each runs in both layouts on the machine's OpenCL device: the device's own profile (PoCL: `cpu`,
one work-item per output row) and the `polaris` GPU layout (one work-group per row), which PoCL
executes correctly, only more slowly. Odd shapes, batch 1 / 3 / 32 and K not a multiple of the
INT4 block throughout; half-step ties and saturation of the quantization, and the work-group
sizes `polaris-opt tune` may pick (LOCAL_SIZE 16 and 256), in tests of their own.

Bounds the tests hold (u = 2^-24, float32's unit roundoff):
- QMatMul/QGemm: the int32 accumulation is exact, so only the epilogue rounds: float(acc), the
  multiplier alpha·x_scale·w_scale, the product and the bias addition, at most ~3u relative to
  |acc·multiplier| + |bias|. The tests allow 1e-6 of that (≈ 17u). With power-of-two scales and
  no bias no rounding is left, and Y must equal the exact integer product bit for bit.
- MatMulInt4: W is formed exactly as the reference forms it; the float32 dot product in any
  summation order is within γ_K = K·u/(1 - K·u) of Σ|x·w| (Higham, Accuracy and Stability of
  Numerical Algorithms, §3.1), plus u·|y| for the bias.

Tests that need an OpenCL device skip when there is none.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.cl_env import open_env
from polaris_opt.errors import BadInput
from polaris_opt.int4 import pack_nibbles, packed_weight, quantize_blocks
from polaris_opt.numerics import run_model
from polaris_opt.ops.reference import MAX_QUANT_K, REFERENCES
from polaris_opt.runtime.launchers.base import LAUNCHERS
from polaris_opt.runtime.launchers.quant import ONE_GROUP_RANGE, MatMulInt4, QGemm, QMatMul, tile_rows

U = 2.0**-24
ONE = np.ones(1, np.float32)
QUANT_RTOL = 1e-6
RNG = np.random.default_rng(2026)
NATIVE = open_env()  # the machine's device with its own profile (PoCL: cpu)
ENVS = {"native": NATIVE, "polaris": open_env(profile="polaris") if NATIVE is not None else None}
needs_opencl = pytest.mark.skipif(ENVS["native"] is None, reason="no OpenCL platform/device on this machine")
pytestmark = needs_opencl
LAYOUTS = list(ENVS)


def device(env, array: np.ndarray):
    import pyopencl.array as cl_array

    return cl_array.to_device(env.queue, np.ascontiguousarray(array))


def run(launcher, x: np.ndarray) -> np.ndarray:
    return launcher.launch({0: device(launcher.env, x)}).get()


def int8_constants(n: int, k: int, *, bias: bool = True, static: tuple[float, int] | None = None) -> dict:
    """Random QMatMul constants (w_q covers -128..127), with x_scale / x_zero_point when static."""
    constants = {
        1: RNG.integers(-128, 128, (n, k), dtype=np.int8),
        2: RNG.uniform(1e-3, 2e-2, n).astype(np.float32),
    }
    if bias:
        constants[3] = RNG.standard_normal(n).astype(np.float32)
    if static is not None:
        constants[4] = np.array(static[0], dtype=np.float32)
        constants[5] = np.array(static[1], dtype=np.uint8)
    return constants


def reference_inputs(x: np.ndarray, constants: dict, count: int) -> list:
    return [x] + [constants.get(i) for i in range(1, count)]


def assert_quant_close(got: np.ndarray, expected: np.ndarray, magnitude: np.ndarray) -> None:
    """|got - expected| <= QUANT_RTOL · magnitude, elementwise (the epilogue's rounding bound)."""
    assert got.shape == expected.shape and got.dtype == np.float32
    excess = np.abs(got.astype(np.float64) - expected) - QUANT_RTOL * magnitude
    assert excess.max(initial=0.0) <= 0.0, f"worst excess over the bound: {excess.max()}"


def quant_magnitude(op: str, x: np.ndarray, constants: dict, attrs: dict) -> np.ndarray:
    """|acc·multiplier| + |bias|: what the epilogue's rounding is relative to (from the reference,
    run with a zero bias and no relu so it yields acc·multiplier itself)."""
    plain = dict(constants)
    plain[3] = np.zeros(constants[1].shape[0], np.float32)
    terms = REFERENCES[op](reference_inputs(x, plain, 6), {**attrs, "activation": "none"})
    return np.abs(terms.astype(np.float64)) + np.abs(constants.get(3, 0.0))


# ------------------------------------------------------------------------------ QMatMul / QGemm


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3, 32])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_qmatmul_matches_reference(layout, batch, static):
    n = 37  # odd sizes: no multiple of a vector width or a wavefront
    k = 130 if batch == 3 else 45
    constants = int8_constants(n, k, static=(0.021, 131) if static else None)
    attrs = {"activation": "relu"}
    launcher = QMatMul(ENVS[layout], attrs, constants)
    x = RNG.standard_normal((batch, k)).astype(np.float32) * 2
    expected = REFERENCES["QMatMul"](reference_inputs(x, constants, 6), attrs)
    assert_quant_close(run(launcher, x), expected, quant_magnitude("QMatMul", x, constants, attrs))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 5])
def test_qgemm_applies_alpha_bias_and_activation(layout, batch):
    constants = int8_constants(19, 70, static=(0.05, 3))
    for attrs in ({"alpha": -0.75, "activation": "none"}, {"alpha": 2.5, "activation": "relu"}):
        launcher = QGemm(ENVS[layout], attrs, constants)
        x = RNG.standard_normal((batch, 70)).astype(np.float32)
        got = run(launcher, x)
        expected = REFERENCES["QGemm"](reference_inputs(x, constants, 6), attrs)
        assert_quant_close(got, expected, quant_magnitude("QGemm", x, constants, attrs))
        if attrs["activation"] == "relu":
            assert got.min() == 0.0 and (got == 0).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int32_accumulation_is_exact(layout):
    # Extreme codes (x_q 0 and 255 from saturating X, w_q -128 and 127) over K = 301 keep
    # |acc| < 255·128·301 < 2^24, and power-of-two scales make every float step exact.
    n, k, zero_point = 23, 301, 7
    w_q = RNG.choice(np.array([-128, -1, 0, 1, 127], dtype=np.int8), size=(n, k))
    w_scale = np.exp2(-RNG.integers(0, 8, n)).astype(np.float32)
    x_scale = np.float32(2.0**-4)
    codes = RNG.choice(np.array([0, 1, 128, 254, 255]), size=(3, k))
    x = ((codes - zero_point) * x_scale).astype(np.float32)
    x[:, :5] = [-1e6, 1e6, -np.inf, np.inf, 0.0]  # saturate to 0 / 255
    codes[:, :5] = [0, 255, 0, 255, zero_point]
    constants = {1: w_q, 2: w_scale, 4: np.array(x_scale), 5: np.array(zero_point, np.uint8)}
    got = run(QMatMul(ENVS[layout], {}, constants), x)
    acc = (codes.astype(np.int64) - zero_point) @ w_q.T.astype(np.int64)
    np.testing.assert_array_equal(got, (acc * float(x_scale) * w_scale.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dynamic_quantization_matches_onnx_runtime(layout):
    # ONNX Runtime's DynamicQuantizeLinear -> MatMulInteger -> scale -> bias is an independent
    # implementation of the same semantics: its integer product is exact too.
    n, k = 29, 67
    constants = int8_constants(n, k)
    x = (RNG.standard_normal((4, k)) * 3 + 1).astype(np.float32)
    got = run(QMatMul(ENVS[layout], {}, constants), x)
    expected = ort_dynamic_qmatmul(x, constants[1], constants[2], constants[3])
    assert_quant_close(got, expected, quant_magnitude("QMatMul", x, constants, {"activation": "none"}))


def ort_dynamic_qmatmul(x, w_q, w_scale, bias) -> np.ndarray:
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "wt", "xz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["multiplier"]),
        helper.make_node("Mul", ["accf", "multiplier"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["y"]),
    ]
    weights = [
        numpy_helper.from_array(a, name) for name, a in (("wt", w_q.T.copy()), ("ws", w_scale), ("b", bias))
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_qmatmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return run_model(model, {"x": x})["y"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dynamic_range_of_a_large_x_folds_across_work_groups(layout):
    # More values than ONE_GROUP_RANGE: range_partial + dynamic_params + quantize_static. The
    # extremes sit in the last rows, so a fold that missed a work-group's share would show.
    k = 523
    rows = ONE_GROUP_RANGE // k + 2
    constants = int8_constants(7, k)
    x = RNG.uniform(-1, 1, (rows, k)).astype(np.float32)
    x[-1, -1], x[-2, 3] = 9.5, -4.25
    got = run(QMatMul(ENVS[layout], {}, constants), x)
    expected = REFERENCES["QMatMul"](reference_inputs(x, constants, 6), {})
    assert_quant_close(got, expected, quant_magnitude("QMatMul", x, constants, {"activation": "none"}))


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((2, 33), np.float32),
        np.full((1, 33), 0.5, np.float32),
        -np.linspace(0.1, 4, 66, dtype=np.float32),
    ],
    ids=["all-zero", "positive", "negative"],
)
def test_dynamic_range_always_holds_zero(x):
    # All zeros: scale 1, every x_q the zero point, so Y is the bias. One-signed X: the range
    # still reaches 0, so the zero point sits at an end (0 or 255).
    x = x.reshape(-1, 33)
    constants = int8_constants(11, 33)
    got = run(QMatMul(ENVS["native"], {}, constants), x)
    expected = REFERENCES["QMatMul"](reference_inputs(x, constants, 6), {})
    assert_quant_close(got, expected, quant_magnitude("QMatMul", x, constants, {"activation": "none"}))
    if not x.any():
        np.testing.assert_array_equal(got, np.broadcast_to(constants[3], got.shape))


def half_step_rows(rows: int, k: int, scale: float, zero_point: int) -> np.ndarray:
    """Rows of X on every half step between codes, (j + 0.5)·scale, and on both ends of the code
    range (codes 0 and 255 exactly), in a different order per row; zeros pad each row to K."""
    ends = np.array([-zero_point, 255 - zero_point], dtype=np.float64)
    steps = np.concatenate([np.arange(-zero_point, 255 - zero_point) + 0.5, ends]) * scale
    values = np.zeros((rows, k))
    for row in values:
        row[: steps.size] = RNG.permutation(steps)
    return values.astype(np.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["static", "dynamic", "dynamic-large"])
def test_quantization_rounds_half_to_even_and_saturates(layout, mode):
    # x / x_scale = j + 0.5 must round to the even neighbour, as QuantizeLinear and the reference's
    # np.rint do; beyond the range X saturates at codes 0 and 255. The dynamic range is made to be
    # exactly [-12.5, 19.375], so its scale is 31.875 / 255 = 0.125 and its zero point 100, and
    # "dynamic-large" has more values than ONE_GROUP_RANGE (range_partial + dynamic_params). An
    # identity w_q and power-of-two scales make Y = (x_q - zp)·x_scale exact: equal bit for bit.
    k, scale, zero_point = 264, 0.125, 100
    rows = ONE_GROUP_RANGE // k + 2 if mode == "dynamic-large" else 3
    x = half_step_rows(rows, k, scale, zero_point)
    constants = {1: np.eye(k, dtype=np.int8), 2: np.ones(k, np.float32)}
    if mode == "static":
        constants |= {4: np.array(scale, np.float32), 5: np.array(zero_point, np.uint8)}
        x[:, -4:] = [-1e6, 1e6, -np.inf, np.inf]  # saturate to codes 0 and 255
    got = run(QMatMul(ENVS[layout], {}, constants), x)
    np.testing.assert_array_equal(got, REFERENCES["QMatMul"](reference_inputs(x, constants, 6), {}))
    codes = got / scale + zero_point
    exact = x[0, :-4] / scale + zero_point  # 100.5 -> 100, 101.5 -> 102: Python's round is half-even too
    np.testing.assert_array_equal(codes[0, :-4], [round(float(v)) for v in exact])
    if mode == "static":
        np.testing.assert_array_equal(codes[:, -4:], np.broadcast_to([0, 255, 0, 255], (rows, 4)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("local_size", [16, 256])
def test_kernels_work_at_any_local_size(layout, local_size, monkeypatch):
    # `polaris-opt tune` may build the kernels with any power-of-two LOCAL_SIZE from 16 to 256: the
    # local-memory reductions (X's range, the GPU layout's partial sums) and the tile stores must
    # hold at both ends, for one tile row and for a full tile of 8 (batch 9: the last tile ragged).
    env = open_env(profile=None if layout == "native" else "polaris")
    if local_size > env.device.max_work_group_size:
        pytest.skip(f"the device runs at most {env.device.max_work_group_size} work-items per group")
    monkeypatch.setattr(type(env), "local_size", property(lambda self: local_size))
    k = 301
    int8 = {"dynamic": int8_constants(13, k), "static": int8_constants(13, k, static=(0.02, 120))}
    int4_attrs = {"K": k, "N": 11, "block_size": 32}
    int4_weight = int4_constants(11, k, 32, zero_points=True)
    int4 = MatMulInt4(env, int4_attrs, int4_weight)
    for batch in (1, 9, ONE_GROUP_RANGE // k + 2):
        x = RNG.standard_normal((batch, k)).astype(np.float32)
        for constants in int8.values():
            expected = REFERENCES["QMatMul"](reference_inputs(x, constants, 6), {})
            magnitude = quant_magnitude("QMatMul", x, constants, {"activation": "none"})
            assert_quant_close(run(QMatMul(env, {}, constants), x), expected, magnitude)
        assert_int4_close(run(int4, x), x, int4_weight, int4_attrs)


def test_leading_axes_pass_through_and_empty_batches():
    constants = int8_constants(13, 24, bias=False, static=(0.1, 128))
    launcher = QMatMul(ENVS["native"], {}, constants)
    x = RNG.standard_normal((2, 3, 24)).astype(np.float32)
    got = run(launcher, x)
    assert got.shape == (2, 3, 13)
    expected = REFERENCES["QMatMul"](reference_inputs(x, constants, 6), {})
    assert_quant_close(got, expected, quant_magnitude("QMatMul", x, constants, {"activation": "none"}))
    assert run(launcher, np.zeros((0, 24), np.float32)).shape == (0, 13)


def test_concurrent_launches_keep_their_own_buffers():
    constants = int8_constants(64, 96)
    launcher = QMatMul(ENVS["native"], {}, constants)
    inputs = [RNG.standard_normal((2, 96)).astype(np.float32) * (i + 1) for i in range(4)]
    expected = [REFERENCES["QMatMul"](reference_inputs(x, constants, 6), {}) for x in inputs]
    failures = []

    def work(index: int) -> None:
        for _ in range(5):
            got = run(launcher, inputs[index])
            if not np.allclose(got, expected[index], rtol=1e-5, atol=1e-5):
                failures.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_programs_are_built_once_per_tile():
    env = open_env()
    launcher = QMatMul(env, {}, int8_constants(8, 16))
    for batch in (1, 3, 1, 3, 4):
        run(launcher, RNG.standard_normal((batch, 16)).astype(np.float32))
    assert env.cached_programs() == 3  # the base program (quantize, range) and TILE_M = 1 and 4
    assert [tile_rows(m) for m in (1, 2, 3, 5, 8, 9, 1000)] == [1, 2, 4, 8, 8, 8, 8]


def test_launchers_are_registered():
    assert LAUNCHERS["QMatMul"] is QMatMul and LAUNCHERS["QGemm"] is QGemm
    assert LAUNCHERS["MatMulInt4"] is MatMulInt4


def test_cost_counts_the_narrow_weights():
    n, k = 64, 128
    qmatmul = QMatMul(ENVS["native"], {}, int8_constants(n, k, static=(0.1, 0)))
    int4 = MatMulInt4(ENVS["native"], {"K": k, "N": n, "block_size": 32}, int4_constants(n, k, 32, True))
    for launcher in (qmatmul, int4):
        flops, moved = launcher.cost({0: (1, k)})
        assert flops == 2.0 * n * k
        assert moved < 4 * n * k  # less than the float32 weight alone
    assert int4.cost({0: (1, k)})[1] < qmatmul.cost({0: (1, k)})[1]
    assert qmatmul.cost({0: (32, k)})[0] == 32 * 2.0 * n * k


# ---------------------------------------------------------------------------------- MatMulInt4


def int4_constants(n: int, k: int, block_size: int, zero_points: bool, bias: bool = True) -> dict:
    """MatMulInt4 constants from polaris_opt.int4's RTN quantizer and MatMulNBits packing."""
    weight = RNG.standard_normal((k, n)).astype(np.float32)
    codes, scales, points = quantize_blocks(weight, block_size, symmetric=not zero_points)
    constants = {1: packed_weight(codes, block_size), 2: scales}
    if zero_points:
        constants[3] = pack_nibbles(points)
    if bias:
        constants[4] = RNG.standard_normal(n).astype(np.float32)
    return constants


def assert_int4_close(got: np.ndarray, x: np.ndarray, constants: dict, attrs: dict) -> None:
    """Within γ_K·Σ|x·w| + u·|y| of the exact product, and twice that of the reference."""
    k = attrs["K"]
    inputs = reference_inputs(x, constants, 5)
    weight = REFERENCES["MatMulInt4"]([np.eye(k, dtype=np.float32), *inputs[1:4]], attrs)  # Wᵀ [K, N]
    exact = x.astype(np.float64) @ weight.astype(np.float64) + constants.get(4, 0.0)
    gamma = k * U / (1 - k * U)
    bound = gamma * (np.abs(x).astype(np.float64) @ np.abs(weight).astype(np.float64)) + U * np.abs(exact)
    assert np.all(np.abs(got - exact) <= bound)
    expected = REFERENCES["MatMulInt4"](inputs, attrs)
    assert np.all(np.abs(got - expected) <= 2 * bound + U * np.abs(expected))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3, 32])
@pytest.mark.parametrize(
    "n, k, block_size, zero_points",
    [(37, 45, 16, True), (21, 130, 32, False), (9, 64, 64, True), (5, 300, 128, True)],
    ids=["K45-b16", "K130-b32-symmetric", "K64-b64-one-block", "K300-b128-three-blocks"],
)
def test_matmul_int4_matches_reference(layout, batch, n, k, block_size, zero_points):
    attrs = {"K": k, "N": n, "block_size": block_size}
    constants = int4_constants(n, k, block_size, zero_points, bias=batch != 3)
    x = RNG.standard_normal((batch, k)).astype(np.float32)
    got = run(MatMulInt4(ENVS[layout], attrs, constants), x)
    assert_int4_close(got, x, constants, attrs)


def test_matmul_int4_nibble_order():
    # One weight per position, each its own power of two, read by a one-hot X: element 2i is
    # the low nibble of byte i, and block 1's zero point is the high nibble of the first byte.
    k, block_size = 32, 16
    codes = np.full((1, k), 8, dtype=np.uint8)
    codes[0, [0, 1, 17]] = [9, 10, 12]
    points = np.array([[8, 8]], dtype=np.uint8)
    constants = {
        1: packed_weight(codes, block_size),
        2: np.array([[1.0, 0.5]], np.float32),
        3: pack_nibbles(points),
    }
    launcher = MatMulInt4(ENVS["native"], {"K": k, "N": 1, "block_size": block_size}, constants)
    got = run(launcher, np.eye(k, dtype=np.float32))[:, 0]
    expected = np.zeros(k, np.float32)
    expected[[0, 1, 17]] = [1.0, 2.0, 2.0]
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------- in a Session


def test_session_chains_the_kernels_on_the_device():
    # QMatMul (dynamic) -> QGemm (static, relu) -> MatMulInt4: the activations stay on the device
    # between the three launches. Host placement runs the NumPy references instead. The int8
    # steps are exact on an IEEE device, so only MatMulInt4's summation order can differ.
    from polaris_opt.runtime import Session

    first, second = int8_constants(24, 40), int8_constants(16, 24, static=(0.05, 0))
    third = int4_constants(9, 16, 16, zero_points=True)
    weights = {f"a{i}": v for i, v in first.items()} | {f"b{i}": v for i, v in second.items()}
    weights |= {f"c{i}": v for i, v in third.items()}
    nodes = [
        helper.make_node("QMatMul", ["x", "a1", "a2", "a3"], ["h1"], domain="ai.polaris"),
        helper.make_node(
            "QGemm",
            ["h1", "b1", "b2", "b3", "b4", "b5"],
            ["h2"],
            domain="ai.polaris",
            alpha=0.5,
            activation="relu",
        ),
        helper.make_node(
            "MatMulInt4", ["h2", "c1", "c2", "c3", "c4"], ["y"], domain="ai.polaris", K=16, N=9, block_size=16
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "quant_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 9])],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in weights.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.polaris", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    x = RNG.standard_normal((3, 40)).astype(np.float32)
    on_device = Session(model, placement="device").run(None, {"x": x})[0]
    on_host = Session(model, placement="host").run(None, {"x": x})[0]
    np.testing.assert_allclose(on_device, on_host, rtol=1e-5, atol=1e-5 * np.abs(on_host).max())


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop(1), "w_q and w_scale must be initializers"),
        (lambda c: c.update({1: c[1].astype(np.float32)}), "w_q must be int8"),
        (lambda c: c.update({2: c[2][:-1]}), "w_scale must have shape"),
        (lambda c: c.update({3: c[3][:3]}), "bias must have shape"),
        (lambda c: c.pop(5), "x_scale and x_zero_point go together"),
        (lambda c: c.update({4: np.array(-1.0, np.float32)}), "x_scale must be positive"),
        (lambda c: c.update({5: np.array(3, np.int8)}), "x_zero_point must be one uint8"),
        (lambda c: c.update({1: np.zeros((1, MAX_QUANT_K + 1), np.int8), 2: ONE, 3: ONE}), "could overflow"),
    ],
    ids=["no-weight", "float-weight", "scale-shape", "bias-shape", "scale-alone", "negative-scale",
         "signed-zero-point", "K-too-long"],
)  # fmt: skip
def test_qmatmul_refuses_bad_constants(change, message):
    constants = int8_constants(6, 10, static=(0.1, 0))
    change(constants)
    with pytest.raises(BadInput, match=message):
        QMatMul(ENVS["native"], {}, constants)


def test_qmatmul_refuses_bad_attributes_and_inputs():
    env = ENVS["native"]
    with pytest.raises(BadInput, match="unknown activation"):
        QMatMul(env, {"activation": "gelu"}, int8_constants(6, 10))
    launcher = QMatMul(env, {}, int8_constants(6, 10))
    with pytest.raises(BadInput, match="K = 10"):
        run(launcher, np.zeros((2, 11), np.float32))
    with pytest.raises(BadInput, match="float32"):
        run(launcher, np.zeros((2, 10), np.float64))
    with pytest.raises(BadInput, match="must be initializers"):
        launcher.launch(
            {0: device(env, np.zeros((1, 10), np.float32)), 4: device(env, np.ones(1, np.float32))}
        )
    with pytest.raises(BadInput, match="QGemm: X must be 2-D"):
        run(QGemm(env, {}, int8_constants(6, 10)), np.zeros((1, 2, 10), np.float32))
    huge = types.SimpleNamespace(dtype=np.dtype(np.float32), ndim=2, shape=(2**23, 1024))
    with pytest.raises(BadInput, match="2\\^32"):
        QMatMul(env, {}, int8_constants(6, 1024)).launch({0: huge})


@pytest.mark.parametrize(
    "attrs, change, message",
    [
        ({"block_size": 24}, None, "block_size must be a power of two"),
        ({}, lambda c: c.pop(2), "w_packed and scales must be initializers"),
        ({}, lambda c: c.update({1: c[1][:, :1]}), "w_packed must be uint8"),
        ({}, lambda c: c.update({2: c[2].astype(np.float64)}), "scales must be float32"),
        ({}, lambda c: c.update({3: c[3][:, :0]}), "zero_points must be uint8"),
        ({}, lambda c: c.update({4: c[4][:2]}), "bias must have shape"),
    ],
    ids=["block-size", "no-scales", "packed-shape", "scales-dtype", "zero-points-shape", "bias-shape"],
)
def test_matmul_int4_refuses_bad_constants(attrs, change, message):
    constants = int4_constants(6, 40, 16, zero_points=True)
    if change is not None:
        change(constants)
    with pytest.raises(BadInput, match=message):
        MatMulInt4(ENVS["native"], {"K": 40, "N": 6, "block_size": 16, **attrs}, constants)


def test_matmul_int4_refuses_the_wrong_k():
    launcher = MatMulInt4(
        ENVS["native"], {"K": 40, "N": 6, "block_size": 16}, int4_constants(6, 40, 16, False)
    )
    with pytest.raises(BadInput, match="K = 40"):
        run(launcher, np.zeros((1, 41), np.float32))
