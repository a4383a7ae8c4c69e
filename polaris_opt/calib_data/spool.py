"""BatchSpool: batches kept on disk, so data that can be read only once can be read again.

Each batch is written as one .npy file per input (never pickled) in a private temporary folder;
a replay loads one batch at a time, so memory holds one batch however many batches there are.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from polaris_opt.calib_data.base import Batch


class BatchSpool:
    """Batches recorded as they go by, then replayed from disk in the same order.

    The folder is removed by `close()`, or when the spool is garbage-collected (or at interpreter
    exit): the spool's owner drops it, and a replay still running keeps it alive until it ends.
    """

    def __init__(self) -> None:
        folder = tempfile.TemporaryDirectory(prefix="polaris-calib-")
        self.folder = Path(folder.name)
        self.complete = False  # every batch of one pass is recorded
        self._names: list[list[str]] = []  # each recorded batch's input names, in its order
        # The finalizer holds the folder, never the spool, so the spool can still be collected.
        self._remove = weakref.finalize(self, folder.cleanup)

    @property
    def closed(self) -> bool:
        return not self._remove.alive

    def close(self) -> None:
        self._remove()

    def record(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """`batches` unchanged, each written to disk before it is yielded; complete once all are."""
        for batch in batches:
            self._save(batch)
            yield batch
        self.complete = True

    def replay(self) -> Iterator[Batch]:
        """The recorded batches, loaded one at a time."""
        return (self._load(number) for number in range(len(self._names)))

    def _file(self, batch: int, array: int) -> Path:
        # Numbered, not named after inputs: input names may hold characters no file name can.
        return self.folder / f"{batch:06d}-{array:03d}.npy"

    def _save(self, batch: Batch) -> None:
        number = len(self._names)
        for index, array in enumerate(batch.values()):
            np.save(self._file(number, index), array, allow_pickle=False)
        self._names.append(list(batch))

    def _load(self, number: int) -> Batch:
        names = self._names[number]
        return {
            name: np.load(self._file(number, index), allow_pickle=False) for index, name in enumerate(names)
        }
