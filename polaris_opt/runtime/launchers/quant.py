"""Launchers of QMatMul, QGemm (kernels/qmatmul.cl) and MatMulInt4 (kernels/int4.cl).

QMatMul / QGemm: the int8 weight w_q [N, K] is uploaded once with its per-row scale and its row
sums (w_sum, which lets the kernel take the activation zero point out of the inner loop). A call
quantizes X to uint8 on the device, statically with the node's (x_scale, x_zero_point) or
dynamically: X's range, scale and zero point are found on the device too (one work-group for a
small X, a two-pass reduction for a large one) and kept in a small device buffer, so nothing
goes back to the host. Then one GEMM kernel accumulates in int32 and applies the scales, bias,
alpha and relu.

MatMulInt4: the packed 4-bit weight, scales and zero points are uploaded as they are stored
(MatMulNBits' layout) and unpacked by the kernel on the fly.

Both GEMM kernels come in two layouts chosen by the device profile: one work-item per output
feature (`row_per_work_item`, PoCL) or one work-group per output feature (GPUs). Batch rows go in
tiles of up to MAX_TILE_M, so each weight read serves the whole tile; batch 1 builds the TILE_M=1
variant, whose inner loop is the memory-bound GEMV.

`polaris-opt tune` may have measured a better work-group size (LOCAL_SIZE) and, for large
batches, TILE_M for the GEMM kernel of a shape class on this device; `tuning.tuned_for` reads
them when the launcher is built. Global sizes follow each kernel's own local size.
"""

from __future__ import annotations

import math

import numpy as np

from polaris_opt import tuning
from polaris_opt.cl_env import ClEnv
from polaris_opt.errors import BadInput
from polaris_opt.ops import complete_attributes
from polaris_opt.ops.reference import MAX_QUANT_K, checked_bias, static_activation_params
from polaris_opt.runtime.launchers.base import Launcher, register

QMATMUL_SOURCE = "qmatmul.cl"
INT4_SOURCE = "int4.cl"
MAX_TILE_M = 8  # batch rows per work-item / work-group: qgemm_rows measured best with 8 at batch 32
RANGE_GROUPS = 64  # work-groups of the dynamic-range pass over a large X
ONE_GROUP_RANGE = 16384  # up to this many values, one work-group measures and quantizes X alone
MAX_ELEMENTS = 2**32 - 1  # the kernels index X with 32-bit unsigned ints

# QMatMul / QGemm inputs: (X, w_q, w_scale, [bias], [x_scale], [x_zero_point])
X, W_Q, W_SCALE, BIAS, X_SCALE, X_ZERO_POINT = range(6)
# MatMulInt4 inputs: (X, w_packed, scales, [zero_points], [bias])
W_PACKED, SCALES, ZERO_POINTS, INT4_BIAS = 1, 2, 3, 4


def tile_rows(rows: int) -> int:
    """Batch rows per tile: the smallest power of two holding `rows`, at most MAX_TILE_M.

    A tile larger than the batch would only recompute clamped rows, so small batches get small
    tiles; each distinct value is one more program variant, hence powers of two.
    """
    return min(MAX_TILE_M, 1 << max(rows - 1, 0).bit_length())


def gemm_global_size(env: ClEnv, kernel, rows: int, tiles: int) -> tuple[int, int]:
    """Work-items of a GEMM launch: one per output row (cpu) or one work-group of the kernel's
    local size per row (GPU)."""
    per_row = 1 if env.profile.row_per_work_item else env.local_size_of(kernel)
    return rows * per_row, tiles


class TunedGemm:
    """One launcher's GEMM kernel, built per batch class with what `polaris-opt tune` measured best
    for that shape class on this device (TILE_M, LOCAL_SIZE), else the defaults."""

    def __init__(self, env: ClEnv, source: str, name: str, k: int):
        self.env, self.source, self.name = env, source, name
        self.tuned = tuning.tuned_for(env, tuning.kernel_key(env.profile.name, name), k)
        self._kernels: dict[tuple[str, int], object] = {}  # (batch class, TILE_M) -> kernel

    def tile(self, rows: int) -> int:
        """Batch rows per tile: the tuned TILE_M of this batch class, else `tile_rows(rows)`."""
        return int(self.tuned.get(tuning.batch_class(rows), {}).get("TILE_M", tile_rows(rows)))

    def kernel(self, rows: int):
        """The kernel for a batch of `rows` rows (built once per batch class and tile)."""
        key = (tuning.batch_class(rows), self.tile(rows))
        kernel = self._kernels.get(key)
        if kernel is None:
            defines = {**self.tuned.get(key[0], {}), "TILE_M": str(key[1])}
            kernel = self.env.kernel(self.source, self.name, defines)
            self._kernels[key] = kernel
        return kernel

    def enqueue(self, rows: int, features: int, *args) -> None:
        """Launch over `features` output features and the tiles of `rows` batch rows."""
        kernel = self.kernel(rows)
        tiles = -(-rows // self.tile(rows))
        self.env.enqueue(kernel, gemm_global_size(self.env, kernel, features, tiles), *args)


def _buffer(array):
    """The device buffer of an optional array: None is passed to the kernel as a NULL pointer."""
    return None if array is None else array.data


def _activations(launcher: Launcher, inputs: dict, k: int):
    """X from `inputs`, checked to end in K; returns it, its leading shape and its row count."""
    x = launcher.float_input(inputs, X, "X")
    if x.ndim == 0 or x.shape[-1] != k:
        raise BadInput(f"{launcher.op_type}: X must be [..., K] with K = {k}; got shape {x.shape}")
    leading = x.shape[:-1]
    rows = math.prod(leading)
    if rows * k > MAX_ELEMENTS:
        raise BadInput(f"{launcher.op_type}: X has {rows * k} values; the kernels index at most 2^32 - 1")
    return x, leading, rows


# ------------------------------------------------------------------------------ QMatMul


@register
class QMatMul(Launcher):
    """Y [..., N] = act(acc · x_scale · w_scale + bias), acc = Σ_k (x_q − zp)·w_q as int32."""

    op_type = "QMatMul"

    def __init__(self, env: ClEnv, attrs: dict, constants: dict[int, np.ndarray]):
        super().__init__(env, complete_attributes(self.op_type, attrs), constants)
        w_q, w_scale = _int8_weight(self.op_type, constants)
        self.rows, self.cols = w_q.shape
        bias = constants.get(BIAS)
        self.w_q = self.upload(w_q)
        self.w_sum = self.upload(w_q.sum(axis=1, dtype=np.int32))
        self.w_scale = self.upload(w_scale)
        self.bias = self.upload(None if bias is None else checked_bias(bias, self.rows, self.op_type))
        static = static_activation_params(constants.get(X_SCALE), constants.get(X_ZERO_POINT), self.op_type)
        # [scale, zero point]: the static pair once here, or a fresh pair per call (dynamic).
        self.static_params = None if static is None else self.upload(np.array(static, dtype=np.float32))
        self.alpha = np.float32(self.attrs.get("alpha", 1.0))
        self.relu = np.int32(self.attrs["activation"] == "relu")
        self.quantize_static = env.kernel(QMATMUL_SOURCE, "quantize_static")
        self.quantize_dynamic_small = env.kernel(QMATMUL_SOURCE, "quantize_dynamic_small")
        self.range_partial = env.kernel(QMATMUL_SOURCE, "range_partial")
        self.dynamic_params = env.kernel(QMATMUL_SOURCE, "dynamic_params")
        name = "qgemm_rows" if env.profile.row_per_work_item else "qgemm_wave"
        self.gemm = TunedGemm(env, QMATMUL_SOURCE, name, self.cols)

    def launch(self, inputs):
        self._refuse_dynamic_params(inputs)
        x, leading, rows = _activations(self, inputs, self.cols)
        y = self.empty((*leading, self.rows))
        if rows == 0:
            return y
        x_q = self.empty((rows * self.cols,), np.uint8)
        params = self._quantize(x, x_q)
        self._gemm(x_q, params, rows, y)
        return y

    def cost(self, input_shapes):
        rows = math.prod(input_shapes[X][:-1])
        n, k = self.rows, self.cols
        # X read once (twice when its range is measured), x_q written and read, Y written; the
        # weight and its three per-row vectors once.
        x_reads = 1 if self.static_params is not None else 2
        moved = n * k + 12 * n + rows * k * (4 * x_reads + 2) + 4 * rows * n
        return 2.0 * rows * n * k, float(moved)

    def _refuse_dynamic_params(self, inputs) -> None:
        if X_SCALE in inputs or X_ZERO_POINT in inputs:
            raise BadInput(
                f"{self.op_type}: x_scale and x_zero_point must be initializers (constants) to run on "
                "the OpenCL device; here they are computed tensors: run the node on the host"
            )

    def _quantize(self, x, x_q):
        """X into x_q on the device; returns the device [scale, zero point] it was quantized with.

        Dynamic quantization of a small X (batch 1) is one launch of one work-group; a large X
        has its range folded by RANGE_GROUPS work-groups, then by one, then is quantized.
        """
        count = np.uint32(x_q.size)
        if self.static_params is not None:
            params = self.static_params
        else:
            params = self.empty((2,))
            if count <= ONE_GROUP_RANGE:
                args = (x.data, count, params.data, x_q.data)
                one_group = (self.env.local_size_of(self.quantize_dynamic_small),)
                self.env.enqueue(self.quantize_dynamic_small, one_group, *args)
                return params
            self._measure_range(x, count, params)
        self.env.enqueue(self.quantize_static, (int(count),), x.data, count, params.data, x_q.data)
        return params

    def _measure_range(self, x, count: np.uint32, params) -> None:
        """Scale and zero point of a large X into the device buffer `params`, in two passes."""
        local = self.env.local_size_of(self.range_partial)
        groups = min(RANGE_GROUPS, -(-int(count) // local))
        partial = self.empty((groups, 2))
        self.env.enqueue(self.range_partial, (groups * local,), x.data, count, partial.data)
        one_group = (self.env.local_size_of(self.dynamic_params),)
        self.env.enqueue(self.dynamic_params, one_group, partial.data, np.uint32(groups), params.data)

    def _gemm(self, x_q, params, rows: int, y) -> None:
        has_bias = np.int32(self.bias is not None)
        sizes = (np.uint32(rows), np.uint32(self.rows), np.uint32(self.cols))
        weight = (self.w_q.data, self.w_sum.data, self.w_scale.data, _buffer(self.bias))
        args = (x_q.data, *weight, params.data, self.alpha, has_bias, self.relu, *sizes, y.data)
        self.gemm.enqueue(rows, self.rows, *args)


@register
class QGemm(QMatMul):
    """QMatMul on X [M, K] with Gemm's alpha: Y = act(alpha · acc · x_scale · w_scale + bias)."""

    op_type = "QGemm"

    def launch(self, inputs):
        x = self.float_input(inputs, X, "X")
        if x.ndim != 2:
            raise BadInput(f"QGemm: X must be 2-D [M, K]; got shape {x.shape}")
        return super().launch(inputs)


def _int8_weight(op_type: str, constants: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(w_q int8 [N, K], w_scale float32 [N]) from the constants, checked."""
    if W_Q not in constants or W_SCALE not in constants:
        raise BadInput(f"{op_type}: w_q and w_scale must be initializers (constant inputs) on the device")
    w_q, w_scale = np.asarray(constants[W_Q]), np.asarray(constants[W_SCALE])
    if w_q.dtype != np.int8 or w_q.ndim != 2 or min(w_q.shape) < 1:
        raise BadInput(f"{op_type}: w_q must be int8 [N, K]; got {w_q.dtype} {list(w_q.shape)}")
    if w_q.shape[1] > MAX_QUANT_K:
        raise BadInput(
            f"{op_type}: K = {w_q.shape[1]} exceeds {MAX_QUANT_K}; int32 accumulation could overflow"
        )
    if w_scale.shape != (w_q.shape[0],):
        raise BadInput(f"{op_type}: w_scale must have shape [{w_q.shape[0]}]; got {list(w_scale.shape)}")
    return w_q, w_scale.astype(np.float32)


# --------------------------------------------------------------------------- MatMulInt4


@register
class MatMulInt4(Launcher):
    """Y [..., N] = X · Wᵀ + bias, W [N, K] = (code − zero point) · scale per block of K."""

    op_type = "MatMulInt4"

    def __init__(self, env: ClEnv, attrs: dict, constants: dict[int, np.ndarray]):
        super().__init__(env, complete_attributes(self.op_type, attrs), constants)
        self.rows, self.cols = self.attrs["N"], self.attrs["K"]
        self.block_size = self.attrs["block_size"]
        blocks = -(-self.cols // self.block_size)
        packed, scales, zero_points = _int4_weight(
            self.op_type, constants, self.rows, blocks, self.block_size
        )
        bias = constants.get(INT4_BIAS)
        self.packed = self.upload(packed)
        self.scales = self.upload(scales)
        self.zero_points = self.upload(zero_points)
        self.bias = self.upload(None if bias is None else checked_bias(bias, self.rows, self.op_type))
        name = "matmul_int4_rows" if env.profile.row_per_work_item else "matmul_int4_wave"
        self.gemm = TunedGemm(env, INT4_SOURCE, name, self.cols)

    def launch(self, inputs):
        x, leading, rows = _activations(self, inputs, self.cols)
        y = self.empty((*leading, self.rows))
        if rows == 0:
            return y
        weight = (self.packed.data, self.scales.data, _buffer(self.zero_points))
        flags = (np.int32(self.zero_points is not None), _buffer(self.bias), np.int32(self.bias is not None))
        sizes = (np.uint32(rows), np.uint32(self.rows), np.uint32(self.cols), np.uint32(self.block_size))
        args = (x.data, *weight, *flags, *sizes, y.data)
        self.gemm.enqueue(rows, self.rows, *args)
        return y

    def cost(self, input_shapes):
        rows = math.prod(input_shapes[X][:-1])
        stored = sum(
            a.nbytes for a in (self.packed, self.scales, self.zero_points, self.bias) if a is not None
        )
        moved = stored + 4 * rows * (self.cols + self.rows)
        return 2.0 * rows * self.rows * self.cols, float(moved)


def _int4_weight(op_type: str, constants: dict, n: int, blocks: int, block_size: int):
    """(w_packed, scales, zero_points or None) from the constants, checked against K, N, block_size."""
    if W_PACKED not in constants or SCALES not in constants:
        raise BadInput(f"{op_type}: w_packed and scales must be initializers (constant inputs) on the device")
    expected = {
        W_PACKED: ("w_packed", np.uint8, (n, blocks, block_size // 2)),
        SCALES: ("scales", np.float32, (n, blocks)),
        ZERO_POINTS: ("zero_points", np.uint8, (n, -(-blocks // 2))),
    }
    arrays = []
    for index, (what, dtype, shape) in expected.items():
        value = constants.get(index)
        if value is not None:
            value = np.asarray(value)
            if value.dtype != dtype or value.shape != shape:
                raise BadInput(
                    f"{op_type}: {what} must be {np.dtype(dtype)} {list(shape)} for N={n}, "
                    f"{blocks} blocks of {block_size}; got {value.dtype} {list(value.shape)}"
                )
        arrays.append(value)
    return tuple(arrays)
