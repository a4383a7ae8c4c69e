"""Calibration statistics: what the `calibrate` pass leaves in the PassContext for later passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CalibrationTable:
    """The range chosen for each calibrated tensor by `method`, and the statistics behind it."""

    method: str
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
