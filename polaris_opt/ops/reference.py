"""NumPy references of the ai.polaris ops: each function *is* its op's semantics (docs/OPS.md).

`REFERENCES[op_type](inputs, attrs)` takes the node's inputs in order (None, or a shorter list,
for absent optional ones) and its attributes (as `polaris_opt.ops.attributes` gives them, or
raw: they are completed here) and returns Y. The runtime shim runs these on the host, the
kernels' tests compare against them, and the lowering builds its weights with the same helpers
(`sparse_weight`, `int8_weight`, `int4_weight`), so "lowering == reference" holds by
construction for the weights and by test for the rest.

Float results are computed in float32, as the kernels do. The integer product of QMatMul/QGemm
is computed exactly: float64 BLAS on integers below 2^53 is exact and much faster than NumPy's
integer matmul, and MAX_QUANT_K keeps it within int32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from polaris_opt.errors import BadInput
from polaris_opt.int4 import SYMMETRIC_ZERO_POINT, dequantize_blocks, unpack_nibbles
from polaris_opt.ops import complete_attributes
from polaris_opt.sparse.formats import SparseMatrix, to_dense

Inputs = list  # of np.ndarray | None, in the op's input order
UINT8_MAX = 255
# |x_q - zp| <= 255 and |w_q| <= 128: a sum of up to MAX_QUANT_K such products fits int32.
MAX_QUANT_K = (2**31 - 1) // (UINT8_MAX * 128)


# ------------------------------------------------------------------------------ the ops


def sparse_matmul(inputs: Inputs, attrs: dict) -> np.ndarray:
    """Y = act(X·Wᵀ + bias), X [..., K], W [N, K] sparse."""
    attrs = complete_attributes("SparseMatMul", attrs)
    x, _, _, _, bias, _ = _padded(inputs, 6)
    weight = sparse_weight(inputs, attrs)
    x = _activations(x, weight.shape[1], "SparseMatMul")
    y = (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
    return _finish(y, bias, weight.shape[0], attrs["activation"], "SparseMatMul")


def sparse_conv(inputs: Inputs, attrs: dict) -> np.ndarray:
    """Y = act(Conv(X, W) + bias), group 1: im2col patches [B, C·kh·kw, OH·OW], then W·patches."""
    attrs = complete_attributes("SparseConv", attrs)
    x, _, _, _, bias, _ = _padded(inputs, 6)
    weight = sparse_weight(inputs, attrs)
    patches, (out_h, out_w) = conv_patches(x, attrs)
    y = np.matmul(weight, patches).reshape(len(patches), weight.shape[0], out_h, out_w)
    if bias is not None:
        y += checked_bias(bias, weight.shape[0], "SparseConv")[:, None, None]
    return np.maximum(y, np.float32(0)) if attrs["activation"] == "relu" else y


def qmatmul(inputs: Inputs, attrs: dict) -> np.ndarray:
    """Y = act(acc·x_scale·w_scale[n] + bias[n]), acc = Σ_k (x_q − zp)·w_q[n, k] in int32."""
    return _quantized(inputs, complete_attributes("QMatMul", attrs), alpha=1.0, op="QMatMul")


def qgemm(inputs: Inputs, attrs: dict) -> np.ndarray:
    """QMatMul on X [M, K] with Gemm's alpha: Y = act(alpha·acc·x_scale·w_scale[n] + bias[n])."""
    attrs = complete_attributes("QGemm", attrs)
    x = inputs[0]
    if x is None or np.ndim(x) != 2:
        raise BadInput(f"QGemm: X must be 2-D [M, K]; got shape {np.shape(x)}")
    return _quantized(inputs, attrs, alpha=attrs["alpha"], op="QGemm")


def matmul_int4(inputs: Inputs, attrs: dict) -> np.ndarray:
    """Y = X·Wᵀ + bias, W [N, K] = (code − zero point) · scale per block of K."""
    attrs = complete_attributes("MatMulInt4", attrs)
    x, w_packed, scales, zero_points, bias = _padded(inputs, 5)
    weight = int4_weight(w_packed, scales, zero_points, attrs)
    x = _activations(x, attrs["K"], "MatMulInt4")
    y = (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], attrs["N"])
    return _finish(y, bias, attrs["N"], "none", "MatMulInt4")


REFERENCES: dict[str, Callable[[Inputs, dict], np.ndarray]] = {
    "SparseMatMul": sparse_matmul,
    "SparseConv": sparse_conv,
    "QMatMul": qmatmul,
    "QGemm": qgemm,
    "MatMulInt4": matmul_int4,
}


# --------------------------------------------------------------------------- weights


def sparse_weight(inputs: Inputs, attrs: dict) -> np.ndarray:
    """The dense float32 W [N, K] that a sparse op's data, indices, indptr (and scale) store."""
    _, data, indices, indptr, _, scale = _padded(inputs, 6)
    if data is None or indices is None or indptr is None:
        raise BadInput(f"{attrs['format']} weight: data, indices and indptr are all required")
    matrix = SparseMatrix(
        attrs["format"],
        tuple(attrs["shape"]),
        np.asarray(data),
        np.asarray(indices),
        np.asarray(indptr),
        block=tuple(attrs["block"]),
        slice_height=attrs["slice_height"],
        scale=None if scale is None else np.asarray(scale),
    )
    problem = _entry_problem(matrix)
    if problem:
        raise BadInput(f"{matrix.format} weight of shape {list(matrix.shape)}: {problem}")
    return to_dense(matrix)


def _entry_problem(m: SparseMatrix) -> str | None:
    """What SparseMatrix's layout checks leave to the op: offsets, index ranges, order, padding."""
    rows, cols = m.shape
    value_shape = (m.indices.size, *m.block) if m.format == "bsr" else (m.indices.size,)
    if m.data.shape != value_shape:
        return f"data must have shape {list(value_shape)}; got {list(m.data.shape)}"
    if np.any(np.diff(m.indptr) < 0):
        return "indptr decreases somewhere; offsets must never go down"
    extent = -(-cols // m.block[1]) if m.format == "bsr" else cols
    if m.indices.size and (int(m.indices.min()) < 0 or int(m.indices.max()) >= extent):
        return f"an index lies outside 0..{extent - 1}"
    if m.format == "sell":
        return _sell_problem(m)
    if not _ascending_within_segments(m.indices, m.indptr):
        return "indices must be strictly ascending within each row (each entry stored once)"
    return None


def _sell_problem(m: SparseMatrix) -> str | None:
    height = m.slice_height
    if np.any(np.diff(m.indptr) % height):
        return f"each slice must hold a whole number of columns of {height} entries"
    # The last slice as [width, C]: column r is its row r; rows past N are padding.
    last_slice = m.data[m.indptr[-2] :].reshape(-1, height)
    real_rows = m.shape[0] - (len(m.indptr) - 2) * height
    if np.any(last_slice[:, real_rows:] != 0):
        return "the rows that pad the last slice must hold only zeros"
    return None


def _ascending_within_segments(indices: np.ndarray, indptr: np.ndarray) -> bool:
    steps = np.diff(indices.astype(np.int64)) > 0
    starts = indptr[1:-1].astype(np.int64)
    starts = starts[(starts > 0) & (starts < indices.size)]
    steps[starts - 1] = True  # the step into a new row may go down
    return bool(steps.all())


def int8_weight(w_q: np.ndarray, w_scale: np.ndarray, op: str = "QMatMul") -> np.ndarray:
    """W [N, K] = w_q[n, k] · w_scale[n], float32."""
    _check_int8_weight(w_q, w_scale, op)
    return w_q.astype(np.float32) * np.asarray(w_scale, dtype=np.float32)[:, None]


def _check_int8_weight(w_q, w_scale, op: str) -> None:
    if w_q is None or np.asarray(w_q).dtype != np.int8 or np.ndim(w_q) != 2:
        raise BadInput(f"{op}: w_q must be int8 [N, K]; got {_described(w_q)}")
    _check_vector(w_scale, np.shape(w_q)[0], "w_scale", op)
    if np.shape(w_q)[1] > MAX_QUANT_K:
        raise BadInput(
            f"{op}: K = {np.shape(w_q)[1]} exceeds {MAX_QUANT_K}; int32 accumulation could overflow"
        )


def int4_weight(w_packed, scales, zero_points, attrs: dict) -> np.ndarray:
    """W [N, K] = (code − zero point) · scale, blocks of `block_size` along K (MatMulNBits layout)."""
    k, n, size = attrs["K"], attrs["N"], attrs["block_size"]
    blocks = -(-k // size)
    _check_array(w_packed, np.uint8, (n, blocks, size // 2), "w_packed")
    _check_array(scales, np.float32, (n, blocks), "scales")
    codes = unpack_nibbles(w_packed.reshape(n, -1), blocks * size)
    if zero_points is None:
        points = np.full((n, blocks), SYMMETRIC_ZERO_POINT, dtype=np.uint8)
    else:
        _check_array(zero_points, np.uint8, (n, -(-blocks // 2)), "zero_points")
        points = unpack_nibbles(zero_points, blocks)
    return dequantize_blocks(codes, scales, points, k).T


# ------------------------------------------------------------------ activations, quantization


def quantize_static(x: np.ndarray, x_scale, x_zero_point) -> np.ndarray:
    """x_q = clip(round(x / x_scale) + zp, 0, 255), ties to even: QuantizeLinear's uint8 rounding."""
    scale = np.float32(x_scale)
    return np.clip(np.rint(x / scale) + np.float32(x_zero_point), 0, UINT8_MAX).astype(np.uint8)


def quantize_dynamic(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """DynamicQuantizeLinear: uint8 over the range of all of x widened to hold 0; scale 1 if empty."""
    low = np.minimum(np.float32(0), x.min()) if x.size else np.float32(0)
    high = np.maximum(np.float32(0), x.max()) if x.size else np.float32(0)
    scale = np.float32((high - low) / np.float32(UINT8_MAX))
    if scale == 0:  # x is all zeros: any scale quantizes it to the zero point, 1 is ORT's choice
        scale = np.float32(1)
    zero_point = np.uint8(np.clip(np.rint(-low / scale), 0, UINT8_MAX))
    return quantize_static(x, scale, zero_point), scale, zero_point


def conv_patches(x: np.ndarray, attrs: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """im2col: X [B, C, H, W] -> [B, C·kh·kw, OH·OW], rows in (c, kh, kw) order, and (OH, OW)."""
    if x is None or np.ndim(x) != 4:
        raise BadInput(f"SparseConv: X must be [B, C, H, W]; got shape {np.shape(x)}")
    x = np.asarray(x, dtype=np.float32)
    (kh, kw), pads = attrs["kernel_shape"], attrs["pads"]
    (sh, sw), (dh, dw) = attrs["strides"], attrs["dilations"]
    if x.shape[1] * kh * kw != attrs["shape"][1]:
        raise BadInput(
            f"SparseConv: X has {x.shape[1]} channels; shape[1] = {attrs['shape'][1]} needs "
            f"{attrs['shape'][1] // (kh * kw)} for kernel_shape {[kh, kw]}"
        )
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise BadInput(f"SparseConv: kernel {[kh, kw]} does not fit X of shape {list(x.shape)} with pads")
    taps = [
        padded[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = np.stack(taps, axis=2)  # [B, C, kh·kw, OH, OW]: row c·kh·kw + i·kw + j
    return patches.reshape(len(x), -1, out_h * out_w), (out_h, out_w)


def _quantized(inputs: Inputs, attrs: dict, *, alpha: float, op: str) -> np.ndarray:
    x, w_q, w_scale, bias, x_scale, x_zero_point = _padded(inputs, 6)
    _check_int8_weight(w_q, w_scale, op)
    n, k = w_q.shape
    x = _activations(x, k, op)
    static = static_activation_params(x_scale, x_zero_point, op)
    if static is None:
        x_q, scale, zero_point = quantize_dynamic(x)
    else:
        (scale, zero_point), x_q = static, quantize_static(x, *static)
    centred = x_q.reshape(-1, k).astype(np.float64) - float(zero_point)
    acc = (centred @ w_q.T.astype(np.float64)).astype(np.int32)  # exact: see the module docstring
    multiplier = np.float32(alpha) * scale * np.asarray(w_scale, dtype=np.float32)
    y = (acc.astype(np.float32) * multiplier).reshape(*x.shape[:-1], n)
    return _finish(y, bias, n, attrs["activation"], op)


def static_activation_params(x_scale, x_zero_point, op: str) -> tuple[np.float32, np.uint8] | None:
    """The checked static (x_scale, x_zero_point) of QMatMul/QGemm; None when quantizing dynamically."""
    if (x_scale is None) != (x_zero_point is None):
        raise BadInput(f"{op}: x_scale and x_zero_point go together (both: static, neither: dynamic)")
    if x_scale is None:
        return None
    if np.size(x_scale) != 1 or np.asarray(x_scale).dtype != np.float32:
        raise BadInput(f"{op}: x_scale must be one float32; got {_described(x_scale)}")
    if np.size(x_zero_point) != 1 or np.asarray(x_zero_point).dtype != np.uint8:
        raise BadInput(f"{op}: x_zero_point must be one uint8; got {_described(x_zero_point)}")
    scale = np.float32(np.asarray(x_scale).reshape(()))
    if not (np.isfinite(scale) and scale > 0):
        raise BadInput(f"{op}: x_scale must be positive and finite; got {scale}")
    return scale, np.uint8(np.asarray(x_zero_point).reshape(()))


# ------------------------------------------------------------------------------ helpers


def _padded(inputs: Inputs, count: int) -> list:
    """`inputs` as exactly `count` entries, absent optional ones None."""
    inputs = list(inputs)
    return inputs + [None] * (count - len(inputs))


def _activations(x, k: int, op: str) -> np.ndarray:
    if x is None or np.ndim(x) < 1 or np.shape(x)[-1] != k:
        raise BadInput(f"{op}: X must be [..., K] with K = {k}; got shape {np.shape(x)}")
    return np.asarray(x, dtype=np.float32)


def _finish(y: np.ndarray, bias, n: int, activation: str, op: str) -> np.ndarray:
    """y + bias, then the activation; float32."""
    y = y.astype(np.float32, copy=False)
    if bias is not None:
        y = y + checked_bias(bias, n, op)
    return np.maximum(y, np.float32(0)) if activation == "relu" else y


def checked_bias(bias, n: int, op: str) -> np.ndarray:
    """`bias` as float32 [N], or BadInput."""
    _check_vector(bias, n, "bias", op)
    return np.asarray(bias, dtype=np.float32)


def _check_vector(values, n: int, what: str, op: str) -> None:
    if values is None or np.shape(values) != (n,):
        raise BadInput(f"{op}: {what} must have shape [{n}]; got {_described(values)}")


def _check_array(values, dtype, shape: tuple, what: str) -> None:
    if values is None or np.asarray(values).dtype != dtype or np.shape(values) != shape:
        raise BadInput(
            f"MatMulInt4: {what} must be {np.dtype(dtype)} {list(shape)}; got {_described(values)}"
        )


def _described(values) -> str:
    return "nothing" if values is None else f"{np.asarray(values).dtype} {list(np.shape(values))}"
