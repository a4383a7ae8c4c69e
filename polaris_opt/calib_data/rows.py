"""RowSource: the shared machinery of every source whose samples are rows of arrays.

A subclass streams chunks of rows; RowSource applies the limit, makes the batches, checks each
for NaN/Inf, counts samples and batches, warns about samples a fixed batch size leaves out, and
writes the content fingerprint the statistics cache keys on.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from polaris_opt.calib_data.base import Batch, CalibrationSource, InputSpec
from polaris_opt.calib_data.batching import Batching, check_finite, limit_rows, regroup_rows, rows_in
from polaris_opt.errors import BadInput

_HASH_BLOCK = 1 << 20


class RowSource(CalibrationSource):
    """A source whose samples are rows of arrays.

    Subclasses stream chunks of rows from `_open_chunks()` and hash their content in
    `_hash_content()`; this class applies the limit, makes the batches, checks each for NaN/Inf,
    counts them and writes the fingerprint.
    """

    def __init__(
        self, inputs: list[InputSpec], batching: Batching, where: str, label: str, samples: int | None
    ):
        self.inputs = list(inputs)
        self.batching = batching
        self.where = where  # how errors name the data: "calibration data 'cal.npz'"
        self.label = label  # how describe() names it: "cal.npz"
        self._counts: tuple[int, int] | None = None  # (samples, batches) yielded by a full pass
        self._fingerprint: str | None = None
        if samples is not None:
            self._count(samples)

    def _count(self, samples: int) -> None:
        used, rows = self.batching.used(samples), self.batching.rows
        if used == 0:
            raise BadInput(f"{self.where} holds no samples")
        batches = self.batching.count(samples)
        if batches == 0:
            raise BadInput(self._too_few(used))
        if self.batching.dropped(samples):
            self._warn_dropped(self.batching.dropped(samples), used)
        self._counts = (min(used, batches * rows), batches)

    def _too_few(self, samples: int) -> str:
        rows = self.batching.rows
        return f"{self.where} has {samples} samples, fewer than the model's fixed batch size {rows}"

    def _warn_dropped(self, dropped: int, used: int) -> None:
        message = (
            f"{self.label}: {dropped} of {used} samples do not fill a batch of {self.batching.rows} "
            "(the model fixes its batch dimension) and are left out"
        )
        if message not in self.warnings:
            self.warnings.append(message)

    def batches(self) -> Iterator[Batch]:
        # The chunks open here, not on the first next(), so bad data or state fails at the call.
        return self._batched(self._open_chunks())

    @abstractmethod
    def _open_chunks(self) -> Iterator[Batch]:  # pragma: no cover - abstract
        """The rows as they are stored (per file, per array), before they are cut into batches."""

    def _batched(self, chunks: Iterator[Batch]) -> Iterator[Batch]:
        rows, fixed = self.batching.rows, self.batching.fixed
        samples = batches = 0
        for batch in regroup_rows(limit_rows(chunks, self.batching.limit), rows):
            if fixed and rows_in(batch) < rows:
                if batches == 0:
                    raise BadInput(self._too_few(rows_in(batch)))
                self._warn_dropped(rows_in(batch), samples + rows_in(batch))
                break
            batches += 1
            check_finite(batch, batches, samples, self.where)
            yield batch
            samples += rows_in(batch)
        if batches == 0:
            raise BadInput(f"{self.where} holds no samples")
        self._counts = (samples, batches)

    @property
    def num_batches(self) -> int | None:
        return self._counts[1] if self._counts else None

    @property
    def num_samples(self) -> int | None:
        return self._counts[0] if self._counts else None

    def describe(self) -> str:
        if self._counts is None:
            return f"{self.label}: batches of {self.batching.rows}"
        samples, batches = self._counts
        return f"{self.label}: {samples} samples in {batches} batches"

    def fingerprint(self) -> str | None:
        if self._fingerprint is None:
            digest = hashlib.sha256(self._settings().encode())
            self._hash_content(digest)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _settings(self) -> str:
        """Everything besides the content that changes the batches."""
        b = self.batching
        names = ",".join(spec.name for spec in self.inputs)
        return f"{type(self).__name__};inputs={names};rows={b.rows};fixed={b.fixed};limit={b.limit}"

    @abstractmethod
    def _hash_content(self, digest: Any) -> None:  # pragma: no cover - abstract
        """Feed the bytes of the data to `digest` (the fingerprint's content part)."""


def hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)


def hash_files(digest: Any, paths: Iterable[Path], *, with_names: bool) -> None:
    """Every file's bytes in order; `with_names` when the order of file names is the order of samples."""
    for path in paths:
        if with_names:
            digest.update(path.name.encode() + b"\0")
        hash_file(digest, path)
