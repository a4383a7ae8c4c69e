"""Sparse matrix formats of the ai.polaris ops: CSR, CSC, BSR and SELL-C, named and laid out like scipy's.

A weight is seen as the dense matrix W [N, K] (rows = output features, columns = reduction). Each
format stores it as `data, indices, indptr`:

- csr: data [nnz], indices [nnz] (column of each value, ascending within a row), indptr [N+1].
- csc: the CSR of Wᵀ: data [nnz], indices [nnz] (rows), indptr [K+1].
- bsr: W zero-padded to multiples of the block (R, C); a block is stored when any of its entries
  is nonzero: data [nblocks, R, C] (row-major inside a block), indices [nblocks] (block columns,
  ascending within a block row), indptr [ceil(N/R)+1].
- sell (SELL-C-σ with σ = 1, rows not sorted): rows in slices of C consecutive rows, the last one
  padded with empty rows. Slice s is w_s = the most nonzeros of its rows wide and stored column by
  column: element j of row r (0 ≤ r < C) is at data[indptr[s] + j*C + r]. Padding entries hold
  value 0 and column 0, a valid column, so a kernel reads them without a branch. ELL is SELL with
  C ≥ N.

Values are float32, float16, or int8 with a float32 scale per row (symmetric: scale = max|row| / 127,
1.0 for an empty row; w ≈ data * scale[row]). Indices are int32 or uint16; uint16 only when every
index fits, i.e. the indexed dimension is at most 65536. indptr is always int32.

An entry is stored when its *stored* value is nonzero: an fp16 value that underflows to 0 or an
int8 value that rounds to 0 is dropped, like any zero. -0.0 counts as zero, as in scipy.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from polaris_opt.errors import BadInput

FORMATS = ("csr", "csc", "bsr", "sell")
VALUE_TYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}
INDEX_TYPES = {"int32": np.dtype(np.int32), "uint16": np.dtype(np.uint16)}
UINT16_EXTENT = 1 << 16  # indices 0..65535
INT8_LIMIT = 127  # symmetric: -128 is never used
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == has no single truth value
class SparseMatrix:
    """W [N, K] in one of FORMATS; see the module docstring for each layout."""

    format: str
    shape: tuple[int, int]
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    block: tuple[int, int] = (1, 1)
    slice_height: int = 0
    scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_layout(self)

    @property
    def nnz(self) -> int:
        """Stored values, like scipy's: explicit zeros inside BSR blocks and SELL padding included."""
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Bytes of every array a kernel reads: data, indices, indptr and the int8 scale."""
        arrays = (self.data, self.indices, self.indptr, self.scale)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def density(self) -> float:
        """Stored values per dense entry (above 1.0 is possible when BSR/SELL padding dominates)."""
        size = self.shape[0] * self.shape[1]
        return self.nnz / size if size else 0.0


def from_dense(
    w: np.ndarray,
    format: str,
    *,
    values: str = "fp32",
    index: str = "auto",
    block: tuple[int, int] = (4, 4),
    slice_height: int = 64,
) -> SparseMatrix:
    """W [N, K] stored in `format` (one of FORMATS).

    `values`: "fp32" | "fp16" | "int8" (with a per-row scale); `index`: "auto" | "int32" | "uint16".
    `block` (R, C) is used by bsr, `slice_height` by sell; both must be at least 1.
    """
    w = _checked_matrix(w)
    _check_choice("format", format, FORMATS)
    _check_choice("values", values, VALUE_TYPES)
    block = _checked_block(block)
    slice_height = _checked_positive("slice_height", slice_height)
    index_type = index_dtype(_indexed_extent(format, w.shape, block), index)
    stored, scale = _stored_values(w, values)
    if format == "csr":
        return SparseMatrix("csr", w.shape, *_csr_arrays(stored, index_type), scale=scale)
    if format == "csc":
        return SparseMatrix("csc", w.shape, *_csr_arrays(stored.T, index_type), scale=scale)
    if format == "bsr":
        return SparseMatrix("bsr", w.shape, *_bsr_arrays(stored, index_type, block), block=block, scale=scale)
    arrays = _sell_arrays(stored, index_type, slice_height)
    return SparseMatrix("sell", w.shape, *arrays, slice_height=slice_height, scale=scale)


def to_dense(m: SparseMatrix) -> np.ndarray:
    """The float32 [N, K] matrix that `m` stores (int8 values multiplied by their row's scale)."""
    dense = _DENSIFIERS[m.format](m)
    if m.scale is not None:
        dense *= m.scale[:, None]
    return dense


def index_dtype(extent: int, index: str) -> np.dtype:
    """The dtype of indices into a dimension of `extent` entries: `index`, or for "auto" the narrowest."""
    _check_choice("index", index, (*INDEX_TYPES, "auto"))
    if index == "auto":
        index = "uint16" if extent <= UINT16_EXTENT else "int32"
    if index == "uint16" and extent > UINT16_EXTENT:
        raise BadInput(
            f"index=uint16 cannot address a dimension of {extent} (at most {UINT16_EXTENT}); "
            "use index=int32 or index=auto"
        )
    return INDEX_TYPES[index]


# ------------------------------------------------------------------------------- validation


def _check_choice(what: str, given: str, valid) -> None:
    if given not in valid:
        raise BadInput(f"unknown sparse {what} {given!r}; valid: {', '.join(valid)}")


def _checked_matrix(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise BadInput(f"a sparse format stores a 2-D matrix [N, K]; got shape {w.shape}")
    if w.dtype.kind not in "biuf":
        raise BadInput(f"a sparse format stores real numbers; got dtype {w.dtype}")
    return w


def _checked_positive(what: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise BadInput(f"sparse {what} must be an integer; got {value!r}") from None
    if value < 1:
        raise BadInput(f"sparse {what} must be at least 1; got {value}")
    return value


def _checked_block(block) -> tuple[int, int]:
    if len(block) != 2:
        raise BadInput(f"sparse block must be (rows, columns); got {block!r}")
    return _checked_positive("block rows", block[0]), _checked_positive("block columns", block[1])


def _indexed_extent(format: str, shape: tuple[int, int], block: tuple[int, int]) -> int:
    """How many distinct indices the format's `indices` can hold."""
    rows, cols = shape
    return {"csr": cols, "sell": cols, "csc": rows, "bsr": -(-cols // block[1])}[format]


def _indptr_length(m: SparseMatrix) -> int:
    rows, cols = m.shape
    if m.format == "csc":
        return cols + 1
    height = {"csr": 1, "bsr": m.block[0], "sell": m.slice_height}[m.format]
    return -(-rows // height) + 1


def _check_layout(m: SparseMatrix) -> None:
    """Cheap consistency checks, so arrays read back from a model fail with a clear message."""
    _check_choice("format", m.format, FORMATS)
    if len(m.shape) != 2 or min(m.shape) < 0:
        raise BadInput(f"a sparse matrix has a shape [N, K] of two sizes; got {list(m.shape)}")
    if m.format == "bsr":
        _checked_block(m.block)
    if m.format == "sell":
        _checked_positive("slice_height", m.slice_height)
    problems = []
    if m.data.dtype not in VALUE_TYPES.values():
        problems.append(f"data dtype {m.data.dtype} is not float32, float16 or int8")
    if m.indices.dtype not in INDEX_TYPES.values():
        problems.append(f"indices dtype {m.indices.dtype} is not int32 or uint16")
    if m.indptr.dtype != np.int32 or m.indptr.shape != (_indptr_length(m),):
        problems.append(f"indptr must be int32 [{_indptr_length(m)}]; got {m.indptr.dtype} {m.indptr.shape}")
    elif m.indptr[0] != 0 or m.indptr[-1] != m.indices.size:
        problems.append(f"indptr must run from 0 to {m.indices.size} (the number of indices)")
    per_index = m.block[0] * m.block[1] if m.format == "bsr" else 1
    if m.data.size != m.indices.size * per_index:
        problems.append(f"{m.data.size} values do not match {m.indices.size} indices")
    if (m.scale is not None) != (m.data.dtype == np.int8):
        problems.append("a per-row scale goes with int8 values, and only with them")
    elif m.scale is not None and (m.scale.dtype != np.float32 or m.scale.shape != (m.shape[0],)):
        problems.append(f"scale must be float32 [{m.shape[0]}]; got {m.scale.dtype} {m.scale.shape}")
    if problems:
        raise BadInput(f"inconsistent {m.format} matrix of shape {m.shape}: {'; '.join(problems)}")


# ------------------------------------------------------------------------------- dense -> sparse


def _stored_values(w: np.ndarray, values: str) -> tuple[np.ndarray, np.ndarray | None]:
    """W converted to the stored value type, and the per-row scale for int8."""
    if values == "int8":
        return _quantize_rows(w.astype(np.float32))
    with np.errstate(over="ignore"):  # an overflow is reported below, as BadInput
        stored = w.astype(VALUE_TYPES[values])  # fp16 straight from w: one rounding, not two
    if values == "fp16" and (np.isinf(stored) & np.isfinite(w)).any():
        raise BadInput("the weight has values beyond float16's range (±65504); use values=fp32 or int8")
    return stored, None


def _quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: scale = max|row| / 127 (1.0 for a zero row), q = round(w / scale)."""
    if not np.isfinite(w).all():
        raise BadInput("int8 sparse values need a finite weight; it holds inf or nan")
    peak = np.abs(w).max(axis=1, initial=0.0)
    scale = peak / np.float32(INT8_LIMIT)
    # A row whose peak is a tiny subnormal would get scale 0 after the division; the smallest
    # positive float32 keeps it finite and still within half a step of every value.
    scale = np.where(peak > 0, np.maximum(scale, np.finfo(np.float32).smallest_subnormal), 1.0)
    scale = scale.astype(np.float32)
    # Near float32's largest value, 127 * scale can round up to inf when dequantized; one ulp
    # less keeps it finite (the peak's code is still 127, now a hair short of 127.5 steps).
    with np.errstate(over="ignore"):
        overflows = np.isinf(scale * np.float32(INT8_LIMIT))
    scale = np.where(overflows, np.nextafter(scale, np.float32(0)), scale)
    # A subnormal scale rounds in absolute steps and can land below peak / 127, which would clip
    # the peak's code; one step up restores it (float64 division sees the shortfall exactly).
    short = (peak > 0) & (peak.astype(np.float64) / scale.astype(np.float64) > INT8_LIMIT + 0.5)
    scale = np.where(short, np.nextafter(scale, np.float32(np.inf)), scale).astype(np.float32)
    # Only the nonzeros are divided (a dense float64 temporary is the slow part), in float64 so
    # the rounding error stays within scale / 2 exactly.
    rows, cols = np.nonzero(w)
    codes = np.zeros(w.shape, dtype=np.int8)
    codes[rows, cols] = np.clip(
        np.rint(w[rows, cols] / scale[rows].astype(np.float64)), -INT8_LIMIT, INT8_LIMIT
    )
    return codes, scale


def _indptr_from_counts(counts: np.ndarray) -> np.ndarray:
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    if indptr[-1] > _INT32_MAX:
        raise BadInput(f"{indptr[-1]} stored values do not fit int32 offsets; split the layer")
    return indptr.astype(np.int32)


def _csr_arrays(stored: np.ndarray, index_type: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """data, indices, indptr of the nonzeros, row by row (np.nonzero walks in row-major order)."""
    present = stored != 0
    columns = np.nonzero(present)[1]
    return stored[present], columns.astype(index_type), _indptr_from_counts(present.sum(axis=1))


def _bsr_arrays(
    stored: np.ndarray, index_type: np.dtype, block: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = stored.shape
    height, width = block
    block_rows, block_cols = -(-rows // height), -(-cols // width)
    padded = np.pad(stored, ((0, block_rows * height - rows), (0, block_cols * width - cols)))
    blocks = padded.reshape(block_rows, height, block_cols, width).swapaxes(1, 2)
    present = blocks.any(axis=(2, 3))
    row_of_block, col_of_block = np.nonzero(present)
    data = blocks[row_of_block, col_of_block]  # fancy indexing copies: [nblocks, R, C], contiguous
    return data, col_of_block.astype(index_type), _indptr_from_counts(present.sum(axis=1))


def _sell_arrays(
    stored: np.ndarray, index_type: np.dtype, slice_height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SELL from CSR: element j of row r goes to slice_ptr[r // C] + j*C + r % C."""
    csr_data, csr_columns, csr_indptr = _csr_arrays(stored, index_type)
    rows = stored.shape[0]
    num_slices = -(-rows // slice_height)
    counts = np.zeros(num_slices * slice_height, dtype=np.int64)
    counts[:rows] = np.diff(csr_indptr)
    widths = counts.reshape(num_slices, slice_height).max(axis=1, initial=0)
    slice_ptr = _indptr_from_counts(widths * slice_height)
    row_of = np.repeat(np.arange(rows), counts[:rows])
    position_in_row = np.arange(len(csr_data)) - csr_indptr[row_of]
    where = slice_ptr[row_of // slice_height] + position_in_row * slice_height + row_of % slice_height
    data = np.zeros(slice_ptr[-1], dtype=stored.dtype)
    indices = np.zeros(slice_ptr[-1], dtype=index_type)  # padding: value 0 at column 0
    data[where] = csr_data
    indices[where] = csr_columns
    return data, indices, slice_ptr


# ------------------------------------------------------------------------------- sparse -> dense


def _repeat_per_segment(indptr: np.ndarray) -> np.ndarray:
    """For each stored entry, the segment (row, column, block row or slice) whose range holds it."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def _dense_csr(m: SparseMatrix) -> np.ndarray:
    dense = np.zeros(m.shape, dtype=np.float32)
    dense[_repeat_per_segment(m.indptr), m.indices] = m.data
    return dense


def _dense_csc(m: SparseMatrix) -> np.ndarray:
    dense = np.zeros(m.shape, dtype=np.float32)
    dense[m.indices, _repeat_per_segment(m.indptr)] = m.data
    return dense


def _dense_bsr(m: SparseMatrix) -> np.ndarray:
    rows, cols = m.shape
    height, width = m.block
    block_rows, block_cols = len(m.indptr) - 1, -(-cols // width)
    blocks = np.zeros((block_rows, block_cols, height, width), dtype=np.float32)
    blocks[_repeat_per_segment(m.indptr), m.indices] = m.data
    padded = blocks.swapaxes(1, 2).reshape(block_rows * height, block_cols * width)
    return np.ascontiguousarray(padded[:rows, :cols])


def _dense_sell(m: SparseMatrix) -> np.ndarray:
    slice_of = _repeat_per_segment(m.indptr)
    offset = np.arange(m.data.size) - m.indptr[slice_of]
    row_of = slice_of * m.slice_height + offset % m.slice_height
    # Padding (value 0 at column 0) must not overwrite a real entry of column 0 in the same row.
    real = m.data != 0
    dense = np.zeros(m.shape, dtype=np.float32)
    dense[row_of[real], m.indices[real]] = m.data[real]
    return dense


_DENSIFIERS = {"csr": _dense_csr, "csc": _dense_csc, "bsr": _dense_bsr, "sell": _dense_sell}
