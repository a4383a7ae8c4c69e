"""The ai.polaris references against independent dense NumPy (and ONNX Runtime) computations.

The sparse arrays here are encoded by this file's own small encoders, written from the layout
in docs/OPS.md, not by polaris_opt.sparse: so the references (which decode with the formats
module) are checked against the specification, and one test checks that the formats module's
encoder agrees. Shapes are odd, rows empty or fully dense, sparsity 0 % and 99 %, batches 1 and
more, leading axes several.

The case builders (`sparse_case`, `conv_case`, `quant_case`, `int4_case`) are shared with
test_lowering.py and test_ops_schemas.py.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.errors import BadInput
from polaris_opt.numerics import run_model
from polaris_opt.ops import DOMAIN, OPSET_VERSION, register_schemas
from polaris_opt.ops.reference import MAX_QUANT_K, REFERENCES, quantize_dynamic
from polaris_opt.sparse.formats import from_dense

U = 2.0**-24  # float32 unit roundoff


@dataclass
class Case:
    """One op application: inputs in order (X first), attributes, and the independently computed Y.

    `magnitude` is Σ|terms| + |bias| per output element: float32 results may differ from the
    exact value by a few units of roundoff times it, whatever order sums them.
    """

    op_type: str
    inputs: list
    attrs: dict
    expected: np.ndarray
    magnitude: np.ndarray
    names: list = field(default_factory=list)

    def reference(self) -> np.ndarray:
        return REFERENCES[self.op_type](self.inputs, self.attrs)


def assert_close(got: np.ndarray, case: Case, relative: float) -> None:
    """|got − expected| <= relative · magnitude, element by element."""
    assert got.shape == case.expected.shape and got.dtype == np.float32
    error = np.abs(got.astype(np.float64) - case.expected)
    bound = relative * case.magnitude + 1e-30
    worst = np.unravel_index(np.argmax(error / bound), error.shape) if error.size else ()
    assert np.all(error <= bound), f"error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


# ------------------------------------------------------------------------ weights, encoders


def random_weight(rng, n: int, k: int, sparsity: float) -> np.ndarray:
    """A sparse W with an empty row, a dense row and a row whose one entry is in column 0
    (SELL pads that row with column-0 zeros, which must not overwrite it)."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < sparsity] = 0
    if n >= 2:
        w[1] = 0
    if n >= 3:
        w[2] = rng.standard_normal(k)
    if n >= 4:
        w[3] = 0
        w[3, 0] = 1.5
    return w


def stored_values(w: np.ndarray, values: str) -> tuple[np.ndarray, np.ndarray | None]:
    """W as stored (zeros where absent) and the int8 per-row scale (max|row| / 127, 1.0 if empty)."""
    if values == "fp32":
        return w, None
    if values == "fp16":
        return w.astype(np.float16), None
    peak = np.abs(w).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(127), 1).astype(np.float32)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


def encode(stored: np.ndarray, fmt: str, block=(1, 1), slice_height=0, index=np.int32):
    """data, indices, indptr of `stored` [N, K] in `fmt`, written from the layout in docs/OPS.md."""
    n, k = stored.shape
    if fmt == "csr":
        rows = [np.flatnonzero(row) for row in stored]
        data = np.concatenate([stored[r, cols] for r, cols in enumerate(rows)])
        return data, np.concatenate(rows).astype(index), _offsets(len(cols) for cols in rows)
    if fmt == "bsr":
        r, c = block
        padded = np.zeros((-(-n // r) * r, -(-k // c) * c), stored.dtype)
        padded[:n, :k] = stored
        blocks, columns, counts = [], [], []
        for br in range(padded.shape[0] // r):
            kept = [
                bc
                for bc in range(padded.shape[1] // c)
                if padded[br * r : br * r + r, bc * c : bc * c + c].any()
            ]
            blocks += [padded[br * r : br * r + r, bc * c : bc * c + c] for bc in kept]
            columns += kept
            counts.append(len(kept))
        data = np.array(blocks, stored.dtype).reshape(-1, r, c)
        return data, np.array(columns, index), _offsets(counts)
    height = slice_height
    slices = -(-n // height)
    rows = [np.flatnonzero(row) for row in stored] + [np.array([], int)] * (slices * height - n)
    data, indices, sizes = [], [], []
    for s in range(slices):
        width = max(len(rows[s * height + r]) for r in range(height))
        values, columns = np.zeros(width * height, stored.dtype), np.zeros(width * height, index)
        for r in range(height):
            for j, col in enumerate(rows[s * height + r]):  # element j of row r at j·C + r
                values[j * height + r], columns[j * height + r] = stored[s * height + r, col], col
        data.append(values)
        indices.append(columns)
        sizes.append(width * height)
    return np.concatenate(data), np.concatenate(indices), _offsets(sizes)


def _offsets(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(list(counts))]).astype(np.int32)


def sparse_attrs(fmt: str, shape, block=(1, 1), slice_height=0, activation="none", **extra) -> dict:
    attrs = {"format": fmt, "shape": list(shape), "activation": activation, **extra}
    if fmt == "bsr":
        attrs["block"] = list(block)
    if fmt == "sell":
        attrs["slice_height"] = slice_height
    return attrs


FORMAT_LAYOUTS = [
    ("csr", {}),
    ("bsr", {"block": (4, 4)}),
    ("bsr", {"block": (2, 3)}),
    ("sell", {"slice_height": 4}),
]
FORMAT_LAYOUTS += [("sell", {"slice_height": 64}), ("sell", {"slice_height": 1})]  # ELL (C >= N), and C = 1


# ------------------------------------------------------------------------------ cases


def sparse_case(
    rng, fmt, layout, values, n, k, sparsity, batch, *, bias=True, activation="none", index=np.int32
) -> Case:
    w = random_weight(rng, n, k, sparsity)
    stored, scale = stored_values(w, values)
    dense = stored.astype(np.float32) * (scale[:, None] if scale is not None else 1)
    data, indices, indptr = encode(stored, fmt, index=index, **layout)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    x = rng.standard_normal((*batch, k)).astype(np.float32)
    exact = x.astype(np.float64) @ dense.T.astype(np.float64) + (b if bias else 0)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(dense).T + (np.abs(b) if bias else 0)
    if activation == "relu":
        exact = np.maximum(exact, 0)
    attrs = sparse_attrs(fmt, (n, k), activation=activation, **layout)
    return Case("SparseMatMul", [x, data, indices, indptr, b, scale], attrs, exact, magnitude)


def direct_conv(x: np.ndarray, w: np.ndarray, pads, strides, dilations) -> np.ndarray:
    """Conv one output pixel at a time (float64): a window of X against every filter."""
    kh, kw = w.shape[2:]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (padded.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (padded.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((len(x), len(w), out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            top, left = i * strides[0], j * strides[1]
            window = padded[:, :, top : top + dilations[0] * (kh - 1) + 1 : dilations[0]]
            window = window[:, :, :, left : left + dilations[1] * (kw - 1) + 1 : dilations[1]]
            y[:, :, i, j] = np.einsum("bcij,ocij->bo", window, w)
    return y


def conv_case(
    rng,
    fmt,
    layout,
    values,
    *,
    batch=2,
    channels=3,
    out_channels=5,
    size=(7, 6),
    kernel=(3, 3),
    pads=(1, 1, 1, 1),
    strides=(1, 1),
    dilations=(1, 1),
    sparsity=0.7,
    activation="relu",
) -> Case:
    reduction = channels * kernel[0] * kernel[1]
    w = random_weight(rng, out_channels, reduction, sparsity)
    stored, scale = stored_values(w, values)
    dense = stored.astype(np.float32) * (scale[:, None] if scale is not None else 1)
    data, indices, indptr = encode(stored, fmt, **layout)
    b = rng.standard_normal(out_channels).astype(np.float32)
    x = rng.standard_normal((batch, channels, *size)).astype(np.float32)
    filters = dense.reshape(out_channels, channels, *kernel)
    exact = direct_conv(x, filters, pads, strides, dilations) + b[:, None, None]
    magnitude = direct_conv(np.abs(x), np.abs(filters), pads, strides, dilations) + np.abs(b)[:, None, None]
    if activation == "relu":
        exact = np.maximum(exact, 0)
    conv = {
        "kernel_shape": list(kernel),
        "pads": list(pads),
        "strides": list(strides),
        "dilations": list(dilations),
    }
    attrs = sparse_attrs(fmt, (out_channels, reduction), activation=activation, **layout, **conv)
    return Case("SparseConv", [x, data, indices, indptr, b, scale], attrs, exact, magnitude)


def quant_case(rng, op_type, static, n, k, batch, *, alpha=1.0, bias=True, activation="none", x=None) -> Case:
    """QMatMul/QGemm; the expected Y from integer arithmetic (int64) and, for dynamic, ORT's
    DynamicQuantizeLinear parameters (an independent implementation of that rounding)."""
    w_q = rng.integers(-128, 128, size=(n, k)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    x = rng.standard_normal((*batch, k)).astype(np.float32) * 3 if x is None else x
    if static:
        x_scale, x_zero_point = np.float32(0.05), np.uint8(rng.integers(100, 156))
        x_q = np.clip(np.round(x / x_scale) + x_zero_point, 0, 255)
    else:
        x_q, x_scale, x_zero_point = ort_dynamic_quantize(x)
    acc = (x_q.astype(np.int64) - int(x_zero_point)).reshape(-1, k) @ w_q.astype(np.int64).T
    multiplier = np.float32(alpha) * np.float32(x_scale) * w_scale
    y = (acc.astype(np.float32) * multiplier).reshape(*batch, n) + (b if bias else np.float32(0))
    terms = np.abs(x_q.astype(np.int64) - int(x_zero_point)).reshape(-1, k) @ np.abs(w_q.astype(np.int64)).T
    magnitude = (terms * np.abs(multiplier)).reshape(*batch, n) + (np.abs(b) if bias else 0)
    if activation == "relu":
        y = np.maximum(y, 0)
    inputs = [x, w_q, w_scale, b]
    if static:
        inputs += [np.array(x_scale, np.float32), np.array(x_zero_point, np.uint8)]
    attrs = {"activation": activation, **({"alpha": alpha} if op_type == "QGemm" else {})}
    return Case(op_type, inputs, attrs, y.astype(np.float64), magnitude)


def ort_dynamic_quantize(x: np.ndarray):
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(name, kind, None) for name, kind in (("q", 2), ("s", 1), ("z", 2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = run_model(model, {"x": x})
    return out["q"], out["s"], out["z"]


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), codes.dtype)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def int4_case(rng, n, k, block_size, batch, *, zero_points=True, bias=True) -> Case:
    blocks = -(-k // block_size)
    codes = rng.integers(0, 16, size=(n, blocks * block_size)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    points = (
        rng.integers(0, 16, (n, blocks)).astype(np.uint8)
        if zero_points
        else np.full((n, blocks), 8, np.uint8)
    )
    block_of = np.arange(k) // block_size
    w = (codes[:, :k].astype(np.float64) - points[:, block_of]) * scales[:, block_of]
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    x = rng.standard_normal((*batch, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T + (b if bias else 0)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w).T + (np.abs(b) if bias else 0)
    inputs = [
        x,
        pack_codes(codes.reshape(n, blocks, block_size)),
        scales,
        pack_codes(points) if zero_points else None,
        b,
    ]
    return Case("MatMulInt4", inputs, {"K": k, "N": n, "block_size": block_size}, exact, magnitude)


def case_model(case: Case, batch_names: bool = True) -> onnx.ModelProto:
    """A model running `case`'s op: X a graph input (leading axes symbolic), the rest initializers."""
    names = ["X", "data", "indices", "indptr", "bias", "scale"]
    if case.op_type in ("QMatMul", "QGemm"):
        names = ["X", "w_q", "w_scale", "bias", "x_scale", "x_zero_point"]
    if case.op_type == "MatMulInt4":
        names = ["X", "w_packed", "scales", "zero_points", "bias"]
    inputs = [name if value is not None else "" for name, value in zip(names, case.inputs, strict=False)]
    while inputs and not inputs[-1]:
        inputs.pop()
    inits = [
        numpy_helper.from_array(np.asarray(v), name)
        for name, v in zip(names[1:], case.inputs[1:], strict=False)
        if v is not None
    ]
    x_shape = list(case.inputs[0].shape)
    y_shape = list(case.expected.shape)
    if batch_names:
        x_shape[0] = y_shape[0] = "batch"
    attrs = {key: value for key, value in case.attrs.items()}
    node = helper.make_node(
        case.op_type, inputs, ["Y"], name=f"{case.op_type.lower()}0", domain=DOMAIN, **attrs
    )
    graph = helper.make_graph(
        [node],
        "polaris",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


register_schemas()

# Float32 results against the exact value: X·Wᵀ of K terms is within about K·u of it; 1e-5 of
# the magnitude leaves room for K up to ~100 and any summation order.
FP32_RELATIVE = 1e-5
SPARSE_SHAPES = [
    (1, 1, 0.0, (1,)),
    (7, 13, 0.0, (5,)),
    (33, 65, 0.99, (1,)),
    (9, 40, 0.6, (2, 3)),
    (70, 17, 0.8, (4,)),
]


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("fmt, layout", FORMAT_LAYOUTS)
def test_sparse_matmul_equals_dense_product(fmt, layout, values):
    rng = np.random.default_rng(zlib.crc32(f"{fmt}{layout}{values}".encode()))
    for n, k, sparsity, batch in SPARSE_SHAPES:
        case = sparse_case(rng, fmt, layout, values, n, k, sparsity, batch, activation="relu")
        assert_close(case.reference(), case, FP32_RELATIVE)


def test_sparse_matmul_without_bias_and_with_uint16_indices():
    rng = np.random.default_rng(1)
    for fmt, layout in FORMAT_LAYOUTS:
        case = sparse_case(rng, fmt, layout, "fp32", 12, 30, 0.5, (3,), bias=False, index=np.uint16)
        assert case.inputs[2].dtype == np.uint16
        assert_close(case.reference(), case, FP32_RELATIVE)


@pytest.mark.parametrize("fmt, layout", FORMAT_LAYOUTS[:4])
def test_formats_module_encodes_what_the_reference_reads(fmt, layout):
    """polaris_opt.sparse.from_dense (what sparsify writes) and this file's encoder agree."""
    rng = np.random.default_rng(7)
    w = random_weight(rng, 21, 37, 0.7)
    x = rng.standard_normal((2, 37)).astype(np.float32)
    stored, scale = stored_values(w, "int8")
    ours = [x, *encode(stored, fmt, **layout), None, scale]
    m = from_dense(w, fmt, values="int8", index="int32", **layout)
    theirs = [x, m.data, m.indices, m.indptr, None, m.scale]
    attrs = sparse_attrs(fmt, (21, 37), **layout)
    for ours_array, their_array in zip(ours[1:4], theirs[1:4], strict=True):
        np.testing.assert_array_equal(ours_array, their_array)
    np.testing.assert_allclose(m.scale, scale, rtol=1e-7)
    reference = REFERENCES["SparseMatMul"]
    np.testing.assert_allclose(reference(theirs, attrs), reference(ours, attrs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        {},
        {"kernel": (1, 1), "pads": (0, 0, 0, 0)},
        {"kernel": (3, 2), "pads": (2, 0, 1, 1), "strides": (2, 1)},
        {"kernel": (2, 3), "dilations": (2, 1), "strides": (1, 2), "size": (9, 8)},
        {"batch": 1, "channels": 1, "out_channels": 1, "sparsity": 0.0},
        {"sparsity": 0.99, "activation": "none"},
    ],
)
@pytest.mark.parametrize(
    "fmt, layout, values",
    [("csr", {}, "fp32"), ("bsr", {"block": (2, 3)}, "fp16"), ("sell", {"slice_height": 2}, "int8")],
)
def test_sparse_conv_equals_direct_convolution(fmt, layout, values, conv):
    case = conv_case(np.random.default_rng(3), fmt, layout, values, **conv)
    assert_close(case.reference(), case, FP32_RELATIVE)


@pytest.mark.parametrize("op_type", ["QMatMul", "QGemm"])
@pytest.mark.parametrize("static", [True, False])
def test_quantized_matmul_equals_integer_arithmetic(op_type, static):
    rng = np.random.default_rng(5)
    shapes = [(1, 1, (1,)), (7, 33, (5,)), (16, 100, (1,))] + (
        [] if op_type == "QGemm" else [(3, 20, (2, 4))]
    )
    for n, k, batch in shapes:
        for activation in ("none", "relu"):
            alpha = 0.5 if op_type == "QGemm" else 1.0
            case = quant_case(rng, op_type, static, n, k, batch, alpha=alpha, activation=activation)
            got = case.reference()
            # Same integer sum, same float32 operations: equal to the bit.
            np.testing.assert_array_equal(got, case.expected.astype(np.float32))


def test_static_quantization_rounds_half_to_even():
    """x / x_scale = 0.5, 1.5, 2.5, -0.5, -1.5 round to 0, 2, 2, -0, -2 (QuantizeLinear's ties)."""
    x = np.array([[0.25, 0.75, 1.25, -0.25, -0.75, 200.0, -200.0]], np.float32)
    k = x.shape[1]
    w_q, w_scale = np.eye(k, dtype=np.int8), np.ones(k, np.float32)
    inputs = [x, w_q, w_scale, None, np.array(0.5, np.float32), np.array(10, np.uint8)]
    y = REFERENCES["QMatMul"](inputs, {})
    # (x_q − zp)·x_scale with x_q clipped to 0..255: 200/0.5 + 10 saturates at 255, −200 at 0.
    np.testing.assert_array_equal(y, [[0.0, 1.0, 1.0, 0.0, -1.0, 122.5, -5.0]])


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((2, 5)),
        np.full((1, 4), 3.0),
        -np.abs(np.random.default_rng(0).standard_normal((3, 9))),
        np.empty((0, 4)),
    ],
    ids=["zeros", "positive", "negative", "empty"],
)
def test_dynamic_quantization_matches_onnxruntime(x):
    x = x.astype(np.float32)
    q, scale, zero_point = quantize_dynamic(x)
    if x.size:
        ort_q, ort_scale, ort_zero_point = ort_dynamic_quantize(x)
        np.testing.assert_array_equal(q, ort_q)
        assert scale == ort_scale and zero_point == ort_zero_point
    else:
        assert (scale, zero_point) == (1.0, 0) and q.shape == (0, 4)


def test_qgemm_alpha_scales_the_product():
    x = np.array([[1.0, -2.0]], np.float32)
    inputs = [x, np.array([[2, 1]], np.int8), np.array([0.5], np.float32), np.array([1.0], np.float32)]
    inputs += [np.array(1.0, np.float32), np.array(128, np.uint8)]
    # x_q − zp = x: acc = 1·2 + (−2)·1 = 0 → Y = bias; then x = [3, 1]: acc = 7, Y = 0.25·7·1·0.5 + 1.
    assert REFERENCES["QGemm"](inputs, {"alpha": 0.25}).tolist() == [[1.0]]
    inputs[0] = np.array([[3.0, 1.0]], np.float32)
    assert REFERENCES["QGemm"](inputs, {"alpha": 0.25}).tolist() == [[0.25 * 7 * 0.5 + 1.0]]


@pytest.mark.parametrize("zero_points", [True, False])
@pytest.mark.parametrize(
    "n, k, block_size, batch",
    [(1, 16, 16, (1,)), (5, 50, 16, (3,)), (8, 64, 32, (2, 2)), (3, 100, 128, (1,))],
)
def test_matmul_int4_equals_dequantized_product(n, k, block_size, batch, zero_points):
    case = int4_case(np.random.default_rng(k), n, k, block_size, batch, zero_points=zero_points)
    assert_close(case.reference(), case, FP32_RELATIVE)


def test_matmul_int4_layout_is_onnxruntime_matmulnbits():
    """The same packed arrays give the same Y in ORT's com.microsoft.MatMulNBits."""
    case = int4_case(np.random.default_rng(11), 6, 70, 32, (4,))
    x, packed, scales, points, bias = case.inputs
    node = helper.make_node(
        "MatMulNBits",
        ["X", "B", "scales", "zp", "", "bias"],
        ["Y"],
        domain="com.microsoft",
        K=70,
        N=6,
        bits=4,
        block_size=32,
        accuracy_level=1,
    )
    inits = [
        numpy_helper.from_array(v, name)
        for name, v in (("B", packed), ("scales", scales), ("zp", points), ("bias", bias))
    ]
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 70])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 6])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    ort_y = run_model(helper.make_model(graph, opset_imports=opsets, ir_version=8), {"X": x})["Y"]
    assert_close(ort_y, case, 1e-5)
    assert_close(case.reference(), case, FP32_RELATIVE)


# ------------------------------------------------------------------------------ bad input


def _sparse_inputs():
    case = sparse_case(np.random.default_rng(0), "csr", {}, "fp32", 6, 10, 0.5, (2,))
    return case.inputs, case.attrs


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, a: a.update(format="coo"), "unknown format 'coo'"),
        (lambda i, a: a.update(shape=[7, 10]), "indptr must be int32 [8]"),
        (lambda i, a: a.update(shape=[6, 11]), "X must be [..., K] with K = 11"),
        (lambda i, a: a.update(activation="gelu"), "unknown activation 'gelu'"),
        (lambda i, a: a.update(format="bsr", block=[0, 2]), "bsr needs block [R, C] with R, C >= 1"),
        (lambda i, a: a.update(format="sell"), "sell needs slice_height >= 1"),
        (lambda i, a: a.update(stride=2), "unknown attribute 'stride'"),
        (lambda i, a: a.pop("shape"), "attribute 'shape' is required"),
        (lambda i, a: i.__setitem__(3, i[3][::-1].copy()), "indptr must run from 0"),
        (lambda i, a: i.__setitem__(2, i[2] + 10), "an index lies outside 0..9"),
        (lambda i, a: i.__setitem__(2, i[2][::-1].copy()), "strictly ascending within each row"),
        (lambda i, a: i.__setitem__(1, i[1].astype(np.float64)), "data dtype float64"),
        (lambda i, a: i.__setitem__(5, np.ones(6, np.float32)), "a per-row scale goes with int8 values"),
        (lambda i, a: i.__setitem__(4, np.ones(5, np.float32)), "bias must have shape [6]"),
    ],
)
def test_bad_sparse_input_is_a_clear_error(change, message):
    inputs, attrs = _sparse_inputs()
    change(inputs, attrs)
    with pytest.raises(BadInput, match=_escaped(message)):
        REFERENCES["SparseMatMul"](inputs, attrs)


def test_decreasing_indptr_and_bad_sell_slices_are_refused():
    inputs, attrs = _sparse_inputs()
    indptr = inputs[3].copy()
    indptr[2], indptr[3] = indptr[3], indptr[2]
    inputs[3] = indptr
    with pytest.raises(BadInput, match="indptr decreases"):
        REFERENCES["SparseMatMul"](inputs, attrs)
    stored = stored_values(random_weight(np.random.default_rng(0), 6, 10, 0.5), "fp32")[0]
    data, indices, slices = encode(stored, "sell", slice_height=4)
    attrs = sparse_attrs("sell", (6, 10), slice_height=4)
    x = np.ones((1, 10), np.float32)
    with pytest.raises(BadInput, match="whole number of columns of 4"):
        REFERENCES["SparseMatMul"]([x, data[:-1], indices[:-1], slices - np.int32([0, 0, 1])], attrs)
    data = data.copy()
    data[-1] = 1.0  # entry of row 7 of the last slice: past N = 6, padding
    with pytest.raises(BadInput, match="rows that pad the last slice"):
        REFERENCES["SparseMatMul"]([x, data, indices, slices], attrs)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.__setitem__(0, i[0][0]), "SparseConv: X must be [B, C, H, W]; got shape (3, 7, 6)"),
        (lambda i: i.__setitem__(0, i[0][:, :2]), "X has 2 channels; shape[1] = 27 needs 3"),
        (
            lambda i: i.__setitem__(0, i[0][:, :, :2, :2]),
            "kernel [3, 3] does not fit X of shape [2, 3, 2, 2]",
        ),
        (lambda i: i.__setitem__(2, None), "data, indices and indptr are all required"),
    ],
)
def test_bad_conv_input_is_a_clear_error(change, message):
    case = conv_case(np.random.default_rng(0), "csr", {}, "fp32", pads=(0, 0, 0, 0))
    change(case.inputs)
    with pytest.raises(BadInput, match=_escaped(message)):
        case.reference()


@pytest.mark.parametrize(
    "op_type, change, message",
    [
        ("QMatMul", lambda i: i.__setitem__(5, None), "x_scale and x_zero_point go together"),
        ("QMatMul", lambda i: i.__setitem__(4, np.array(-1.0, np.float32)), "x_scale must be positive"),
        ("QMatMul", lambda i: i.__setitem__(5, np.array(3, np.int8)), "x_zero_point must be one uint8"),
        ("QMatMul", lambda i: i.__setitem__(1, i[1].astype(np.int32)), "w_q must be int8 [N, K]"),
        ("QMatMul", lambda i: i.__setitem__(2, i[2][:-1]), "w_scale must have shape [4]"),
        ("QMatMul", lambda i: i.__setitem__(0, i[0][:, :-1]), "X must be [..., K] with K = 9"),
        ("QGemm", lambda i: i.__setitem__(0, i[0][None]), "X must be 2-D [M, K]"),
    ],
)
def test_bad_quantized_input_is_a_clear_error(op_type, change, message):
    case = quant_case(np.random.default_rng(0), op_type, True, 4, 9, (3,))
    change(case.inputs)
    with pytest.raises(BadInput, match=_escaped(message)):
        REFERENCES[op_type](case.inputs, case.attrs)


def test_quantized_k_beyond_int32_accumulation_is_refused():
    k = MAX_QUANT_K + 1
    inputs = [np.zeros((1, k), np.float32), np.zeros((1, k), np.int8), np.ones(1, np.float32)]
    with pytest.raises(BadInput, match="int32 accumulation could overflow"):
        REFERENCES["QMatMul"](inputs, {})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, a: a.update(block_size=24), "block_size must be a power of two >= 16"),
        (lambda i, a: a.update(K=60), "X must be [..., K] with K = 60"),
        (lambda i, a: a.update(N=4), "w_packed must be uint8 [4, 4, 8]"),
        (lambda i, a: i.__setitem__(2, i[2][:, :-1]), "scales must be float32 [5, 4]"),
        (lambda i, a: i.__setitem__(3, i[3][:, :1]), "zero_points must be uint8 [5, 2]"),
    ],
)
def test_bad_int4_input_is_a_clear_error(change, message):
    case = int4_case(np.random.default_rng(0), 5, 50, 16, (2,))
    change(case.inputs, case.attrs)
    with pytest.raises(BadInput, match=_escaped(message)):
        case.reference()


def _escaped(message: str) -> str:
    return re.escape(message)


# ------------------------------------------------------------------------------ docs/OPS.md


def ops_md_examples() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "OPS.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_ops_md_examples_run():
    """Every Python block of the specification runs and its assertions hold."""
    examples = ops_md_examples()
    assert len(examples) >= 6
    for example in examples:
        exec(compile(example, "docs/OPS.md", "exec"), {})
