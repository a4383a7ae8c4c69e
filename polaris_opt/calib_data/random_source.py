"""RandomSource: seeded noise shaped like the model's inputs, for trying a pipeline out.

Only used when asked for explicitly (`--calib random`), and always with RANDOM_WARNING: ranges
calibrated on noise say nothing about real data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from polaris_opt.calib_data.base import Batch, InputSpec
from polaris_opt.calib_data.batching import Batching
from polaris_opt.calib_data.rows import RowSource
from polaris_opt.errors import BadInput

RANDOM_WARNING = (
    "calibrating on random data (--calib random): ranges and accuracy of the result are not trustworthy"
)


class RandomSource(RowSource):
    """Seeded random data from the declared shapes, for trying a pipeline out; not trustworthy.

    Floats are standard normal, integers and booleans 0 or 1. The batch dimension takes the
    batch size; any other dynamic dimension takes 1.
    """

    trustworthy = False

    def __init__(self, inputs: list[InputSpec], batching: Batching, *, seed: int, batches: int):
        if batches < 1:
            raise BadInput(f"random calibration data needs at least 1 batch; got {batches}")
        for spec in inputs:
            check_random_input(spec)
        self.seed, self.count = seed, batches
        super().__init__(inputs, batching, "random calibration data", "random data", batches * batching.rows)
        self.warnings.append(RANDOM_WARNING)

    def _open_chunks(self) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)  # a new stream per pass: every pass sees the same data
        rows = self.batching.rows
        return ({spec.name: random_array(rng, spec, rows) for spec in self.inputs} for _ in range(self.count))

    def _settings(self) -> str:
        return f"{super()._settings()};seed={self.seed};batches={self.count}"

    def _hash_content(self, digest: Any) -> None:
        for spec in self.inputs:  # the data follows from the seed and what the model declares
            digest.update(f"{spec.name};{spec.dtype.str};{spec.shape}".encode())

    def describe(self) -> str:
        return f"{super().describe()} (not trustworthy)"


def check_random_input(spec: InputSpec) -> None:
    if spec.shape is None:
        raise BadInput(
            f"input '{spec.name}' declares no shape, so random data cannot be drawn; give --calib DATA"
        )
    if spec.dtype.kind not in "fiub":
        raise BadInput(
            f"input '{spec.name}' is {spec.dtype}; random data covers numbers only: give --calib DATA"
        )


def random_array(rng: np.random.Generator, spec: InputSpec, rows: int) -> np.ndarray:
    shape = (rows, *(1 if d is None else d for d in spec.shape[1:]))
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    return rng.integers(0, 2, shape).astype(spec.dtype)
