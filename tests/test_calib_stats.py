"""calib_stats: exact re-binning and merging, each range method against a NumPy reference,
degenerate tensors, NaN/Inf, and the table's .npz round trip and merge."""

from __future__ import annotations

import math
import time
import weakref

import numpy as np
import pytest

from polaris_opt.calib_stats import (
    ENTROPY_MAX_CLIPPED,
    MIN_EXPONENT,
    SMOOTHING,
    CalibMethod,
    CalibrationTable,
    NonFiniteValues,
    TensorStats,
    _kl_divergences,
    collect_stats,
    entropy_threshold,
    folded_counts,
    mse_threshold,
    tensor_range,
)
from polaris_opt.errors import BadInput

RNG = np.random.default_rng(0)
HISTOGRAM_METHODS = [CalibMethod.PERCENTILE, CalibMethod.ENTROPY, CalibMethod.MSE]


def stats_of(*batches: np.ndarray, bins: int | None = 2048) -> TensorStats:
    stats = TensorStats(bins)
    for batch in batches:
        stats.update(batch)
    return stats


def gaussian(n: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(n) * scale).astype(np.float32)


def assert_same_stats(got: TensorStats, expected: TensorStats) -> None:
    assert (got.count, got.min, got.max, got.exponent) == (
        expected.count,
        expected.min,
        expected.max,
        expected.exponent,
    )
    assert got.counts.dtype == np.int64 and np.array_equal(got.counts, expected.counts)


# ----------------------------------------------------------------------- histogram and re-binning


@pytest.mark.parametrize(("amax", "exponent"), [(3.0, 2), (4.0, 3), (0.3, -1), (1e-30, -64), (0.0, -64)])
def test_range_is_the_smallest_power_of_two_above_max_abs(amax, exponent):
    stats = stats_of(np.array([-amax / 2, amax], np.float32))
    assert stats.exponent == max(exponent, MIN_EXPONENT)
    assert 2.0**stats.exponent > np.float32(amax)


def test_counts_equal_numpy_histogram_over_the_same_edges():
    values = gaussian(50_000, 3.0)
    stats = stats_of(values)
    expected, _ = np.histogram(values.astype(np.float64), bins=stats.edges())
    assert np.array_equal(stats.counts, expected) and stats.counts.sum() == values.size


def test_growing_range_rebins_exactly():
    # Small values first, then values 10^4 times larger: R doubles ~13 times and the first
    # batch's counts are re-binned; they must equal binning everything at the final R.
    small, large = gaussian(20_000, 0.01), gaussian(20_000, 100.0)
    streamed = stats_of(small, large)
    at_once = stats_of(np.concatenate([small, large]))
    assert_same_stats(streamed, at_once)
    expected, _ = np.histogram(np.concatenate([small, large]).astype(np.float64), bins=at_once.edges())
    assert np.array_equal(streamed.counts, expected)


def test_merging_two_halves_gives_the_whole_bit_for_bit():
    # Halves of very different scales, each in several batches.
    first = [gaussian(7_000, 1e-3) for _ in range(3)]
    second = [gaussian(5_000, 1e3) for _ in range(3)] + [RNG.uniform(-5e3, 2e3, 3_000).astype(np.float32)]
    whole = stats_of(*first, *second)
    a, b = stats_of(*first), stats_of(*second)
    assert_same_stats(a.merge(b), whole)
    assert_same_stats(b.merge(a), whole)
    assert a.count == 21_000  # merge changes neither input


def test_merge_with_empty_statistics_is_identity():
    values = gaussian(1_000, 5.0)
    assert_same_stats(stats_of(values).merge(TensorStats()), stats_of(values))
    assert_same_stats(TensorStats().merge(stats_of(values)), stats_of(values))


def test_merge_of_different_bin_counts_is_refused():
    with pytest.raises(ValueError, match="bins"):
        stats_of(gaussian(10), bins=64).merge(stats_of(gaussian(10), bins=128))


@pytest.mark.parametrize("bins", [8, 100, 3000])
def test_bins_must_be_a_power_of_two_of_at_least_16(bins):
    with pytest.raises(ValueError, match="power of two"):
        TensorStats(bins)


def test_float16_and_float64_values_are_binned_like_float32():
    values = gaussian(4_000, 2.0)
    reference = stats_of(values)
    assert_same_stats(
        stats_of(values.astype(np.float16).astype(np.float32)), stats_of(values.astype(np.float16))
    )
    assert_same_stats(stats_of(values.astype(np.float64)), reference)


def test_minmax_mode_keeps_no_histogram():
    values = [gaussian(1_000, s) for s in (1.0, 7.0)]
    stats = stats_of(*values, bins=None)
    assert stats.counts is None and not stats.has_histogram
    everything = np.concatenate(values)
    assert tensor_range(stats, "minmax") == (float(everything.min()), float(everything.max()))
    assert stats.merge(stats_of(np.array([99.0], np.float32), bins=None)).max == 99.0
    with pytest.raises(ValueError, match="histogram"):
        tensor_range(stats, "percentile")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_refused(bad):
    stats = stats_of(gaussian(10))
    with pytest.raises(NonFiniteValues):
        stats.update(np.array([1.0, bad, 2.0], np.float32))
    assert stats.count == 10  # the bad batch left nothing behind


def test_collect_stats_names_the_tensor_and_the_batch():
    good = {"x": gaussian(8), "y": gaussian(8)}
    bad = {"x": gaussian(8), "y": np.array([0.0, np.nan], np.float32)}
    expected = "calibration: activation 'y' is NaN or Inf on batch 2; check the calibration data"
    with pytest.raises(BadInput, match=expected.replace("(", r"\(")):
        collect_stats([good, bad], ["x", "y"], bins=64)


def test_collect_stats_lets_each_batch_go_before_asking_for_the_next():
    # Memory must not grow with the data: by the time the next batch is computed, nothing here
    # may still reference the last one.
    alive: list[weakref.ref] = []

    def stream():
        for _ in range(3):
            assert all(ref() is None for ref in alive), "a previous batch is still referenced"
            batch = {"x": gaussian(1_000)}
            alive.append(weakref.ref(batch["x"]))
            yield batch
            del batch

    for bins in (None, 64):
        alive.clear()
        assert collect_stats(stream(), ["x"], bins=bins)[1] == 3


def test_collect_stats_counts_batches_and_skips_missing_tensors():
    batches = [{"x": gaussian(8)}, {"x": gaussian(8), "y": gaussian(4)}]
    stats, count = collect_stats(iter(batches), ["x", "y"], bins=None)
    assert count == 2 and stats["x"].count == 16 and stats["y"].count == 4


# ----------------------------------------------------------------------------------- the methods


def test_minmax_is_exact():
    values = gaussian(10_000, 3.0)
    assert tensor_range(stats_of(values), "minmax") == (float(values.min()), float(values.max()))


@pytest.mark.parametrize("percentile", [99.0, 99.9, 90.0])
def test_percentile_is_numpy_percentile_within_a_bin(percentile):
    values = np.concatenate([gaussian(200_000), RNG.exponential(2.0, 50_000).astype(np.float32)])
    stats = stats_of(values)
    lo, hi = tensor_range(stats, "percentile", percentile=percentile)
    cut = (100.0 - percentile) / 2
    expected_lo, expected_hi = np.percentile(values, [cut, 100.0 - cut])
    assert abs(lo - expected_lo) <= stats.bin_width and abs(hi - expected_hi) <= stats.bin_width


def test_percentile_brackets_the_order_statistics_of_the_cut():
    # With few values cut, neighbouring order statistics are far apart: the range is the bin
    # edge just outside the value at the cut's rank on each side.
    values = gaussian(100_000)
    stats = stats_of(values)
    lo, hi = tensor_range(stats, "percentile", percentile=99.99)
    ordered = np.sort(values)
    cut = values.size * 0.01 / 200  # 5 values on each side
    low_value, high_value = ordered[math.floor(cut)], ordered[math.ceil(values.size - cut) - 1]
    assert low_value - stats.bin_width < lo <= low_value
    assert high_value <= hi < high_value + stats.bin_width


def test_percentile_100_keeps_everything():
    values = gaussian(5_000)
    assert tensor_range(stats_of(values), "percentile", percentile=100.0) == (values.min(), values.max())


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5])
def test_percentile_out_of_range_is_refused(percentile):
    with pytest.raises(ValueError, match="percentile"):
        tensor_range(stats_of(gaussian(10)), "percentile", percentile=percentile)


def reference_kl(folded: np.ndarray, length: int, levels: int) -> float:
    """TensorRT's KL(P || Q) for one threshold, written out bin by bin (the formula the
    vectorised search must reproduce, smoothing of empty Q bins included)."""
    p = folded[:length].astype(np.float64)
    p[-1] += folded[length:].sum()
    sliced = folded[:length].astype(np.float64)
    q = np.zeros(length)
    edges = [k * length // levels for k in range(levels + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        nonzero = p[start:stop] > 0
        if nonzero.any():
            q[start:stop][nonzero] = sliced[start:stop].sum() / nonzero.sum()
    if q.sum() == 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    q[(p > 0) & (q == 0)] = SMOOTHING
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


@pytest.mark.parametrize(
    "values",
    [
        np.concatenate([gaussian(30_000), [12.0, -11.0, 9.0]]),  # outliers
        RNG.laplace(0, 1, 30_000),
        np.maximum(gaussian(30_000), 0),  # Relu output: half zeros
    ],
    ids=["gaussian+outliers", "laplace", "relu"],
)
def test_entropy_threshold_matches_a_bin_by_bin_reference(values):
    stats = stats_of(values.astype(np.float32), bins=1024)
    folded = folded_counts(stats)
    used = int(np.flatnonzero(folded)[-1]) + 1
    levels = 256 if values.min() >= 0 else 128  # uint8 spends every level on one-signed data
    candidates = np.arange(levels, used + 1)
    scored = folded.copy()
    scored[0] = 0  # zero is exact: its bin is left out of the divergence
    expected = np.array([reference_kl(scored, i, levels) for i in candidates])
    got = _kl_divergences(scored.astype(np.float64), candidates, levels)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    allowed = folded.sum() - np.cumsum(folded)[candidates - 1] <= ENTROPY_MAX_CLIPPED * folded.sum()
    best = candidates[allowed][np.argmin(expected[allowed])]
    assert entropy_threshold(stats) == best * stats.bin_width


def test_entropy_clips_a_few_huge_outliers_far_below_them():
    values = np.concatenate([gaussian(100_000), [1000.0, -900.0, 950.0]]).astype(np.float32)
    lo, hi = tensor_range(stats_of(values), "entropy")
    assert -200 < lo < -3 and 3 < hi < 200


def test_entropy_on_a_gaussian_keeps_the_body():
    values = gaussian(200_000)
    lo, hi = tensor_range(stats_of(values), "entropy")
    assert values.min() <= lo < -2.5 and 2.5 < hi <= values.max()


def reference_mse_error(values: np.ndarray, t: float, num_bits: int = 8) -> float:
    """Mean squared error of uint8 fake-quantization of `values` to the range clipped at ±t."""
    lo, hi = min(max(values.min(), -t), 0.0), max(min(values.max(), t), 0.0)
    scale = (hi - lo) / (2**num_bits - 1)
    zero_point = np.round(-lo / scale)
    q = np.clip(np.round(values / scale) + zero_point, 0, 2**num_bits - 1)
    return float(np.mean(((q - zero_point) * scale - values) ** 2))


def test_mse_threshold_is_near_the_best_of_a_brute_force_search():
    values = RNG.laplace(0, 1, 100_000)
    stats = stats_of(values)
    chosen = mse_threshold(stats)
    candidates = np.linspace(2.0, np.abs(values).max(), 200)
    best_error = min(reference_mse_error(values, t) for t in candidates)
    assert reference_mse_error(values, chosen) <= 1.02 * best_error


def test_mse_keeps_the_whole_range_of_uniform_data():
    values = RNG.uniform(-1, 1, 100_000)
    lo, hi = tensor_range(stats_of(values), "mse")
    assert lo <= -0.98 and hi >= 0.98


def test_mse_clips_laplacian_tails():
    values = RNG.laplace(0, 1, 100_000)
    lo, hi = tensor_range(stats_of(values), "mse")
    assert 5 < hi < 0.9 * values.max() and 0.9 * values.min() < lo < -5


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0] * 20, (3.0, 3.0)),  # constant
        ([0.0] * 20, (0.0, 0.0)),  # all zeros
        ([-2.5], (-2.5, -2.5)),  # a single value
        ([], (0.0, 0.0)),  # no values at all
    ],
)
@pytest.mark.parametrize("method", list(CalibMethod))
def test_degenerate_tensors_get_their_exact_range(method, values, expected):
    stats = stats_of(np.array(values, np.float32))
    assert tensor_range(stats, method) == expected


@pytest.mark.parametrize("method", list(CalibMethod))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_signed_tensors_get_a_valid_range_inside_min_max(method, sign):
    values = sign * RNG.uniform(0.5, 0.9, 10_000).astype(np.float32)
    lo, hi = tensor_range(stats_of(values), method)
    assert values.min() <= lo <= hi <= values.max()
    assert hi - lo > 0.3  # not clipped down to a point


def test_entropy_over_sixty_tensors_is_fast():
    tensors = [stats_of(gaussian(20_000, scale)) for scale in np.geomspace(0.01, 100, 60)]
    started = time.perf_counter()
    for stats in tensors:
        tensor_range(stats, "entropy")
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------------------- the table


def table_of(method: str, data: dict[str, list[np.ndarray]], bins: int | None = 256) -> CalibrationTable:
    stats = {name: stats_of(*batches, bins=bins) for name, batches in data.items()}
    return CalibrationTable.from_stats(method, stats, percentile=99.9, batches=len(next(iter(data.values()))))


DATA = {
    "/conv1/Conv_output_0": [gaussian(500, 2.0), gaussian(500, 30.0)],
    "relu": [np.maximum(gaussian(500), 0), np.maximum(gaussian(500, 4.0), 0)],
}


@pytest.mark.parametrize(("method", "bins"), [("entropy", 256), ("percentile", 256), ("minmax", None)])
def test_table_round_trips_through_npz(tmp_path, method, bins):
    table = table_of(method, DATA, bins)
    path = tmp_path / "stats.npz"
    table.save(path)
    loaded = CalibrationTable.load(path)
    assert (loaded.method, loaded.percentile, loaded.batches) == (method, 99.9, 2)
    assert loaded.ranges == table.ranges
    for name, stats in table.stats.items():
        got = loaded.stats[name]
        assert (got.bins, got.count, got.min, got.max) == (stats.bins, stats.count, stats.min, stats.max)
        if bins:
            assert_same_stats(got, stats)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]  # no temporary file left


def test_saving_into_a_missing_folder_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        table_of("minmax", DATA).save(tmp_path / "missing" / "stats.npz")
    assert list(tmp_path.iterdir()) == []


def test_loading_a_file_that_is_not_a_table_is_bad_input(tmp_path):
    garbage = tmp_path / "stats.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(BadInput, match="cannot read statistics"):
        CalibrationTable.load(garbage)
    np.savez(garbage, names=np.array(["x"]))
    with pytest.raises(BadInput, match="cannot read statistics"):
        CalibrationTable.load(garbage)
    # A table whose arrays disagree in length (one tensor named, none counted).
    table_of("entropy", DATA).save(garbage)
    arrays = dict(np.load(garbage))
    np.savez(garbage, **(arrays | {"counts": arrays["counts"][:0]}))
    with pytest.raises(BadInput, match="cannot read statistics"):
        CalibrationTable.load(garbage)


def test_tables_of_two_halves_merge_into_the_table_of_the_whole():
    first = {name: batches[:1] for name, batches in DATA.items()}
    second = {name: batches[1:] for name, batches in DATA.items()}
    merged = table_of("entropy", first).merge(table_of("entropy", second))
    whole = table_of("entropy", DATA)
    assert merged.ranges == whole.ranges and merged.batches == 2
    for name in DATA:
        assert_same_stats(merged.stats[name], whole.stats[name])


def test_tables_of_different_methods_do_not_merge():
    with pytest.raises(BadInput, match="cannot merge"):
        table_of("entropy", DATA).merge(table_of("mse", DATA))


def test_a_table_with_ranges_only_does_not_merge():
    ranges_only = CalibrationTable(method="minmax", ranges={"x": (-1.0, 1.0)})
    with pytest.raises(BadInput, match="without statistics for 'x'"):
        ranges_only.merge(table_of("minmax", DATA))


def test_entropy_is_not_pulled_down_by_the_zeros_a_relu_makes():
    # Half the values are exactly 0 (a Relu's output); zero is exact in any range, so the
    # threshold must follow the positive half-Gaussian's tail (about 4σ), not collapse to 2σ.
    values = np.maximum(np.random.default_rng(0).standard_normal(1_000_000), 0).astype(np.float32)
    stats = TensorStats()
    stats.update(values)
    lo, hi = tensor_range(stats, "entropy")
    assert lo == 0.0 and 3.5 < hi <= float(values.max())
