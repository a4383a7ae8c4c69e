"""Launchers of SparseMatMul and SparseConv: kernels/spmm.cl (and kernels/im2col.cl for convs).

Both ops multiply by one sparse W [N, K] (csr, bsr or sell; fp32, fp16 or int8 values; int32
or uint16 indices), so both hand their weight to a `DeviceSparseWeight`, which uploads it once,
builds the programs its value type, index type and block shape need, and picks kernels:

- one activation row (batch 1): an SpMV kernel straight on X. On the `cpu` profile
  (row_per_work_item) a work-item walks one CSR row 8 entries at a time (SELL: 8 rows of a
  slice side by side); on GPU profiles ROW_LANES work-items share a CSR row so a wavefront's
  loads coalesce, and SELL takes a row per work-item. BSR takes a block row per work-item.
- several rows: X is transposed on the device to XT [K, ldx] (im2col writes that layout for a
  conv; a pointwise conv of one image is already in it), zero-padded to whole tiles, so the
  activations each stored weight multiplies are whole vector loads and every weight read
  serves the tile (up to 32 rows on the CPU). Measured on PoCL: benchmarks/bench_spmm.py.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import numpy as np

from polaris_opt import tuning
from polaris_opt.cl_env import ClEnv, round_up
from polaris_opt.errors import BadInput
from polaris_opt.ops import complete_attributes
from polaris_opt.ops.reference import checked_bias
from polaris_opt.runtime.launchers.base import Launcher, register
from polaris_opt.sparse.formats import SparseMatrix

SPMM_SOURCE = "spmm.cl"
IM2COL_SOURCE = "im2col.cl"
VALUE_KINDS = {np.dtype(np.float32): "0", np.dtype(np.float16): "1", np.dtype(np.int8): "2"}
INDEX_TYPES = {np.dtype(np.int32): "int", np.dtype(np.uint16): "ushort"}
FLAG_BIAS, FLAG_RELU = 1, 2  # as in spmm.cl

# Input positions shared by both ops: (X, data, indices, indptr, [bias], [scale]).
X, DATA, INDICES, INDPTR, BIAS, SCALE = range(6)


def vector_width(env: ClEnv) -> int:
    """Floats per vector: one AVX2 register on PoCL (whose kernels target 8-lane AVX2), a float4 on GPUs."""
    return 8 if env.profile.row_per_work_item else 4


def row_lanes(env: ClEnv, mean_row_nnz: float) -> int:
    """Work-items per CSR row on GPUs: about one per stored value, a power of two up to a wavefront."""
    lanes = 1 << max(1, math.ceil(math.log2(max(mean_row_nnz, 1.0))))
    return min(lanes, env.profile.wavefront, env.local_size)


class DeviceSparseWeight:
    """W [N, K] (plus bias and activation) on the device, with the kernels that multiply by it."""

    def __init__(self, launcher: Launcher, matrix: SparseMatrix, bias: np.ndarray | None, activation: str):
        env = launcher.env
        self.env = env
        self.matrix = matrix
        self.rows, self.cols = matrix.shape
        self.block_rows = len(matrix.indptr) - 1 if matrix.format == "bsr" else self.rows
        relu = FLAG_RELU if activation == "relu" else 0  # complete_attributes allows none | relu
        self.flags = np.uint32(relu | (FLAG_BIAS if bias is not None else 0))
        # fp16 values travel as their raw bits: the kernel decodes them (see spmm.cl)
        data = matrix.data.view(np.uint16) if matrix.data.dtype == np.float16 else matrix.data
        self.data = launcher.upload(data.reshape(-1))
        self.indices = launcher.upload(matrix.indices)
        self.indptr = launcher.upload(matrix.indptr)
        self.scale = launcher.upload(matrix.scale)
        self.bias = launcher.upload(bias)
        self.vec_width = vector_width(env)
        # batch class -> defines that `polaris-opt tune` measured faster on this device (or {})
        values = tuning.VALUE_NAMES[matrix.data.dtype]
        self.tuned = tuning.tuned_choices(env, env.profile.name, matrix.format, values, self.cols)
        self.defines = self._defines()
        self._spmv, self._spmv_size = self._spmv_kernel()
        self._transpose = env.kernel(SPMM_SOURCE, "transpose", self.defines)
        self._tile_kernels: dict[tuple[int, str | None], object] = {}  # (TILE_VECTORS, LOCAL_SIZE)

    def _defines(self, tile_vectors: int = 1) -> dict[str, str]:
        defines = {
            "VALUE_KIND": VALUE_KINDS[self.matrix.data.dtype],
            "INDEX_T": INDEX_TYPES[self.matrix.indices.dtype],
            "VEC_WIDTH": str(self.vec_width),
            "TILE_VECTORS": str(tile_vectors),
        }
        if self.matrix.format == "bsr":
            defines |= {"BLOCK_R": str(self.matrix.block[0]), "BLOCK_C": str(self.matrix.block[1])}
        if self.matrix.format == "csr" and not self.env.profile.row_per_work_item:
            defines["ROW_LANES"] = str(row_lanes(self.env, self.matrix.nnz / max(self.rows, 1)))
        return defines

    def _spmv_kernel(self):
        """The batch-1 kernel and its global size."""
        cpu = self.env.profile.row_per_work_item
        kind = self.matrix.format
        defines = {**self.defines, **self.tuned.get(tuning.batch_class(1), {})}
        width = int(defines["VEC_WIDTH"])
        if kind == "csr" and not cpu:
            local = self.env.local_size_for(defines)  # the kernel's own: a tuned one may be below ROW_LANES
            defines["ROW_LANES"] = str(min(int(defines["ROW_LANES"]), local))
            rows_per_group = local // int(defines["ROW_LANES"])
            name, size = "csr_spmv_vector", -(-self.rows // rows_per_group) * local
        elif kind == "sell" and cpu and self.matrix.slice_height % width == 0:
            name, size = "sell_spmv_rows", -(-self.rows // width)
        else:
            name, size = f"{kind}_spmv_row", self.block_rows
        return self.env.kernel(SPMM_SOURCE, name, defines), size

    def tile_vectors(self, m_total: int) -> int:
        """Vectors of activations per work-item on the CPU: just enough for the batch, at most 4 (a
        BSR block row holds BLOCK_R times as many accumulators: at most 16 vectors in all, AVX2's
        register count; measured, 4x4 blocks at batch 32 run 1.49 ms with 4, 1.61 with 2).
        Not rounded up to a power of two: every padded vector costs a load and a multiply-add per
        stored weight (measured on PoCL, csr fp32 90 % sparse 4096x1024 at 24 rows, the tile
        kernel alone: 3 vectors 0.39 ms, 4 vectors 0.42). One float4 on GPUs, whose registers
        are per work-item and scarcer."""
        tuned = self.tuned.get(tuning.batch_class(m_total), {}).get("TILE_VECTORS")
        if tuned is not None:
            return int(tuned)
        if not self.env.profile.row_per_work_item:
            return 1
        most = min(4, max(1, 16 // self.matrix.block[0])) if self.matrix.format == "bsr" else 4
        return min(most, max(1, -(-m_total // self.vec_width)))

    def batch_tile(self, m_total: int) -> int:
        """Activation rows one work-item of the tile kernel covers; XT's row length must be a multiple."""
        return self.vec_width * self.tile_vectors(m_total)

    def _tile_kernel(self, tile_vectors: int, m_total: int):
        local = self.tuned.get(tuning.batch_class(m_total), {}).get("LOCAL_SIZE")  # None: the profile's
        kernel = self._tile_kernels.get((tile_vectors, local))
        if kernel is None:
            name = f"{self.matrix.format}_spmm_tile"
            defines = self._defines(tile_vectors) | ({"LOCAL_SIZE": local} if local else {})
            kernel = self.env.kernel(SPMM_SOURCE, name, defines)
            self._tile_kernels[(tile_vectors, local)] = kernel
        return kernel

    def transpose(self, x, m_total: int, ldx: int, xt) -> None:
        """XT [K, ldx] (zero past m_total) from X [m_total, K] (device buffers)."""
        args = (np.uint32(m_total), np.uint32(self.cols), np.uint32(ldx), x, xt)
        self.env.enqueue(self._transpose, (ldx, -(-self.cols // self.vec_width)), *args)

    def spmv(self, x, y) -> None:
        """y [N] = act(W·x + bias) for x [K] (device buffers)."""
        args = (np.uint32(self.rows), *self._shape_args(), *self._matrix_args(), x, y, *self._tail_args())
        self.env.enqueue(self._spmv, (self._spmv_size,), *args)

    def spmm(self, xt, ldx: int, m_total: int, y, pixels: int) -> None:
        """Output (m, n) = act(Σ_k W[n, k]·XT[k, m] + bias[n]) for XT [K, ldx] (device buffers),
        ldx a multiple of batch_tile(m_total).

        Written at y[(m // pixels)·N·pixels + n·pixels + m % pixels]: row-major [M, N] with
        pixels = 1, NCHW with pixels = OH·OW.
        """
        tile_vectors = self.tile_vectors(m_total)
        size = np.uint32(m_total)
        head = (np.uint32(self.rows), *self._shape_args(), size)
        args = (*head, *self._matrix_args(), xt, np.uint32(ldx), y, np.uint32(pixels), *self._tail_args())
        tiles = -(-m_total // (self.vec_width * tile_vectors))
        self.env.enqueue(self._tile_kernel(tile_vectors, m_total), (self.block_rows, tiles), *args)

    def _shape_args(self) -> tuple:
        """The arguments after n_rows: K for bsr (its padded last block column), the slice height for sell."""
        if self.matrix.format == "bsr":
            return (np.uint32(self.cols),)
        if self.matrix.format == "sell":
            return (np.uint32(self.matrix.slice_height),)
        return ()

    def _matrix_args(self) -> tuple:
        return (self.data.data, self.indices.data, self.indptr.data)

    def _tail_args(self) -> tuple:
        return (_buffer(self.scale), _buffer(self.bias), self.flags)

    def traffic(self, m_total: int) -> tuple[float, float]:
        """(flops, bytes) of one product with m_total activation rows: every stored value once
        per row, the weight arrays (scale included in nbytes) read once (the tile kernels reuse
        each load across a tile), X read and Y written once."""
        flops = 2.0 * self.matrix.nnz * m_total
        bias = self.bias.nbytes if self.bias is not None else 0
        return flops, float(self.matrix.nbytes + bias + 4 * m_total * (self.rows + self.cols))


def _buffer(array):
    return None if array is None else array.data


@register
class SparseMatMul(Launcher):
    """Y [..., N] = act(X [..., K] · Wᵀ + bias)."""

    op_type = "SparseMatMul"

    def __init__(self, env: ClEnv, attrs: dict, constants: dict[int, np.ndarray]):
        attrs = complete_attributes(self.op_type, attrs)
        super().__init__(env, attrs, constants)
        self.weight = device_weight(self, attrs, constants)
        self._scratch = TransposeScratch(self)

    def launch(self, inputs):
        return self._multiply(inputs, self.empty)

    def launch_reusing(self, inputs):
        return self._multiply(inputs, self.kept_output)

    def _multiply(self, inputs, output):
        """Y for `inputs`, written into `output(shape)`: a new array or this thread's kept one."""
        x = self.float_input(inputs, X, "X")
        rows, cols = self.weight.matrix.shape
        if x.ndim == 0 or x.shape[-1] != cols:
            raise BadInput(f"SparseMatMul: X's last axis must be K = {cols}; got shape {x.shape}")
        leading = x.shape[:-1]
        m_total = math.prod(leading)
        y = output((*leading, rows))
        if m_total == 1:
            self.weight.spmv(x.data, y.data)
        elif m_total > 1:
            ldx = round_up(m_total, self.weight.batch_tile(m_total))
            with self._scratch.buffer(cols * ldx) as xt:
                self.weight.transpose(x.data, m_total, ldx, xt)
                self.weight.spmm(xt, ldx, m_total, y.data, pixels=1)
        return y

    def cost(self, input_shapes):
        m_total = math.prod(input_shapes[X][:-1])
        flops, moved = self.weight.traffic(m_total)
        transpose = 8.0 * m_total * self.weight.cols if m_total > 1 else 0.0  # read X, write XT
        return flops, moved + transpose


class TransposeScratch:
    """One launcher's XT buffer, kept across calls instead of allocated per call (measured on
    PoCL, 4096x1024 csr at 16 rows: an allocation costs about 0.013 ms of a 0.3 ms call).

    Safe to share because the environment's queue is in-order: a call enqueues its transpose
    and its tile kernel while holding the lock, so the next call's transpose (which overwrites
    XT) runs only after this call's tile kernel has read it, whichever thread enqueues it.
    The buffer grows to the largest XT seen. Outputs are another matter: `launch` returns a new
    one each call, `launch_reusing` the calling thread's kept one (Launcher.kept_output).
    """

    def __init__(self, launcher: Launcher):
        self._launcher = launcher
        self._lock = threading.Lock()
        self._array = None

    @contextlib.contextmanager
    def buffer(self, floats: int):
        """A device buffer of at least `floats` float32s, this caller's until the block ends."""
        with self._lock:
            if self._array is None or self._array.size < floats:
                self._array = self._launcher.empty((floats,))
            yield self._array.data


@register
class SparseConv(Launcher):
    """Y [B, O, OH, OW] = act(Conv(X [B, C, H, W], W) + bias), group 1, W seen as [O, C·kh·kw]."""

    op_type = "SparseConv"

    def __init__(self, env: ClEnv, attrs: dict, constants: dict[int, np.ndarray]):
        attrs = complete_attributes(self.op_type, attrs)  # checks kernel_shape divides W's columns
        super().__init__(env, attrs, constants)
        self.weight = device_weight(self, attrs, constants)
        self.geometry = ConvGeometry(
            attrs["kernel_shape"], attrs["pads"], attrs["strides"], attrs["dilations"], self.weight.cols
        )
        self.im2col = env.kernel(IM2COL_SOURCE, "im2col")

    def launch(self, inputs):
        return self._convolve(inputs, self.empty)

    def launch_reusing(self, inputs):
        return self._convolve(inputs, self.kept_output)

    def _convolve(self, inputs, output):
        """Y for `inputs`, written into `output(shape)`: a new array or this thread's kept one."""
        x = self.float_input(inputs, X, "X")
        g = self.geometry
        if x.ndim != 4 or x.shape[1] != g.channels:
            raise BadInput(f"SparseConv: X must be [B, {g.channels}, H, W]; got shape {x.shape}")
        batch, _, height, width = x.shape
        out_h, out_w = g.output_size(height, width)
        pixels = out_h * out_w
        y = output((batch, self.weight.rows, out_h, out_w))
        m_total = batch * pixels
        if m_total == 0:
            return y
        if m_total == 1:  # one output pixel: its column is one vector, and an SpMV does it
            xt = self._columns(x, out_h, out_w, ldx=1)
            self.weight.spmv(xt.data, y.data)
            return y
        tile = self.weight.batch_tile(m_total)
        if self._direct(batch, m_total):
            xt, ldx = x, pixels  # X [1, C, H·W] is already XT [K = C, H·W]
        else:
            ldx = round_up(m_total, tile)
            xt = self._columns(x, out_h, out_w, ldx)
        self.weight.spmm(xt.data, ldx, m_total, y.data, pixels=pixels)
        return y

    def _direct(self, batch: int, m_total: int) -> bool:
        """A pointwise conv of one image whose pixels are whole tiles reads X as it is."""
        return self.geometry.is_pointwise and batch == 1 and m_total % self.weight.batch_tile(m_total) == 0

    def _columns(self, x, out_h: int, out_w: int, ldx: int):
        """im2col: XT [C·kh·kw, ldx] on the device, columns past B·OH·OW zero."""
        g = self.geometry
        batch, _, height, width = x.shape
        xt = self.empty((g.reduction, ldx))
        sizes = (
            batch,
            g.channels,
            height,
            width,
            out_h,
            out_w,
            *g.kernel,
            *g.strides,
            *g.pads[:2],
            *g.dilations,
        )
        args = (*(np.uint32(v) for v in sizes), np.uint32(ldx), x.data, xt.data)
        self.env.enqueue(self.im2col, (ldx, g.reduction), *args)
        return xt

    def cost(self, input_shapes):
        batch, _, height, width = input_shapes[X]
        out_h, out_w = self.geometry.output_size(height, width)
        m_total = batch * out_h * out_w
        flops, moved = self.weight.traffic(m_total)
        columns = 0.0 if self._direct(batch, m_total) else 8.0 * m_total * self.geometry.reduction
        return flops, moved + columns  # im2col reads X and writes XT


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel shape, pads [top, left, bottom, right], strides and dilations of a SparseConv."""

    kernel: tuple[int, int]
    pads: tuple[int, int, int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    reduction: int  # W's columns, C·kh·kw

    @property
    def channels(self) -> int:
        return self.reduction // (self.kernel[0] * self.kernel[1])

    @property
    def is_pointwise(self) -> bool:
        """1×1, stride 1, no padding: the conv is a product over pixels, no columns to build."""
        return tuple(self.kernel) == (1, 1) and tuple(self.strides) == (1, 1) and not any(self.pads)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        sizes = []
        axes = zip((height, width), self.kernel, self.strides, self.dilations, strict=True)
        for (extent, k, s, d), before, after in zip(axes, self.pads[:2], self.pads[2:], strict=True):
            span = extent + before + after - d * (k - 1) - 1
            if span < 0:
                raise BadInput(f"SparseConv: a {height}×{width} input is smaller than the dilated kernel")
            sizes.append(span // s + 1)
        return sizes[0], sizes[1]


# -------------------------------------------------------------------------------- validation


def device_weight(launcher: Launcher, attrs: dict, constants: dict[int, np.ndarray]) -> DeviceSparseWeight:
    """The node's W, bias and activation on the device, from completed attributes and constant inputs."""
    matrix = sparse_matrix(launcher.op_type, attrs, constants)
    bias = constants.get(BIAS)
    if bias is not None:
        bias = checked_bias(bias, matrix.shape[0], launcher.op_type)
    return DeviceSparseWeight(launcher, matrix, bias, attrs["activation"])


def sparse_matrix(op_type: str, attrs: dict, constants: dict[int, np.ndarray]) -> SparseMatrix:
    """W from the attributes and constant inputs, checked so no kernel reads out of bounds."""
    named = {"data": DATA, "indices": INDICES, "indptr": INDPTR}
    missing = [name for name, index in named.items() if constants.get(index) is None]
    if missing:
        raise BadInput(f"{op_type}: {', '.join(missing)} must be initializers to run on an OpenCL device")
    scale = constants.get(SCALE)
    matrix = SparseMatrix(
        attrs["format"],
        tuple(attrs["shape"]),
        np.asarray(constants[DATA]),
        np.asarray(constants[INDICES]),
        np.asarray(constants[INDPTR]),
        block=tuple(attrs["block"]),
        slice_height=attrs["slice_height"],
        scale=None if scale is None else np.asarray(scale),
    )  # checks dtypes, lengths, indptr's ends, a scale iff int8
    problem = _bounds_problem(matrix)
    if problem:
        raise BadInput(
            f"{op_type}: the {matrix.format} weight of shape {list(matrix.shape)} is corrupt: {problem}"
        )
    return matrix


def _bounds_problem(m: SparseMatrix) -> str | None:
    """What the kernels rely on and do not check: offsets that never go down, indices inside W,
    SELL slices of whole columns."""
    if np.any(np.diff(m.indptr) < 0):
        return "indptr decreases somewhere"
    extent = -(-m.shape[1] // m.block[1]) if m.format == "bsr" else m.shape[1]
    if m.indices.size and (int(m.indices.min()) < 0 or int(m.indices.max()) >= extent):
        return f"an index lies outside 0..{extent - 1}"
    if m.format == "sell" and np.any(np.diff(m.indptr) % m.slice_height):
        return f"a slice is not a whole number of columns of {m.slice_height} entries"
    return None
