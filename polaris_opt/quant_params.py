"""Quantization arithmetic shared by every quantizing pass: scales, zero points, rounding.

    q = saturate(round_half_even(x / scale) + zero_point)       (ONNX QuantizeLinear)
    x ≈ (q - zero_point) * scale                                (ONNX DequantizeLinear)

Weights are symmetric (zero point 0) over [-127, 127], so that -128 never appears and the int8
range is the same on both sides, as ONNX Runtime's kernels and its quantizer assume.
Activations are uint8 asymmetric over [0, 255] or int8 symmetric over [-127, 127]. A range of
zero width (a constant tensor, an all-zero weight) gets scale 1.0: valid, and exact for zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point: scalars, or one per slice along `axis` (per-channel)."""

    scale: np.ndarray  # float32, shape () or (channels,)
    zero_point: np.ndarray  # int8 or uint8, same shape as scale
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    def broadcast(self, values: np.ndarray, ndim: int) -> np.ndarray:
        """`values` (one per channel) shaped to broadcast against a tensor of `ndim` dims."""
        if self.axis is None:
            return values
        shape = [1] * ndim
        shape[self.axis] = -1
        return values.reshape(shape)


_LIMITS = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def activation_params(lo: float, hi: float, *, symmetric: bool = False) -> QuantParams:
    """Per-tensor parameters for an activation whose calibrated range is [lo, hi].

    The range is widened to hold 0, so zero (padding, Relu's floor) is represented exactly.
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        scale = _safe_scale(max(-lo, hi) / 127.0)
        return QuantParams(scale, np.array(0, dtype=np.int8))
    scale = _safe_scale((hi - lo) / 255.0)
    zero_point = np.clip(np.rint(-lo / scale), 0, 255).astype(np.uint8)
    return QuantParams(scale, zero_point)


def weight_params(weight: np.ndarray, axis: int | None) -> QuantParams:
    """Symmetric int8 parameters for a weight: per-tensor, or per slice along `axis`."""
    if not np.all(np.isfinite(weight)):
        raise ValueError("weight holds NaN or Inf")
    if axis is None:
        scale = _safe_scale(np.max(np.abs(weight), initial=0.0) / 127.0)
        return QuantParams(scale, np.array(0, dtype=np.int8))
    axis = axis % weight.ndim
    reduce = tuple(d for d in range(weight.ndim) if d != axis)
    amax = np.max(np.abs(weight), axis=reduce, initial=0.0) if weight.size else np.zeros(weight.shape[axis])
    scale = _safe_scale(amax / 127.0)
    return QuantParams(scale, np.zeros(scale.shape, dtype=np.int8), axis)


def quantize(values: np.ndarray, params: QuantParams, *, narrow: bool = False) -> np.ndarray:
    """ONNX QuantizeLinear: round half to even, then saturate. `narrow` keeps int8 off -128."""
    scale = params.broadcast(params.scale.astype(np.float32), values.ndim)
    zero_point = params.broadcast(params.zero_point.astype(np.int32), values.ndim)
    low, high = _LIMITS[params.dtype]
    if narrow and params.dtype == np.int8:
        low = -127
    q = np.rint(values.astype(np.float32) / scale) + zero_point
    return np.clip(q, low, high).astype(params.dtype)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear."""
    scale = params.broadcast(params.scale.astype(np.float32), q.ndim)
    zero_point = params.broadcast(params.zero_point.astype(np.int32), q.ndim)
    return ((q.astype(np.int32) - zero_point) * scale).astype(np.float32)


def fake_quantize_weight(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """The float weight the int8 weight stands for: what the quantized model computes with."""
    params = weight_params(weight, axis)
    return dequantize(quantize(weight, params, narrow=True), params)


def weight_axis(op_type: str, attrs: dict, weight_ndim: int) -> int | None:
    """The output-channel axis of a layer's weight, along which per-channel scales run.

    Conv: [M, C/g, k...] → 0. ConvTranspose: [C, M/g, k...] → 1 (only for group 1, where that
    axis is the whole output channel). Gemm: B is [K, N] → 1, or [N, K] with transB → 0.
    MatMul with a 2-D weight [K, N] → 1. Anything else: None (per-tensor).
    """
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1 if attrs.get("group", 1) == 1 else None
    if op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if op_type == "MatMul" and weight_ndim == 2:
        return 1
    return None
