"""calibrate: run the calibration data through the model and choose a range for every float activation.

Every activation of the main graph is captured in one ONNX Runtime run per batch and folded at
once into streaming statistics (calib_stats.TensorStats), so memory holds one batch, never the
whole data set. The ranges go to `ctx.calibration` for the passes after this one (quantize);
the graph itself is not changed.

With a cache folder and data that can be hashed, the statistics are stored under a key of
(model bytes, data fingerprint, method, bins, ONNX Runtime version): a second run on the same
model and data (a CI re-run) loads them and does not start ONNX Runtime at all.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import onnx
import onnx_graphsurgeon as gs

from polaris_opt import capture
from polaris_opt.calib_stats import (
    DEFAULT_BINS,
    FILE_FORMAT,
    CalibMethod,
    CalibrationTable,
    TensorStats,
    check_bins,
    collect_extremes,
    collect_stats,
)
from polaris_opt.errors import BadInput
from polaris_opt.export import to_model
from polaris_opt.passes_api import Pass, PassContext, PassResult

T = TypeVar("T")
_DONE = object()  # what `next` returns once the stream is exhausted


@dataclass(frozen=True)
class Calibrate(Pass):
    """Calibration data ⇒ ctx.calibration: a range per float activation (the graph is unchanged)."""

    name: ClassVar[str] = "calibrate"

    method: CalibMethod = field(
        default=CalibMethod.MINMAX,
        metadata={"help": "how a range is chosen: minmax, percentile, entropy (KL) or mse"},
    )
    percentile: float = field(
        default=99.99, metadata={"help": "method percentile: the share of values kept, in (0, 100]"}
    )
    bins: int = field(
        default=DEFAULT_BINS, metadata={"help": "histogram bins per tensor (a power of two, at least 16)"}
    )

    def __post_init__(self) -> None:
        try:  # from Python the method may come as its text
            object.__setattr__(self, "method", CalibMethod(self.method))
        except ValueError:
            valid = ", ".join(m.value for m in CalibMethod)
            raise BadInput(f"calibrate: method must be one of {valid}, got {self.method!r}") from None
        if not (math.isfinite(self.percentile) and 0.0 < self.percentile <= 100.0):
            raise BadInput(f"calibrate: percentile must be in (0, 100], got {self.percentile}")
        try:
            check_bins(self.bins)
        except ValueError as exc:
            raise BadInput(f"calibrate: {exc}") from None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.calib is None:
            raise BadInput("calibrate needs calibration data: pass --calib DATA (or --calib random)")
        model = to_model(graph)
        cache_file = self.cache_file(model, ctx)
        cached = _load_cached(cache_file, ctx)
        if cached is not None:
            stats, batches = cached.stats, cached.batches
        else:
            stats, batches = self.collect(model, ctx)
        table = CalibrationTable.from_stats(self.method, stats, percentile=self.percentile, batches=batches)
        if cached is None and cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            table.save(cache_file)
        ctx.calibration = table
        summary = {"method": self.method.value, "tensors": len(table.ranges), "batches": batches}
        return PassResult(modified=False, stats=summary | {"cached": int(cached is not None)})

    def collect(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[dict[str, TensorStats], int]:
        """Statistics of every float activation over all batches of `ctx.calib`."""
        names = capture.float_activations(model)
        if self.method is CalibMethod.MINMAX:
            # Min and max are reduced inside the graph: four scalars per tensor leave ONNX Runtime.
            model, scalars = capture.with_extremes(model, names)
            names = [name for outputs in scalars.values() for name in outputs]
        stream = capture.stream_tensors(
            model,
            ctx.calib.batches(),
            names,
            threads=ctx.threads,
            progress=ctx.progress,
            description="calibrating",
            total=ctx.calib.num_batches,
        )
        # Closing at once on an error (NaN found) stops the worker and closes the progress bar.
        if self.method is CalibMethod.MINMAX:
            with closing(stream):
                stats, batches = collect_extremes(stream, scalars)
        else:
            with closing(stream), closing(run_ahead(stream)) as values:
                stats, batches = collect_stats(values, names, bins=self.bins)
        if batches == 0:
            raise BadInput("calibrate: the calibration data holds no batches; give at least one sample")
        return stats, batches

    def cache_file(self, model: onnx.ModelProto, ctx: PassContext) -> Path | None:
        """Where statistics for this model, data, method and bin count are cached; None: no cache."""
        fingerprint = ctx.calib.fingerprint()
        if ctx.cache_dir is None or fingerprint is None:
            return None
        import onnxruntime

        key = hashlib.sha256(model.SerializeToString())
        # ONNX Runtime computes the activations: another version may round them differently, and
        # a cache restored in CI after an upgrade must not make the output differ from a cold run.
        runtime = f"onnxruntime {onnxruntime.__version__}"
        for part in (fingerprint, self.method.value, str(self.bins), str(FILE_FORMAT), runtime):
            key.update(b"\0" + part.encode())
        return Path(ctx.cache_dir) / f"calibration-{key.hexdigest()[:32]}.npz"


def run_ahead(items: Iterator[T]) -> Generator[T, None, None]:
    """Yield the items of `items`, producing each next one on a worker thread while the caller
    works on the current one.

    Histogramming a batch costs about as much as running it, and ONNX Runtime and NumPy both
    release the GIL, so the two overlap on two cores. One item is made ahead, never more: at
    most two batches of activations are alive at once.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibrate") as worker:
        pending = worker.submit(next, items, _DONE)
        while (item := pending.result()) is not _DONE:
            pending = worker.submit(next, items, _DONE)
            yield item
            del item  # the caller is done with it: let it go before the next one arrives


def _load_cached(cache_file: Path | None, ctx: PassContext) -> CalibrationTable | None:
    """The cached table, or None when there is none or it cannot be read (it is then recomputed)."""
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        return CalibrationTable.load(cache_file)
    except BadInput as exc:
        ctx.log.warning("ignoring the calibration cache: %s", exc)
        return None
