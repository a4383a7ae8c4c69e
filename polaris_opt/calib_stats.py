"""Calibration statistics: streaming per-tensor statistics, the range methods, and the table the
`calibrate` pass leaves in the PassContext for later passes (DESIGN.md §8).

Each tensor gets a `TensorStats`: count, exact running min and max, and (except for minmax) a
histogram of `bins` equal bins over [-R, R], R a power of two. When a value reaches R, R doubles
and adjacent bin pairs merge, so the old histogram lands in the middle half. Because R and the
bin count are powers of two, bin edges nest exactly: a value binned at R and then re-binned
lands where binning it at 2R directly would put it. Counts therefore never depend on the order
the data came in, and the statistics of two halves of the data merge into exactly the
statistics of the whole, which lets calibration be split across processes or machines.

The bin index is floor(x · bins / 2R) + bins/2: the multiplier is a power of two, so the
product is exact and the floor is the true one. R is the smallest power of two *strictly*
above max|x| (a value equal to R would need bin index `bins`, outside the histogram; closing
the last bin instead would break the nesting at that one edge).
"""

from __future__ import annotations

import enum
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polaris_opt.errors import BadInput

DEFAULT_BINS = 2048
MAX_BINS = 1 << 20
CHUNK = 1 << 16  # values histogrammed at a time (see bin_counts)
# R never goes below 2**MIN_EXPONENT: an all-zero tensor needs some valid R, and a floor keeps
# the power-of-two multiplier representable in float32 for tensors of tiny values.
MIN_EXPONENT = -64
FILE_FORMAT = 1
# Probability given to a bin of Q that is empty where P is not (entropy method).
SMOOTHING = 1e-4
# The largest share of values an entropy threshold may clip (see entropy_threshold): 0.01 %.
# KL divergence scores one tensor's histogram and is blind to what clipping its tail costs the
# layers after it; measured on the zoo, allowing 5 % or 0.1 % cost up to 14 dB of output SQNR
# (digits_cnn, whose input pixels take few distinct values), 0.01 % costs none.
ENTROPY_MAX_CLIPPED = 1e-4


class CalibMethod(str, enum.Enum):
    """How a tensor's range is chosen from its statistics."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class NonFiniteValues(ValueError):
    """A tensor handed to `TensorStats.update` holds NaN or Inf."""


def check_bins(bins: int) -> None:
    """ValueError unless `bins` is a power of two in [16, MAX_BINS]."""
    if not (16 <= bins <= MAX_BINS and bins & (bins - 1) == 0):
        raise ValueError(f"bins must be a power of two from 16 to {MAX_BINS}, got {bins}")


def exponent_for(amax: float) -> int:
    """k of the smallest R = 2**k strictly above `amax` (never below 2**MIN_EXPONENT)."""
    if amax <= 0.0:
        return MIN_EXPONENT
    return max(MIN_EXPONENT, math.frexp(amax)[1])  # amax = m·2**e with 0.5 <= m < 1


@dataclass
class TensorStats:
    """Streaming statistics of one tensor; `bins=None` keeps min/max only (method minmax)."""

    bins: int | None = DEFAULT_BINS
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    exponent: int = MIN_EXPONENT  # the histogram spans [-2**exponent, 2**exponent)
    counts: np.ndarray | None = None  # int64 [bins]

    def __post_init__(self) -> None:
        if self.bins is None:
            self.counts = None
            return
        check_bins(self.bins)
        if self.counts is None:
            self.counts = np.zeros(self.bins, dtype=np.int64)
        elif self.counts.shape != (self.bins,):
            raise ValueError(f"histogram has shape {self.counts.shape}, expected ({self.bins},)")

    @property
    def has_histogram(self) -> bool:
        return self.counts is not None

    @property
    def bin_width(self) -> float:
        return 2.0 ** (self.exponent + 1) / self.bins

    def edges(self) -> np.ndarray:
        """The bins + 1 bin edges, exact: multiples of a power of two."""
        return (np.arange(self.bins + 1, dtype=np.float64) - self.bins // 2) * self.bin_width

    def update(self, values: np.ndarray) -> None:
        """Fold a batch of values in; NonFiniteValues if any is NaN or Inf."""
        flat = np.asarray(values).reshape(-1)
        if flat.size == 0:
            return
        if flat.dtype not in (np.float32, np.float64):
            flat = flat.astype(np.float32)
        # NaN propagates through min and max, and an Inf is a min or a max: no extra pass needed.
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteValues("values are NaN or Inf")
        self.count += flat.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.counts is not None:
            self._grow_to(exponent_for(max(-lo, hi)))
            self.counts += bin_counts(flat, self.exponent, self.bins)

    def update_extremes(self, lo: float, hi: float, total: float, count: int) -> None:
        """Fold in a batch known only by its min, max, sum and size (no histogram kept)."""
        if count == 0:
            return
        if self.counts is not None:
            raise ValueError("a histogram needs the values themselves, not their extremes")
        # NaN is skipped by ONNX Runtime's min and max but not by the sum; an Inf is a min or a max.
        if math.isnan(total) or not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteValues("values are NaN or Inf")
        self.count += count
        self.min, self.max = min(self.min, lo), max(self.max, hi)

    def merge(self, other: TensorStats) -> TensorStats:
        """The statistics of both inputs' data together (neither input changes)."""
        if self.bins != other.bins:
            raise ValueError(f"cannot merge statistics of {self.bins} bins with {other.bins} bins")
        merged = self.copy()
        merged.count += other.count
        merged.min, merged.max = min(self.min, other.min), max(self.max, other.max)
        if merged.counts is not None:
            merged._grow_to(other.exponent)
            merged.counts += coarsen(other.counts, merged.exponent - other.exponent)
        return merged

    def copy(self) -> TensorStats:
        counts = None if self.counts is None else self.counts.copy()
        return TensorStats(self.bins, self.count, self.min, self.max, self.exponent, counts)

    def _grow_to(self, exponent: int) -> None:
        if exponent > self.exponent:
            if self.counts.any():  # an empty histogram is the same at any R
                self.counts = coarsen(self.counts, exponent - self.exponent)
            self.exponent = exponent


def bin_counts(flat: np.ndarray, exponent: int, bins: int) -> np.ndarray:
    """Histogram of `flat` (all |x| < 2**exponent) over [-2**exponent, 2**exponent): bincount of
    floor(x · bins/2R) + bins/2.

    The work goes in chunks of CHUNK values through two small scratch arrays that stay in the
    CPU cache; whole-tensor temporaries would be about three times slower (page faults, misses).
    """
    scale = flat.dtype.type(2.0 ** (math.log2(bins) - 1 - exponent))
    counts = np.zeros(bins, dtype=np.int64)
    scaled = np.empty(min(CHUNK, flat.size), dtype=flat.dtype)
    # int32 indices (bins <= MAX_BINS fit) are cheaper to make and to count than int64 ones.
    index = np.empty(scaled.size, dtype=np.int32)
    for start in range(0, flat.size, CHUNK):
        part = flat[start : start + CHUNK]
        chunk, chunk_index = scaled[: part.size], index[: part.size]
        np.multiply(part, scale, out=chunk)
        np.floor(chunk, out=chunk)
        chunk += bins // 2
        np.copyto(chunk_index, chunk, casting="unsafe")
        counts += np.bincount(chunk_index, minlength=bins)
    return counts


def coarsen(counts: np.ndarray, doublings: int) -> np.ndarray:
    """`counts` re-binned for a range 2**doublings times wider: each doubling merges bin pairs
    into the middle half. After log2(bins) doublings everything sits in the two centre bins and
    stays there, so at most that many are done."""
    bins = counts.size
    for _ in range(min(doublings, bins.bit_length() - 1)):
        wider = np.zeros_like(counts)
        wider[bins // 4 : bins - bins // 4] = counts.reshape(-1, 2).sum(axis=1)
        counts = wider
    return counts


def _non_finite(name: str, batch: int) -> BadInput:
    return BadInput(
        f"calibration: activation '{name}' is NaN or Inf on batch {batch}; check the calibration data"
    )


def collect_extremes(
    stream: Iterable[dict[str, np.ndarray]], scalars: dict[str, tuple]
) -> tuple[dict[str, TensorStats], int]:
    """Min/max statistics from a stream of `capture.with_extremes` outputs: per tensor name, the
    names of its (min, max, sum, size) scalars."""
    stats = {name: TensorStats(None) for name in scalars}
    batches = 0
    for values in stream:
        batches += 1
        for name, (lo, hi, total, size) in scalars.items():
            try:
                stats[name].update_extremes(
                    float(values[lo]), float(values[hi]), float(values[total]), int(values[size])
                )
            except NonFiniteValues:
                raise _non_finite(name, batches) from None
    return stats, batches


def collect_stats(
    stream: Iterable[dict[str, np.ndarray]], names: Sequence[str], *, bins: int | None
) -> tuple[dict[str, TensorStats], int]:
    """One TensorStats per name from a stream of per-batch tensor values, and the batch count.

    Each batch is reduced and dropped before the next is asked for, so memory stays that of one
    batch. A tensor missing from a batch is skipped for that batch.
    """
    stats = {name: TensorStats(bins) for name in names}
    batches = 0
    # Not enumerate(): its reused result tuple would keep the last batch alive during next().
    for values in stream:
        batches += 1
        for name, tensor_stats in stats.items():
            if name not in values:
                continue
            try:
                tensor_stats.update(values[name])
            except NonFiniteValues:
                raise _non_finite(name, batches) from None
        del values  # the generator computes the next batch while this name still holds the last
    return stats, batches


# ------------------------------------------------------------------------------- range methods


def tensor_range(
    stats: TensorStats, method: CalibMethod | str, *, percentile: float = 99.99, num_bits: int = 8
) -> tuple[float, float]:
    """The range (lo <= hi, finite) that `method` chooses from `stats`; (0, 0) with no data."""
    method = CalibMethod(method)
    if stats.count == 0:
        return 0.0, 0.0
    if method is CalibMethod.MINMAX:
        return float(stats.min), float(stats.max)
    if not stats.has_histogram:
        raise ValueError(f"method {method.value} needs a histogram; these statistics have min/max only")
    if method is CalibMethod.PERCENTILE:
        return percentile_range(stats, percentile)
    if method is CalibMethod.ENTROPY:
        return clip_range(stats, entropy_threshold(stats, num_bits))
    return clip_range(stats, mse_threshold(stats, num_bits))


def clip_range(stats: TensorStats, threshold: float) -> tuple[float, float]:
    """(max(min, -t), min(max, t)); t is first raised so the range is never empty."""
    t = max(threshold, 0.0, stats.min, -stats.max)
    return float(max(stats.min, -t)), float(min(stats.max, t))


def percentile_range(stats: TensorStats, percentile: float) -> tuple[float, float]:
    """Cut (100 - p)/2 % of the mass at each end, to bin-edge precision, within [min, max]."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    counts = stats.counts
    cut = stats.count * (100.0 - percentile) / 200.0
    through = np.cumsum(counts)  # mass up to and including each bin
    before = through - counts  # mass below each bin
    first = int(np.searchsorted(through, cut, side="right"))  # first bin whose mass passes the cut
    last = int(np.searchsorted(before, stats.count - cut, side="left")) - 1
    edges = stats.edges()
    return float(max(edges[first], stats.min)), float(min(edges[last + 1], stats.max))


def folded_counts(stats: TensorStats) -> np.ndarray:
    """The histogram of |x|: bins//2 bins over [0, R), bin j holding both ±[j·w, (j+1)·w)."""
    half = stats.bins // 2
    return stats.counts[half:] + stats.counts[half - 1 :: -1]


def _first_useful_bin(stats: TensorStats) -> int:
    # A threshold below max(min, -max) would clip every value (a tensor of one sign): skip it.
    floor = max(0.0, stats.min, -stats.max)
    return max(1, math.ceil(floor / stats.bin_width))


def entropy_threshold(stats: TensorStats, num_bits: int = 8) -> float:
    """TensorRT's threshold: the |x| cut-off i·w whose clipped distribution P (outliers added to
    its last bin) differs least, in KL divergence, from Q, that distribution quantized to
    2**(num_bits-1) levels. All candidates i are scored at once from prefix sums.

    Candidates clipping more than ENTROPY_MAX_CLIPPED (0.01 %) of the values are not considered: when
    most of the mass lies beyond a threshold, P collapses onto its last bin, a spike that Q
    matches exactly, and the divergence goes to 0 for a useless range (one-signed data far from
    0, e.g. values in [0.5, 0.9], would be cut down to 0.5).
    """
    # uint8 activations spend all 2**num_bits levels on a one-signed tensor (a Relu's output),
    # but only half of them on each side of a signed one.
    levels = 2**num_bits if stats.min >= 0 else 2 ** (num_bits - 1)
    folded = folded_counts(stats).astype(np.float64)
    used = int(np.flatnonzero(folded)[-1]) + 1
    kept_enough = int(np.searchsorted(np.cumsum(folded), (1.0 - ENTROPY_MAX_CLIPPED) * stats.count)) + 1
    start = max(levels, _first_useful_bin(stats), kept_enough)
    if used <= start:  # too few occupied bins to clip anything
        return math.inf
    candidates = np.arange(start, used + 1)
    # The bin at 0 is left out of the divergence: zero is represented exactly (the zero point),
    # and after a Relu it holds half the mass, a spike that Q would smear over its chunk's bins —
    # which pulls the threshold down to about 2σ and clips the layer hard.
    scored = folded.copy()
    scored[0] = 0.0
    divergence = _kl_divergences(scored, candidates, levels)
    if not np.isfinite(divergence).any():
        return math.inf
    return float(candidates[np.argmin(divergence)] * stats.bin_width)


def _kl_divergences(folded: np.ndarray, candidates: np.ndarray, levels: int) -> np.ndarray:
    """KL(P_i || Q_i) for each candidate length i, as in TensorRT's entropy calibration.

    P_i = folded[:i] with the mass beyond i added to bin i-1. Q_i splits folded[:i] (without the
    outliers) into `levels` chunks and spreads each chunk's mass evenly over the bins where
    P_i is non-zero. With Σp = P and Σq = Q,
        KL = (Σ p·log p − Σ p·log q) / P − log P + log Q,
    and Σ p·log q is, per chunk, (mass of P in the chunk) · log(chunk mass / non-zero bins).
    """
    total = folded.sum()
    mass = np.concatenate(([0.0], np.cumsum(folded)))
    nonzero = np.concatenate(([0], np.cumsum(folded > 0)))
    logs = np.log(folded, out=np.zeros_like(folded), where=folded > 0)
    plogp = np.concatenate(([0.0], np.cumsum(folded * logs)))
    # Chunk k of candidate i spans [k·i // levels, (k+1)·i // levels).
    bounds = candidates[:, None] * np.arange(levels + 1) // levels
    chunk_mass = np.diff(mass[bounds], axis=1)
    chunk_nonzero = np.diff(nonzero[bounds], axis=1)
    outliers = total - mass[candidates]
    last_bin = folded[candidates - 1]
    p_last = last_bin + outliers
    # Outliers make P's last bin non-zero even where the data has no value of its own.
    chunk_nonzero[:, -1] += (last_bin == 0) & (outliers > 0)
    p_chunk_mass = chunk_mass.copy()
    p_chunk_mass[:, -1] += outliers
    q_total = mass[candidates]
    # Where P has outliers but Q no mass at all, Q gets probability SMOOTHING (TensorRT and ONNX
    # Runtime smooth zeros the same way) instead of 0, which would make the candidate useless.
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = np.log(SMOOTHING * q_total)[:, None]
        log_q = np.where(chunk_mass > 0, np.log(chunk_mass / chunk_nonzero), floor)
        p_log_q = np.where(p_chunk_mass > 0, p_chunk_mass * log_q, 0.0).sum(axis=1)
        p_log_p = plogp[candidates - 1] + p_last * np.log(p_last)
        divergence = (p_log_p - p_log_q) / total - np.log(total) + np.log(q_total)
    # A candidate whose slice holds no data at all clips everything: never the best.
    return np.where((q_total > 0) & np.isfinite(divergence), divergence, np.inf)


def mse_threshold(stats: TensorStats, num_bits: int = 8) -> float:
    """The |x| cut-off t (a bin edge) minimising the expected squared error of asymmetric
    quantization to [max(min, -t), min(max, t)] (widened to hold 0, as quantization does):
    clipping error from the bin centres beyond ±t, plus scale²/12 for each value inside.
    All candidates are scored at once from prefix sums of n, n·c, n·c², in units of bins.
    """
    counts = stats.counts.astype(np.float64)
    half = stats.bins // 2
    used = int(np.flatnonzero(folded_counts(stats))[-1]) + 1
    t = np.arange(_first_useful_bin(stats), used + 1, dtype=np.float64)
    centres = np.arange(stats.bins) - half + 0.5
    n, nc, ncc = (
        np.concatenate(([0.0], np.cumsum(w))) for w in (counts, counts * centres, counts * centres**2)
    )
    upper = (half + t).astype(np.intp)  # bins from here up lie above t
    lower = (half - t).astype(np.intp)  # bins below here lie under -t
    above = (ncc[-1] - ncc[upper]) - 2 * t * (nc[-1] - nc[upper]) + t**2 * (n[-1] - n[upper])
    below = ncc[lower] + 2 * t * nc[lower] + t**2 * n[lower]
    inside = n[upper] - n[lower]
    lo = np.minimum(np.maximum(stats.min / stats.bin_width, -t), 0.0)
    hi = np.maximum(np.minimum(stats.max / stats.bin_width, t), 0.0)
    scale = (hi - lo) / (2**num_bits - 1)
    error = np.maximum(above, 0.0) + np.maximum(below, 0.0) + inside * scale**2 / 12.0
    return float(t[np.argmin(error)] * stats.bin_width)


# ----------------------------------------------------------------------------------- the table


@dataclass
class CalibrationTable:
    """The range chosen for each calibrated tensor by `method`, and the statistics behind it."""

    method: str
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    stats: dict[str, TensorStats] = field(default_factory=dict)
    percentile: float = 99.99
    batches: int = 0  # how many batches the statistics were collected from

    @classmethod
    def from_stats(
        cls,
        method: CalibMethod | str,
        stats: dict[str, TensorStats],
        *,
        percentile: float = 99.99,
        batches: int = 0,
    ) -> CalibrationTable:
        """Ranges by `method` for every tensor that saw data (a tensor with none gets no range)."""
        method = CalibMethod(method)
        ranges = {
            name: tensor_range(s, method, percentile=percentile) for name, s in stats.items() if s.count > 0
        }
        return cls(method.value, ranges, dict(stats), percentile, batches)

    def merge(self, other: CalibrationTable) -> CalibrationTable:
        """One table from the statistics of both (e.g. two halves of the data); ranges recomputed."""
        if self.method != other.method:
            raise BadInput(f"calibration: cannot merge a {self.method} table with a {other.method} table")
        for table in (self, other):
            missing = sorted(set(table.ranges) - set(table.stats))
            if missing:
                raise BadInput(f"calibration: cannot merge a table without statistics for '{missing[0]}'")
        stats = {name: s.copy() for name, s in self.stats.items()}
        for name, s in other.stats.items():
            stats[name] = stats[name].merge(s) if name in stats else s.copy()
        return CalibrationTable.from_stats(
            self.method, stats, percentile=self.percentile, batches=self.batches + other.batches
        )

    def save(self, path: str | Path) -> None:
        """Write the table to an .npz file atomically (a temporary file beside it, then a rename)."""
        path = Path(path)
        arrays = _table_arrays(self)
        handle = tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
        try:
            with handle:
                np.savez(handle, **arrays)
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        """Read a table written by `save`; BadInput when the file is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return _table_from_arrays({key: data[key] for key in data.files})
        except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:
            raise BadInput(f"calibration: cannot read statistics from {path}: {exc}") from None


def _table_arrays(table: CalibrationTable) -> dict[str, np.ndarray]:
    stats = list(table.stats.values())
    bins = {s.bins for s in stats}
    if len(bins) > 1:
        raise ValueError(f"cannot save statistics of different bin counts {sorted(map(str, bins))}")
    width = (bins.pop() or 0) if bins else 0
    counts = np.stack([s.counts for s in stats]) if width else np.zeros((len(stats), 0), np.int64)
    range_names = list(table.ranges)
    return {
        "format": np.array(FILE_FORMAT),
        "method": np.array(table.method),
        "percentile": np.array(table.percentile, dtype=np.float64),
        "batches": np.array(table.batches, dtype=np.int64),
        "bins": np.array(width, dtype=np.int64),
        "names": np.array(list(table.stats), dtype=str),
        "count": np.array([s.count for s in stats], dtype=np.int64),
        "min": np.array([s.min for s in stats], dtype=np.float64),
        "max": np.array([s.max for s in stats], dtype=np.float64),
        "exponent": np.array([s.exponent for s in stats], dtype=np.int64),
        "counts": counts.astype(np.int64),
        "range_names": np.array(range_names, dtype=str),
        "range_lo": np.array([table.ranges[n][0] for n in range_names], dtype=np.float64),
        "range_hi": np.array([table.ranges[n][1] for n in range_names], dtype=np.float64),
    }


def _table_from_arrays(data: dict[str, np.ndarray]) -> CalibrationTable:
    if int(data["format"]) != FILE_FORMAT:
        raise ValueError(f"file format {int(data['format'])}, expected {FILE_FORMAT}")
    width = int(data["bins"])
    stats = {}
    for index, name in enumerate(data["names"].tolist()):
        counts = data["counts"][index].copy() if width else None
        stats[name] = TensorStats(
            width or None,
            int(data["count"][index]),
            float(data["min"][index]),
            float(data["max"][index]),
            int(data["exponent"][index]),
            counts,
        )
    lo, hi = data["range_lo"].tolist(), data["range_hi"].tolist()
    ranges = {name: (lo[i], hi[i]) for i, name in enumerate(data["range_names"].tolist())}
    return CalibrationTable(
        str(data["method"]), ranges, stats, float(data["percentile"]), int(data["batches"])
    )
