"""Block-wise INT4 weight quantization in ONNX Runtime's MatMulNBits layout: RTN, GPTQ, packing.

A MatMul weight W is [K, N] (K inputs, N outputs). MatMulNBits stores it transposed, one row per
output, cut along K into blocks of `block_size` values; each block has its own scale and zero
point, and its codes are 4-bit unsigned integers (0..15):

    W[k, n] ≈ (code[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]

The last block of a K that is not a multiple of the block size is padded with zeros, as ONNX
Runtime's own quantizer does; the padding's codes equal the zero point, so it stands for 0.

- Symmetric: the value v of largest |v| in a block maps to code 0, i.e. -8 below the fixed zero
  point 8 (scale = v / -8, which is negative when v is). The whole range [-8, 7] is used and
  MatMulNBits needs no zero-point input: 8 is its default.
- Asymmetric: the block's range, widened to hold 0, spans codes 0..15 (scale = (max - min) / 15)
  with an integer zero point, so 0 is exact.

Scales and zero points follow ONNX Runtime's MLAS rules (float32 arithmetic, zero point rounded
half away from zero), so both quantizers pick the same grid. Codes are the grid point nearest to
each value, computed in float64, which is never farther than |scale| / 2.

Packing (`pack_nibbles`) puts two codes in a byte, the first in the low nibble.

`gptq` is GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): it quantizes the K input rows in order and spreads each row's
rounding error over the rows not yet quantized, weighted by the inverse Hessian H = XᵀX of the
layer's input, so the layer's output on data like X changes least. The result has the same form
as RTN's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = 4
MAX_CODE = 15  # codes are 0..15
SYMMETRIC_ZERO_POINT = 8  # MatMulNBits' default zero point for 4 bits
MIN_BLOCK_SIZE = 16  # MatMulNBits: block_size is a power of two, at least 16

Quantized = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes [N, K_padded], scales, zero points


def is_valid_block_size(block_size: int) -> bool:
    return block_size >= MIN_BLOCK_SIZE and block_size & (block_size - 1) == 0


def num_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def fitted_block_size(k: int, block_size: int) -> int:
    """`block_size`, or for a K shorter than that the smallest valid block that holds all of K.

    Both give one block per output column and so the same scales and codes; the smaller block
    just stores less padding.
    """
    return min(block_size, max(MIN_BLOCK_SIZE, 1 << (k - 1).bit_length()))


# ----------------------------------------------------------------------------------- RTN


def block_params(blocks: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (uint8) of each block: one per row of `blocks` [..., size].

    A block of zeros gets scale 1.0, so that dividing by it is safe; its codes stand for 0.
    """
    values = blocks.astype(np.float32)
    if symmetric:
        largest = np.take_along_axis(values, np.abs(values).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        scales = largest / np.float32(-SYMMETRIC_ZERO_POINT)
        zero_points = np.full(scales.shape, SYMMETRIC_ZERO_POINT, dtype=np.uint8)
    else:
        low = np.minimum(values.min(axis=-1), np.float32(0))
        high = np.maximum(values.max(axis=-1), np.float32(0))
        scales = (high - low) / np.float32(MAX_CODE)
        safe = np.where(scales != 0, scales, np.float32(1))
        # MLAS rounds the zero point half away from zero; -low/scale is never negative.
        zero_points = np.clip(np.floor(-low.astype(np.float64) / safe + 0.5), 0, MAX_CODE).astype(np.uint8)
    scales = np.where(scales != 0, scales, np.float32(1)).astype(np.float32)
    return scales, zero_points


def codes_for(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """The nearest code to each value: `values` [..., size] against per-row scales and zero points."""
    exact = values.astype(np.float64) / scales[..., None].astype(np.float64)
    return np.clip(np.rint(exact) + zero_points[..., None], 0, MAX_CODE).astype(np.uint8)


def quantize_blocks(weight: np.ndarray, block_size: int, symmetric: bool) -> Quantized:
    """Round-to-nearest INT4 of `weight` [K, N]: codes [N, K_padded], scales and zero points [N, blocks]."""
    blocks = _padded_blocks(weight, block_size)
    scales, zero_points = block_params(blocks, symmetric)
    codes = codes_for(blocks, scales, zero_points)
    return codes.reshape(codes.shape[0], -1), scales, zero_points


def _padded_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """`weight` [K, N] as [N, blocks, block_size], the last block padded with zeros."""
    k, n = weight.shape
    padded = np.zeros((n, num_blocks(k, block_size) * block_size), dtype=np.float32)
    padded[:, :k] = weight.T
    return padded.reshape(n, -1, block_size)


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> np.ndarray:
    """The float32 weight [K, N] that MatMulNBits computes with: (code - zero point) * scale."""
    n, blocks = scales.shape
    centred = codes.reshape(n, blocks, -1).astype(np.int32) - zero_points[..., None].astype(np.int32)
    values = centred.astype(np.float32) * scales[..., None]
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)


# ------------------------------------------------------------------------------- packing


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Codes 0..15 along the last axis, two per byte, the first in the low nibble; odd lengths pad 0."""
    values = np.asarray(values, dtype=np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] & 0x0F) | (values[..., 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """The first `count` codes along the last axis of `pack_nibbles`' output."""
    packed = np.asarray(packed, dtype=np.uint8)
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :count]


def packed_weight(codes: np.ndarray, block_size: int) -> np.ndarray:
    """MatMulNBits input B: uint8 [N, blocks, block_size / 2] from codes [N, K_padded]."""
    n = codes.shape[0]
    return pack_nibbles(codes.reshape(n, -1, block_size))


# ---------------------------------------------------------------------------------- GPTQ


def gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    block_size: int,
    symmetric: bool,
    *,
    damp: float = 0.01,
    lazy_columns: int = 128,
) -> Quantized:
    """GPTQ INT4 of `weight` [K, N] for inputs whose Hessian is `hessian` [K, K] (XᵀX).

    Same result form as `quantize_blocks`. `damp` adds that fraction of the mean diagonal to H,
    which keeps its inverse well-conditioned; inputs never seen (H_ii = 0) are dropped, their
    weights quantize to 0, which costs nothing as they only ever multiply zeros.
    """
    k = weight.shape[0]
    state = _Gptq.start(weight, hessian, block_size, symmetric, damp)
    # Lazy batches are whole quantization blocks, so a block's scale is taken from its current,
    # error-updated values, all of which live in the batch being worked on.
    step = max(block_size, lazy_columns // block_size * block_size)
    for first in range(0, k, step):
        state.quantize_batch(first, min(first + step, k))
    state.pad_codes(k)
    return state.codes, state.scales, state.zero_points


@dataclass
class _Gptq:
    """GPTQ's working state: the weight being updated, H⁻¹'s factor and the results so far."""

    work: np.ndarray  # [N, K] float64: GPTQ walks the K inputs as columns
    factor: np.ndarray  # [K, K] upper: UᵀU = H⁻¹
    block_size: int
    symmetric: bool
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray

    @classmethod
    def start(cls, weight: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool, damp: float):
        k, n = weight.shape
        work = weight.T.astype(np.float64)
        h = np.array(hessian, dtype=np.float64)
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        work[:, dead] = 0.0
        blocks = num_blocks(k, block_size)
        return cls(
            work,
            _upper_cholesky_of_inverse(h, damp),
            block_size,
            symmetric,
            codes=np.empty((n, blocks * block_size), dtype=np.uint8),
            scales=np.empty((n, blocks), dtype=np.float32),
            zero_points=np.empty((n, blocks), dtype=np.uint8),
        )

    def quantize_batch(self, first: int, end: int) -> None:
        """Quantize columns first..end one at a time, then pass their error on to the columns after."""
        batch = self.work[:, first:end]  # a view: updates land in `work`
        factor = self.factor[first:end, first:end]
        errors = np.zeros_like(batch)
        for i in range(end - first):
            rounded = self._quantize_column(first + i, batch[:, i : i + self.block_size])
            errors[:, i] = (batch[:, i] - rounded) / factor[i, i]
            batch[:, i:] -= np.outer(errors[:, i], factor[i, i:])
        self.work[:, end:] -= errors @ self.factor[first:end, end:]

    def _quantize_column(self, column: int, ahead: np.ndarray) -> np.ndarray:
        """Code column `column` (its values are ahead[:, 0]); returns the values the codes stand for."""
        block = column // self.block_size
        if column % self.block_size == 0:
            self.scales[:, block], self.zero_points[:, block] = block_params(ahead, self.symmetric)
        scale, zero_point = self.scales[:, block], self.zero_points[:, block]
        code = codes_for(ahead[:, :1], scale, zero_point)[:, 0]
        self.codes[:, column] = code
        return (code.astype(np.int32) - zero_point).astype(np.float32) * scale

    def pad_codes(self, k: int) -> None:
        # Padding stands for 0: its code is the last block's zero point.
        self.codes[:, k:] = self.zero_points[:, -1:]


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """U with UᵀU = (H + damp·mean(diag H)·I)⁻¹: the factor GPTQ's updates are read from."""
    damped = h + np.eye(len(h)) * damp * float(np.mean(np.diag(h)))
    inverse = np.linalg.inv(damped)
    return np.linalg.cholesky((inverse + inverse.T) / 2).T
