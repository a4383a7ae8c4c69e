"""Which sparse format a layer should use: the bytes each one moves for one batch-1 product.

At batch 1 a sparse matrix-vector product is memory-bound on every profile (DESIGN.md §7:
Polaris's ridge is ~24 FLOP/byte, a SpMV does 2 FLOP per stored value), so the format that
moves the fewest bytes is the fastest. For W [N, K] and one input row the kernel moves:

    values      stored entries × value bytes (4 fp32, 2 fp16, 1 int8), padding included
    indices     csr/sell: one per stored entry; bsr: one per stored block (uint16 when it fits)
    pointers    int32: csr N+1 row pointers, bsr ceil(N/R)+1, sell ceil(N/C)+1 slice pointers
    scale       int8 only: one float32 per row
    X and Y     K and N float32: the same for every format, counted so totals are real traffic

Padding is what separates the formats. SELL-C pads every row of a slice to the slice's longest
row, so it pays off when rows are even (it saves N·(1 - 1/C) row pointers); its slice height C
is the profile's wavefront, the rows one SIMD instruction serves. BSR stores whole R×C blocks,
zeros included, with one index per block: it wins only when its fill (nonzeros / stored block
entries) is high enough that the indices saved outweigh the zeros stored. `auto` takes the
cheapest, csr on a tie, and the row says why.

On a profile with `row_per_work_item` (the PoCL CPU device) the kernel gives each work-item a
whole row, and DESIGN.md §7 records that this beats SELL-C slicing there, so `auto` does not
consider sell on such a profile (asking for format=sell still gets it).

Counts come from the CSR that `from_dense` builds, so an entry the value type drops (an fp16
underflow, an int8 code of 0) is not counted, and each format's storage bytes equal what
`from_dense` stores (`SparseMatrix.nbytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polaris_opt.devices import PROFILES, DeviceProfile
from polaris_opt.errors import BadInput
from polaris_opt.sparse.formats import VALUE_TYPES, SparseMatrix, from_dense, index_dtype

# The formats a SparseMatMul/SparseConv node can hold (csc is for other consumers).
KERNEL_FORMATS = ("csr", "bsr", "sell")
# Square blocks tried for bsr: the shapes block pruning usually produces.
BLOCK_SHAPES = ((2, 2), (4, 4), (8, 8))
ACTIVATION_BYTES = 4  # X and Y are float32
POINTER_BYTES = 4  # indptr is int32
SCALE_BYTES = 4  # int8: one float32 scale per row


@dataclass(frozen=True)
class FormatCost:
    """The bytes one format of one matrix moves for a batch-1 product."""

    format: str
    shape: tuple[int, int]
    nonzeros: int
    stored: int  # entries stored, padding and block fill included
    value_bytes: int
    index_bytes: int
    pointer_bytes: int
    scale_bytes: int
    activation_bytes: int
    index: str  # "uint16" | "int32"
    block: tuple[int, int] = (1, 1)
    slice_height: int = 0

    @property
    def label(self) -> str:
        if self.format == "bsr":
            return f"bsr {self.block[0]}x{self.block[1]}"
        if self.format == "sell":
            return f"sell-{self.slice_height}"
        return self.format

    @property
    def storage_bytes(self) -> int:
        """What the weight takes stored: `SparseMatrix.nbytes` of this format."""
        return self.value_bytes + self.index_bytes + self.pointer_bytes + self.scale_bytes

    @property
    def total_bytes(self) -> int:
        """Everything a batch-1 product moves: the stored weight plus X read and Y written."""
        return self.storage_bytes + self.activation_bytes

    @property
    def padding(self) -> int:
        """Stored zeros: SELL's padding entries or the empty entries of BSR's blocks."""
        return self.stored - self.nonzeros

    @property
    def fill(self) -> float:
        """Nonzeros per stored entry (1.0 for csr)."""
        return self.nonzeros / self.stored if self.stored else 1.0

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "label": self.label,
            "block": list(self.block),
            "slice_height": self.slice_height,
            "index": self.index,
            "nonzeros": self.nonzeros,
            "stored": self.stored,
            "fill": self.fill,
            "storage_bytes": self.storage_bytes,
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class FormatChoice:
    """The format chosen for one matrix, the costs it was chosen from, and why."""

    chosen: FormatCost
    candidates: tuple[FormatCost, ...]
    dense_bytes: int  # the dense float32 product: N·K weights plus X and Y
    reason: str

    def to_dict(self) -> dict:
        return {
            "format": self.chosen.label,
            "reason": self.reason,
            "moved_bytes": {cost.label: cost.total_bytes for cost in self.candidates},
            "dense_moved_bytes": self.dense_bytes,
        }


def resolve_profile(profile: str | DeviceProfile) -> DeviceProfile:
    """The profile named `profile` (or `profile` itself); BadInput naming the valid ones."""
    if isinstance(profile, DeviceProfile):
        return profile
    if profile not in PROFILES:
        raise BadInput(f"unknown device profile '{profile}'; valid: {', '.join(PROFILES)}")
    return PROFILES[profile]


def format_costs(
    w: np.ndarray, profile: str | DeviceProfile = "cpu", values: str = "fp32"
) -> list[FormatCost]:
    """The cost of W [N, K] as csr, as bsr in each of BLOCK_SHAPES, and as sell-C (C = wavefront)."""
    profile = resolve_profile(profile)
    csr = from_dense(w, "csr", values=values)
    costs = [_csr_cost(csr, values)]
    costs += [_bsr_cost(csr, values, block) for block in BLOCK_SHAPES]
    costs.append(_sell_cost(csr, values, profile.wavefront))
    return costs


def choose_format(
    w: np.ndarray, profile: str | DeviceProfile = "cpu", values: str = "fp32", format: str = "auto"
) -> FormatChoice:
    """The format for W [N, K]: `format` itself (its cheapest block for bsr), or with "auto" the
    fewest bytes moved among the formats the profile's kernels favour."""
    profile = resolve_profile(profile)
    if format != "auto" and format not in KERNEL_FORMATS:
        raise BadInput(f"unknown sparse format '{format}'; valid: auto, {', '.join(KERNEL_FORMATS)}")
    costs = format_costs(w, profile, values)
    rows, cols = np.shape(w)
    dense = (rows * cols + rows + cols) * ACTIVATION_BYTES
    if format != "auto":
        asked = [cost for cost in costs if cost.format == format]
        chosen = _cheapest(asked)
        return FormatChoice(chosen, tuple(costs), dense, _asked_reason(chosen, asked))
    considered = [cost for cost in costs if not (cost.format == "sell" and profile.row_per_work_item)]
    chosen = _cheapest(considered)
    reason = _auto_reason(chosen, considered, profile, len(considered) < len(costs))
    return FormatChoice(chosen, tuple(costs), dense, reason)


# ------------------------------------------------------------------------------------ costs


def _index_bytes(extent: int) -> tuple[str, int]:
    dtype = index_dtype(extent, "auto")
    return dtype.name, dtype.itemsize


def _common(csr: SparseMatrix, values: str) -> dict:
    rows, cols = csr.shape
    return {
        "shape": csr.shape,
        "nonzeros": csr.nnz,
        "scale_bytes": rows * SCALE_BYTES if values == "int8" else 0,
        "activation_bytes": (rows + cols) * ACTIVATION_BYTES,
    }


def _csr_cost(csr: SparseMatrix, values: str) -> FormatCost:
    rows, cols = csr.shape
    index, index_size = _index_bytes(cols)
    return FormatCost(
        "csr",
        stored=csr.nnz,
        value_bytes=csr.nnz * VALUE_TYPES[values].itemsize,
        index_bytes=csr.nnz * index_size,
        pointer_bytes=(rows + 1) * POINTER_BYTES,
        index=index,
        **_common(csr, values),
    )


def _bsr_cost(csr: SparseMatrix, values: str, block: tuple[int, int]) -> FormatCost:
    rows, cols = csr.shape
    height, width = block
    block_cols = -(-cols // width)
    row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(csr.indptr))
    # A block is stored when any of its entries is: count the distinct (block row, block column).
    blocks = np.unique((row_of // height) * block_cols + csr.indices.astype(np.int64) // width).size
    index, index_size = _index_bytes(block_cols)
    stored = blocks * height * width
    return FormatCost(
        "bsr",
        stored=stored,
        value_bytes=stored * VALUE_TYPES[values].itemsize,
        index_bytes=blocks * index_size,
        pointer_bytes=(-(-rows // height) + 1) * POINTER_BYTES,
        index=index,
        block=block,
        **_common(csr, values),
    )


def _sell_cost(csr: SparseMatrix, values: str, slice_height: int) -> FormatCost:
    rows, cols = csr.shape
    slices = -(-rows // slice_height)
    counts = np.zeros(slices * slice_height, dtype=np.int64)
    counts[:rows] = np.diff(csr.indptr)
    # Every row of a slice is padded to the slice's longest row.
    stored = int(counts.reshape(slices, slice_height).max(axis=1, initial=0).sum()) * slice_height
    index, index_size = _index_bytes(cols)
    return FormatCost(
        "sell",
        stored=stored,
        value_bytes=stored * VALUE_TYPES[values].itemsize,
        index_bytes=stored * index_size,
        pointer_bytes=(slices + 1) * POINTER_BYTES,
        index=index,
        slice_height=slice_height,
        **_common(csr, values),
    )


# ----------------------------------------------------------------------------------- choice


def _cheapest(costs: list[FormatCost]) -> FormatCost:
    # min() keeps the first of equals, and csr comes first: no padding for nothing on a tie.
    return min(costs, key=lambda cost: cost.total_bytes)


def _auto_reason(
    chosen: FormatCost, considered: list[FormatCost], profile: DeviceProfile, no_sell: bool
) -> str:
    """One line: why `chosen` beat the best of each other format."""
    best_of: dict[str, FormatCost] = {}
    for cost in considered:
        if cost.format == chosen.format:
            continue
        if cost.format not in best_of or cost.total_bytes < best_of[cost.format].total_bytes:
            best_of[cost.format] = cost
    parts = [f"{_describe(chosen)}: fewest bytes moved ({chosen.total_bytes:,})"]
    parts += [_versus(chosen, other) for other in best_of.values()]
    if no_sell:
        parts.append(f"sell not considered: the {profile.name} profile runs one work-item per row")
    return "; ".join(parts)


def _asked_reason(chosen: FormatCost, asked: list[FormatCost]) -> str:
    reason = f"{chosen.format} as asked: {_describe(chosen)}"
    if len(asked) > 1:
        reason += f", the cheapest of {', '.join(cost.label for cost in asked)}"
    return reason


def _describe(cost: FormatCost) -> str:
    if cost.format == "bsr":
        return f"{cost.label} fill {cost.fill:.0%}"
    if cost.format == "sell":
        return f"{cost.label} padding {_padding_share(cost):.0%}"
    return "csr"


def _versus(chosen: FormatCost, other: FormatCost) -> str:
    ratio = other.total_bytes / max(chosen.total_bytes, 1)
    return f"{_describe(other)} would move {ratio:.2f}x"


def _padding_share(cost: FormatCost) -> float:
    return cost.padding / cost.stored if cost.stored else 0.0
