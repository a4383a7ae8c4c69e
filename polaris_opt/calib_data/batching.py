"""How samples become batches, and the checks every batch passes (names, dtypes, shapes, NaN/Inf).

Sources stream chunks of rows of any size; `limit_rows` and `regroup_rows` turn them into batches
of exactly the planned size while holding about one batch in memory.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from polaris_opt.calib_data.base import Batch, InputSpec
from polaris_opt.errors import BadInput


@dataclass(frozen=True)
class Batching:
    """How samples become batches: `rows` samples a batch, at most `limit` samples in all.

    `fixed` when the model declares a static batch dimension: every batch then holds exactly
    `rows` samples, and samples that do not fill a last batch are left out.
    """

    rows: int
    fixed: bool = False
    limit: int | None = None

    def used(self, samples: int) -> int:
        return samples if self.limit is None else min(samples, self.limit)

    def count(self, samples: int) -> int:
        """How many batches `samples` samples make."""
        used = self.used(samples)
        return used // self.rows if self.fixed else -(-used // self.rows)

    def dropped(self, samples: int) -> int:
        return self.used(samples) % self.rows if self.fixed else 0


def plan_batching(inputs: list[InputSpec], batch_size: int, limit: int | None) -> Batching:
    """Batches of `batch_size`, unless the model fixes its batch dimension, which then wins."""
    if batch_size < 1:
        raise BadInput(f"calibration batch size must be at least 1; got {batch_size}")
    if limit is not None and limit < 1:
        raise BadInput(f"calibration limit must be at least 1 sample; got {limit}")
    for spec in inputs:
        if spec.shape == ():
            raise BadInput(
                f"model input '{spec.name}' is a scalar; calibration batches need a batch dimension"
            )
    fixed = {spec.name: spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
    sizes = set(fixed.values())
    if len(sizes) > 1 or (sizes and min(sizes) < 1):
        listed = ", ".join(f"'{name}' {size}" for name, size in fixed.items())
        raise BadInput(
            f"the model's inputs declare batch dimensions {listed}; calibration needs one batch size"
        )
    if sizes:
        return Batching(rows=sizes.pop(), fixed=True, limit=limit)
    return Batching(rows=batch_size, limit=limit)


def check_schema(inputs: list[InputSpec], given: Mapping[str, tuple[tuple, np.dtype]], where: str) -> int:
    """Check names, dtypes and shapes of `given` (name -> (shape, dtype)); return the number of samples."""
    _check_names([spec.name for spec in inputs], list(given), where)
    for spec in inputs:
        shape, dtype = given[spec.name]
        if dtype != spec.dtype or not spec.fits(tuple(shape)):
            hint = f"; convert it with .astype(np.{spec.dtype.name})" if dtype != spec.dtype else ""
            raise BadInput(
                f"{where}: input '{spec.name}' expects {spec.describe()}, got {dtype} {tuple(shape)}{hint}"
            )
    samples = {name: shape[0] for name, (shape, _) in given.items()}
    if len(set(samples.values())) > 1:
        listed = ", ".join(f"'{name}' {count}" for name, count in samples.items())
        raise BadInput(
            f"{where}: arrays hold different numbers of samples ({listed}); the first dim counts them"
        )
    return next(iter(samples.values()))


def _check_names(expected: list[str], given: list[str], where: str) -> None:
    for name in given:
        if name not in expected:
            raise BadInput(f"{where} has '{name}' but the model's inputs are: {', '.join(expected)}")
    for name in expected:
        if name not in given:
            held = ", ".join(f"'{n}'" for n in given) or "nothing"
            raise BadInput(f"{where} has no data for the model's input '{name}' (it holds {held})")


def check_arrays(inputs: list[InputSpec], arrays: Mapping[str, Any], where: str) -> int:
    """`check_schema` for anything with `.shape` and `.dtype`: arrays, or .npy headers."""
    return check_schema(inputs, {name: (a.shape, a.dtype) for name, a in arrays.items()}, where)


def check_finite(batch: Batch, number: int, first: int, where: str) -> None:
    """NaN or Inf would poison every range computed from the batch: refuse it, saying where it is."""
    for name, array in batch.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            last = first + rows_in(batch) - 1
            raise BadInput(
                f"{where}: input '{name}' holds NaN or Inf in batch {number} "
                f"(samples {first}..{last}, counting from 0)"
            )


def rows_in(chunk: Batch) -> int:
    return len(next(iter(chunk.values())))


def slice_rows(chunk: Batch, start: int, stop: int) -> Batch:
    return {name: array[start:stop] for name, array in chunk.items()}


def limit_rows(chunks: Iterable[Batch], limit: int | None) -> Iterator[Batch]:
    """The first `limit` rows of the chunks; stops pulling chunks as soon as it has them."""
    left = math.inf if limit is None else limit
    for chunk in chunks:
        count = rows_in(chunk)
        yield chunk if count <= left else slice_rows(chunk, 0, int(left))
        left -= min(count, left)
        if left == 0:
            return


def regroup_rows(chunks: Iterable[Batch], rows: int) -> Iterator[Batch]:
    """Batches of exactly `rows` rows from chunks of any size; the last may be smaller.

    At most one batch and one chunk are held at a time.
    """
    pending: deque[Batch] = deque()
    held = 0
    for chunk in chunks:
        if rows_in(chunk) == 0:
            continue
        pending.append(chunk)
        held += rows_in(chunk)
        while held >= rows:
            yield _take_rows(pending, rows)
            held -= rows
    if held:
        yield _take_rows(pending, held)


def _take_rows(pending: deque[Batch], count: int) -> Batch:
    parts = []
    while count:
        chunk = pending[0]
        size = rows_in(chunk)
        if size <= count:
            parts.append(pending.popleft())
            count -= size
        else:
            parts.append(slice_rows(chunk, 0, count))
            pending[0] = slice_rows(chunk, count, size)
            count = 0
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
