"""ArraySource: calibration data given from Python as a dict of input name -> array."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from polaris_opt.calib_data.base import Batch, InputSpec
from polaris_opt.calib_data.batching import Batching, check_arrays, rows_in, slice_rows
from polaris_opt.calib_data.rows import RowSource


class ArraySource(RowSource):
    """A dict of input name -> array with a batch dimension, sliced into batches."""

    def __init__(self, arrays: Mapping[str, Any], inputs: list[InputSpec], batching: Batching):
        self.arrays = {str(name): np.asarray(value) for name, value in arrays.items()}
        samples = check_arrays(inputs, self.arrays, "calibration data")
        super().__init__(inputs, batching, "calibration data", "arrays", samples)

    def _open_chunks(self) -> Iterator[Batch]:
        total = rows_in(self.arrays)
        return (
            slice_rows(self.arrays, start, start + self.batching.rows)
            for start in range(0, total, self.batching.rows)
        )

    def _hash_content(self, digest: Any) -> None:
        for name in sorted(self.arrays):
            array = self.arrays[name]
            digest.update(f"{name};{array.dtype.str};{array.shape}".encode())
            for chunk in self._open_chunks():
                digest.update(np.ascontiguousarray(chunk[name]).data)
