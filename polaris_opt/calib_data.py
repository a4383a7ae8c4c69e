"""Calibration data: where the batches that calibration, GPTQ and analysis run on come from.

Every source yields batches as `{input name: array}` with a leading batch dimension, checked
against the model's declared inputs (DESIGN.md §8).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: dims are ints, or None where dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


class CalibrationSource:
    """Base of every calibration source.

    `batches()` starts again from the first batch each time it is called, so several passes can
    read the same data. `fingerprint()` is a content hash for the statistics cache, or None
    when the data cannot be hashed (a Python reader), which turns caching off.
    """

    # False for `--calib random`: results computed from it are not to be trusted.
    trustworthy: bool = True

    def batches(self) -> Iterator[dict[str, np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        return None

    @property
    def num_batches(self) -> int | None:
        """How many batches `batches()` yields, when known (for progress bars)."""
        return None
