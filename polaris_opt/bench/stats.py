"""Latency statistics of one contender's measured runs: percentiles, spread, throughput.

Percentiles interpolate linearly between the sorted samples (NumPy's default "linear" method,
numbering samples from 0), so p50 of an even count is the mean of the two middle samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Latency:
    """A contender's runs summarised; times in milliseconds, throughput in samples per second."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # batch / p50: the rate at the typical latency, untouched by outliers
    spread: float  # p90 / p50: how far a typical slow run strays from the median


def percentiles(samples: list[float], quantiles: tuple[float, ...]) -> list[float]:
    """The `quantiles` (0-100) of `samples`, linearly interpolated; refuses an empty list."""
    if not samples:
        raise ValueError("no samples to take percentiles of")
    return [float(value) for value in np.percentile(np.asarray(samples, dtype=np.float64), quantiles)]


def summarize(seconds: list[float], batch: int) -> Latency:
    """The Latency of runs that took `seconds` each, every run computing `batch` samples."""
    p50, p90, p99 = (value * 1e3 for value in percentiles(seconds, (50, 90, 99)))
    return Latency(
        runs=len(seconds),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        throughput=batch * 1e3 / p50 if p50 > 0 else float("inf"),
        spread=p90 / p50 if p50 > 0 else float("inf"),
    )
