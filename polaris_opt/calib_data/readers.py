"""ReaderSource: an ONNX Runtime CalibrationDataReader used unchanged as calibration data.

polaris-opt reads calibration data more than once (calibrate, then fidelity measurement, GPTQ,
bias correction). A reader with a `rewind()` method is rewound before each later pass; a reader
without one is read once, its batches spooled to a temporary folder as they go by (BatchSpool),
and later passes replay the spool, so memory still holds about one batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from polaris_opt.calib_data.base import Batch, InputSpec
from polaris_opt.calib_data.batching import Batching, check_arrays
from polaris_opt.calib_data.rows import RowSource
from polaris_opt.calib_data.spool import BatchSpool
from polaris_opt.errors import BadInput


def can_rewind(reader: Any) -> bool:
    return callable(getattr(reader, "rewind", None))


class ReaderSource(RowSource):
    """An ONNX Runtime CalibrationDataReader: `get_next()` gives a dict of arrays, then None.

    Its rows are regrouped into batches like any other source's. A later `batches()` rewinds the
    reader, or, without `rewind()`, replays the batches the first pass spooled to disk; `close()`
    removes the spool at once (it goes anyway when the source is garbage-collected). Its content
    cannot be hashed, so its statistics are never cached.
    """

    def __init__(self, reader: Any, inputs: list[InputSpec], batching: Batching):
        self.reader = reader
        self._read_before = False
        self._spool: BatchSpool | None = None  # only for a reader without rewind()
        name = f"calibration reader {type(reader).__name__}"
        super().__init__(inputs, batching, name, name, None)

    def fingerprint(self) -> str | None:
        return None

    def _hash_content(self, digest: Any) -> None:
        """Not used: a reader's data is known only as it is read, so there is no fingerprint and
        calibration statistics from a reader are never cached."""

    def batches(self) -> Iterator[Batch]:
        if self._spool is not None:
            return self._replay(self._spool)
        if self._read_before:
            self.reader.rewind()
        self._read_before = True
        if can_rewind(self.reader):
            return super().batches()
        self._spool = BatchSpool()
        return self._spool.record(super().batches())

    def close(self) -> None:
        """Remove the spooled batches now; a reader without rewind() cannot be read again after."""
        if self._spool is not None:
            self._spool.close()

    def _replay(self, spool: BatchSpool) -> Iterator[Batch]:
        if spool.closed:
            raise BadInput(
                f"{self.where} was closed: its spooled batches are gone, so it cannot be read again"
            )
        if not spool.complete:
            raise BadInput(
                f"{self.where} has no rewind(), so it is read once: read all the batches of the first "
                "batches() before calling it again (or give the reader a rewind() method)"
            )
        return spool.replay()

    def _open_chunks(self) -> Iterator[Batch]:
        calls = 0
        while (feeds := self.reader.get_next()) is not None:
            calls += 1
            where = f"{self.where} (get_next() call {calls})"
            if not isinstance(feeds, Mapping):
                raise BadInput(
                    f"{where} returned a {type(feeds).__name__}; expected a dict of input name -> array"
                )
            arrays = {str(name): np.asarray(value) for name, value in feeds.items()}
            check_arrays(self.inputs, arrays, where)
            yield arrays
