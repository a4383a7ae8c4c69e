"""polaris_opt.int4 and polaris_opt.hessian: block-wise INT4 arithmetic against NumPy and ONNX Runtime.

The layout claims (nibble order, [N, blocks, blob] B, scales [N, blocks], packed zero points,
padding of a short last block) are checked by running one-node MatMulNBits models on ONNX
Runtime and against ONNX Runtime's own block quantizer.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.hessian import Hessian, collect_hessians
from polaris_opt.int4 import (
    dequantize_blocks,
    fitted_block_size,
    gptq,
    is_valid_block_size,
    pack_nibbles,
    packed_weight,
    quantize_blocks,
    unpack_nibbles,
)
from polaris_opt.numerics import make_session, run_model

RNG = np.random.default_rng(0)


def floats(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def block_scales(scales: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """Each weight element's |scale|, shaped [K, N] like the weight."""
    return np.abs(np.repeat(scales, block_size, axis=1)[:, :k].T)


# ----------------------------------------------------------------------------- packing


def test_first_code_goes_in_the_low_nibble():
    assert pack_nibbles(np.array([1, 2, 15, 0, 7], np.uint8)).tolist() == [0x21, 0x0F, 0x07]


@pytest.mark.parametrize("shape", [(1,), (33,), (7, 33), (3, 5, 16), (2, 0)])
def test_pack_unpack_round_trip_on_odd_shapes(shape):
    codes = RNG.integers(0, 16, shape).astype(np.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (*shape[:-1], -(-shape[-1] // 2))
    np.testing.assert_array_equal(unpack_nibbles(packed, shape[-1]), codes)


# ------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_odd_k_pads_the_last_block_with_codes_for_zero(block_size, symmetric):
    k, n = 33, 7
    codes, scales, zero_points = quantize_blocks(floats(k, n), block_size, symmetric)
    blocks = -(-k // block_size)
    assert codes.shape == (n, blocks * block_size) and scales.shape == zero_points.shape == (n, blocks)
    assert scales.dtype == np.float32 and codes.dtype == zero_points.dtype == np.uint8
    np.testing.assert_array_equal(codes[:, k:], np.repeat(zero_points[:, -1:], codes.shape[1] - k, axis=1))
    assert packed_weight(codes, block_size).shape == (n, blocks, block_size // 2)


@pytest.mark.parametrize("block_size", [16, 32])
def test_asymmetric_error_is_at_most_half_a_step(block_size):
    weight = floats(33, 7) + 0.5  # off-centre, so zero points differ from 8
    codes, scales, zero_points = quantize_blocks(weight, block_size, symmetric=False)
    error = np.abs(dequantize_blocks(codes, scales, zero_points, 33) - weight)
    assert np.all(error <= block_scales(scales, block_size, 33) * (0.5 + 1e-6))
    assert np.any(zero_points != 8)


@pytest.mark.parametrize("block_size", [16, 32])
def test_symmetric_maps_the_largest_value_to_minus_8_and_rounds_to_nearest(block_size):
    k, n = 33, 7
    weight = floats(k, n)
    codes, scales, zero_points = quantize_blocks(weight, block_size, symmetric=True)
    restored = dequantize_blocks(codes, scales, zero_points, k)
    step = block_scales(scales, block_size, k)
    assert np.all(zero_points == 8)
    # The value of largest magnitude in each block is code 0 (= -8) and comes back exactly.
    for b in range(-(-k // block_size)):
        rows = slice(b * block_size, (b + 1) * block_size)
        largest = np.abs(weight[rows]).argmax(axis=0)
        np.testing.assert_array_equal(codes[np.arange(n), b * block_size + largest], 0)
        np.testing.assert_array_equal(
            restored[rows][largest, np.arange(n)], weight[rows][largest, np.arange(n)]
        )
    # Within the grid's span the error is at most half a step; past its +7 end (the other sign
    # can reach +8 steps) at most one step.
    error = np.abs(restored - weight)
    signed_scale = np.repeat(scales, block_size, axis=1)[:, :k].T
    inside = weight / signed_scale <= 7.5
    assert np.all(error[inside] <= step[inside] * (0.5 + 1e-6))
    assert np.all(error <= step * (1 + 1e-6))


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_blocks_get_a_usable_scale_and_zero_is_exact(symmetric):
    weight = floats(64, 4)
    weight[:32, 0] = 0.0  # a whole block of zeros
    weight[40:44, 1] = 0.0  # zeros inside a block
    codes, scales, zero_points = quantize_blocks(weight, 32, symmetric)
    assert np.all(np.isfinite(scales)) and np.all(scales != 0)
    restored = dequantize_blocks(codes, scales, zero_points, 64)
    assert np.all(restored[:32, 0] == 0.0) and np.all(restored[40:44, 1] == 0.0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "n", "block_size"), [(64, 64, 32), (33, 7, 16), (100, 5, 32), (40, 3, 64)])
def test_same_codes_and_scales_as_onnxruntimes_block_quantizer(symmetric, k, n, block_size):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    weight = floats(k, n)
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    ort_b = np.zeros((n, blocks, block_size // 2), np.uint8)
    ort_scales = np.zeros((n, blocks), np.float32)
    ort_zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(ort_b, padded, ort_scales, ort_zero_points, block_size, n, len(padded), symmetric)

    codes, scales, zero_points = quantize_blocks(weight, block_size, symmetric)
    np.testing.assert_array_equal(packed_weight(codes, block_size), ort_b)
    np.testing.assert_array_equal(scales, ort_scales)
    if not symmetric:  # ONNX Runtime fills the unused nibble of an odd block count with 8
        np.testing.assert_array_equal(unpack_nibbles(ort_zero_points, blocks), zero_points)


def test_a_short_k_gets_the_smallest_block_that_holds_it_with_the_same_numbers():
    weight = floats(40, 6)
    assert fitted_block_size(40, 128) == 64 and fitted_block_size(40, 32) == 32
    assert fitted_block_size(5, 32) == 16 and fitted_block_size(256, 128) == 128
    wide = quantize_blocks(weight, 128, symmetric=True)
    fitted = quantize_blocks(weight, 64, symmetric=True)
    np.testing.assert_array_equal(dequantize_blocks(*wide, 40), dequantize_blocks(*fitted, 40))


def test_valid_block_sizes():
    assert [b for b in (0, 8, 16, 24, 32, 48, 64, 128, 256) if is_valid_block_size(b)] == [
        16,
        32,
        64,
        128,
        256,
    ]


# ------------------------------------------------------------- ONNX Runtime's MatMulNBits


def matmul_nbits_model(a_shape, weight, block_size, symmetric, bias=None) -> onnx.ModelProto:
    """One MatMulNBits node holding `weight` [K, N], built by hand from the int4 functions."""
    k, n = weight.shape
    codes, scales, zero_points = quantize_blocks(weight, block_size, symmetric)
    inits = [
        numpy_helper.from_array(packed_weight(codes, block_size), "b"),
        numpy_helper.from_array(scales, "s"),
    ]
    inputs = ["a", "b", "s"]
    if not symmetric:
        inits.append(numpy_helper.from_array(pack_nibbles(zero_points), "zp"))
        inputs.append("zp")
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs += [""] * (5 - len(inputs)) + ["bias"]
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("a_shape", "k", "n", "block_size"), [((5, 64), 64, 24, 32), ((2, 3, 40), 40, 7, 16)]
)
def test_onnxruntime_computes_a_times_the_dequantized_weight(symmetric, a_shape, k, n, block_size):
    a_shape = (*a_shape[:-1], k)
    weight, a = floats(k, n), floats(*a_shape)
    model = matmul_nbits_model(list(a_shape), weight, block_size, symmetric)
    got = run_model(model, {"a": a})["y"]
    expected = a @ dequantize_blocks(*quantize_blocks(weight, block_size, symmetric), k)
    assert got.shape == (*a_shape[:-1], n)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_onnxruntime_adds_the_bias_input():
    weight, a, bias = floats(48, 5), floats(3, 48), floats(5)
    model = matmul_nbits_model([3, 48], weight, 16, symmetric=True, bias=bias)
    got = run_model(model, {"a": a})["y"]
    expected = a @ dequantize_blocks(*quantize_blocks(weight, 16, True), 48) + bias
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# -------------------------------------------------------------------------------- GPTQ


def correlated_inputs(rows: int, k: int, seed: int) -> np.ndarray:
    """Inputs whose K features share a few strong directions, as real layer inputs do."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((8, k))
    return (rng.standard_normal((rows, 8)) @ mixing + 0.1 * rng.standard_normal((rows, k))).astype(np.float32)


def output_error(x: np.ndarray, weight: np.ndarray, quantized) -> float:
    """Σ‖X·W - X·Ŵ‖² in float64: the error GPTQ minimises."""
    restored = dequantize_blocks(*quantized, weight.shape[0]).astype(np.float64)
    return float(np.sum((x.astype(np.float64) @ (weight - restored)) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block_size"), [(64, 32), (200, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(symmetric, k, block_size):
    weight = floats(k, 16)
    calibration, held_out = correlated_inputs(512, k, seed=1), correlated_inputs(512, k, seed=2)
    hessian = calibration.T.astype(np.float64) @ calibration
    rtn = quantize_blocks(weight, block_size, symmetric)
    with_gptq = gptq(weight, hessian, block_size, symmetric)
    assert with_gptq[0].shape == rtn[0].shape and with_gptq[1].shape == rtn[1].shape
    assert output_error(held_out, weight, with_gptq) < 0.25 * output_error(held_out, weight, rtn)


def test_gptq_with_an_identity_hessian_is_rtn():
    # Uncorrelated inputs of equal energy: no error is worth moving, so every code is RTN's.
    weight = floats(96, 8)
    for expected, got in zip(
        quantize_blocks(weight, 32, True), gptq(weight, np.eye(96), 32, True), strict=True
    ):
        np.testing.assert_array_equal(got, expected)


def test_gptq_drops_inputs_that_never_fire():
    weight = floats(64, 4)
    x = correlated_inputs(256, 64, seed=3)
    x[:, 10:20] = 0.0
    codes, scales, zero_points = gptq(weight, x.T.astype(np.float64) @ x, 32, symmetric=False)
    restored = dequantize_blocks(codes, scales, zero_points, 64)
    assert np.all(restored[10:20] == 0.0) and np.all(np.isfinite(restored))


def test_gptq_pads_an_odd_k_with_codes_for_zero():
    x = correlated_inputs(128, 40, seed=4)
    codes, _, zero_points = gptq(floats(40, 3), x.T.astype(np.float64) @ x, 32, symmetric=False)
    assert codes.shape == (3, 64)
    np.testing.assert_array_equal(codes[:, 40:], np.repeat(zero_points[:, -1:], 24, axis=1))


# ----------------------------------------------------------------------------- Hessians


def two_layer_model(k: int, hidden: int) -> tuple[onnx.ModelProto, np.ndarray]:
    w1 = floats(k, hidden)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(floats(hidden, 4), "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w1


def test_streamed_hessians_equal_xtx_computed_at_once():
    model, w1 = two_layer_model(k=12, hidden=20)
    batches = [{"x": floats(b, 3, 12)} for b in (2, 5, 1)]
    found = collect_hessians(model, batches, ["x", "r"])
    x = np.concatenate([b["x"] for b in batches]).reshape(-1, 12)
    r = np.concatenate([run_model(make_session(model_with_output(model, "r")), b)["r"] for b in batches])
    r = r.reshape(-1, 20).astype(np.float64)
    assert found["x"][1] == found["r"][1] == 24  # 8 samples x 3 positions
    np.testing.assert_allclose(found["x"][0], x.T.astype(np.float64) @ x, rtol=1e-12)
    np.testing.assert_allclose(found["r"][0], r.T @ r, rtol=1e-10)
    relu = np.maximum(x @ w1, 0).astype(np.float64)  # and r really is the layer input
    np.testing.assert_allclose(found["r"][0], relu.T @ relu, rtol=1e-4)


def model_with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return exposed


def test_hessian_rejects_an_activation_of_another_width():
    hessian = Hessian(8)
    hessian.add(floats(2, 8))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 8\]"):
        hessian.add(floats(2, 9))
    assert hessian.rows == 2
