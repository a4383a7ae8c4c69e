"""`polaris-opt tune`: measure the SparseMatMul kernels' tile shapes on this device and cache the best.

kernels/spmm.cl takes its shape from `-D` defines: VEC_WIDTH (floats per vector, 4 or 8) and,
on GPU profiles, ROW_LANES (work-items per CSR row) for batch 1; TILE_VECTORS (vectors of
activations per work-item) for larger batches. The launcher's defaults are rules of thumb; the
best choice depends on the device, its driver, the kernel (format and value type) and the
problem's shape. `tune` times a small candidate set of these defines on a random 90 %-sparse
matrix per shape class, keeps the fastest candidate whose output matches a NumPy reference, and
writes it to a JSON file per (device, driver) under <cache>/tune/ (<cache> is
$XDG_CACHE_HOME/polaris-opt or ~/.cache/polaris-opt).

A shape class is a batch class ("batch 1", "batch<=8", "batch>8") and a K bucket ("k<=256",
"k<=2048", "k>2048"); the kernel key is "<profile>/<format>_<values>" because the profile picks
the kernel layout (a tuned CPU layout says nothing about a GPU one). The runtime reads the file
through `tuned_choices` when a launcher is built; a missing file means the defaults, a corrupt
one is ignored with a warning.

pyopencl is imported inside functions: `polaris-opt --help` must not load it.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPARSITY = 0.9
BATCH_CLASSES = {"batch 1": 1, "batch<=8": 8, "batch>8": 32}  # class -> the batch tuned for it
K_BUCKETS = {"k<=256": 256, "k<=2048": 1024, "k>2048": 4096}  # bucket -> the K tuned for it
ROWS = 512  # N of the tuning matrix: enough rows to fill every core, small enough to time quickly
FORMATS = ("csr", "bsr", "sell")
VALUES = ("fp32", "fp16", "int8")
VALUE_NAMES = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8"}
# The values each tunable define may take; anything else in a cache file is not trusted.
ALLOWED = {
    "VEC_WIDTH": {"4", "8"},
    "TILE_VECTORS": {"1", "2", "4"},
    "ROW_LANES": {"2", "4", "8", "16", "32", "64"},
}
NOISE_MARGIN = 0.05  # a candidate must beat the launcher's own choice by 5 % to replace it
RTOL = 1e-4  # float32 sums in another order, relative to Σ|x|·|w| per output

# While the tuner times a candidate, launchers built in this context use its defines.
_TRIAL: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("tune_trial", default=None)
# Loaded cache files: path -> entries, read once per process (launchers look up at build time).
_LOADED: dict[Path, dict[str, dict[str, str]]] = {}


# ------------------------------------------------------------------------------ shape classes


def batch_class(m_total: int) -> str:
    if m_total <= 1:
        return "batch 1"
    return "batch<=8" if m_total <= 8 else "batch>8"


def k_bucket(k: int) -> str:
    if k <= 256:
        return "k<=256"
    return "k<=2048" if k <= 2048 else "k>2048"


def kernel_key(profile: str, format: str, values: str) -> str:
    return f"{profile}/{format}_{values}"


def entry_key(kernel: str, batch: str, bucket: str) -> str:
    return f"{kernel}|{batch}|{bucket}"


# ------------------------------------------------------------------------------------ the cache


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/polaris-opt, else ~/.cache/polaris-opt (as the calibration cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "polaris-opt"


def cache_file(device_name: str, driver_version: str, cache_dir: Path | None = None) -> Path:
    """The JSON file of one (device, driver): a readable slug plus a hash of the exact strings."""
    folder = (cache_dir or default_cache_dir()) / "tune"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{device_name}-{driver_version}").strip("-")[:60]
    digest = hashlib.sha256(f"{device_name}\0{driver_version}".encode()).hexdigest()[:10]
    return folder / f"{slug}-{digest}.json"


def load_entries(path: Path) -> dict[str, dict[str, str]]:
    """entry key -> overriding defines from `path`; {} when it is missing or unreadable (with a warning)."""
    if path in _LOADED:
        return _LOADED[path]
    entries: dict[str, dict[str, str]] = {}
    if path.exists():
        try:
            entries = _parse(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            log.warning("ignoring the tuning cache %s (%s); re-run `polaris-opt tune`", path, error)
            entries = {}
    _LOADED[path] = entries
    return entries


def _parse(document: Any) -> dict[str, dict[str, str]]:
    """The entries of a cache document, each define checked against ALLOWED (ValueError otherwise)."""
    if document.get("version") != CACHE_VERSION:
        raise ValueError(f"version {document.get('version')!r}, expected {CACHE_VERSION}")
    entries = {}
    for key, entry in document["entries"].items():
        defines = {str(name): str(value) for name, value in entry["defines"].items()}
        bad = {name: value for name, value in defines.items() if value not in ALLOWED.get(name, ())}
        if bad:
            raise ValueError(f"entry {key!r} has defines outside the tuned set: {bad}")
        entries[key] = defines
    return entries


def save_results(path: Path, device_name: str, driver_version: str, results: list[TuneResult]) -> None:
    """Merge the chosen defines of `results` into `path` (other kernels' entries stay)."""
    document = {"version": CACHE_VERSION, "device": device_name, "driver": driver_version, "entries": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            _parse(old)  # only a valid file's entries are kept
            document["entries"] = old["entries"]
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            log.warning("replacing the unreadable tuning cache %s", path)
    for result in results:
        if result.best == {}:  # the launcher's own choice won: nothing to override
            document["entries"].pop(result.key, None)
        elif result.best is not None:
            document["entries"][result.key] = {
                "defines": result.best,
                "ms": result.best_ms,
                "default_ms": result.default_ms,
            }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True))
    temporary.replace(path)  # atomic: a runtime reading the file never sees half of it
    _LOADED.pop(path, None)


def forget_loaded() -> None:
    """Drop the in-process copies of cache files (tests, or after another process tuned)."""
    _LOADED.clear()


def tuned_choices(env, profile: str, format: str, values: str, k: int) -> dict[str, dict[str, str]]:
    """batch class -> overriding defines for one sparse weight: the tuner's trial while it times a
    candidate, else the device's cache file; classes without an entry are absent."""
    trial = _TRIAL.get()
    if trial is not None:
        return {batch: trial for batch in BATCH_CLASSES}
    entries = load_entries(cache_file(env.device.name, env.device.driver_version))
    kernel, bucket = kernel_key(profile, format, values), k_bucket(k)
    found = {batch: entries.get(entry_key(kernel, batch, bucket)) for batch in BATCH_CLASSES}
    return {batch: defines for batch, defines in found.items() if defines}


@contextmanager
def trial(defines: dict[str, str]) -> Iterator[None]:
    """Launchers built inside use `defines` for every batch class (the tuner's candidate)."""
    token = _TRIAL.set(defines)
    try:
        yield
    finally:
        _TRIAL.reset(token)


# ------------------------------------------------------------------------------------ the search


@dataclass
class TuneResult:
    key: str
    kernel: str
    batch: str
    bucket: str
    candidates: list[dict[str, Any]]  # {"defines", "ms", "ok"} each, in trial order
    best: dict[str, str] | None
    best_ms: float | None
    default_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(profile, format: str, batch: str, block_rows: int) -> list[dict[str, str]]:
    """The small set of defines the launcher supports for this kernel, after {} (the launcher's own
    choice, timed so the table shows what tuning gains)."""
    if batch == "batch 1":
        if format == "csr" and not profile.row_per_work_item:
            lanes = [n for n in (4, 8, 16, 32) if n <= profile.wavefront]
            return [{}] + [{"ROW_LANES": str(n)} for n in lanes]
        return [{}, {"VEC_WIDTH": "4"}, {"VEC_WIDTH": "8"}]
    tiles = (1, 2, 4) if profile.row_per_work_item else (1, 2)
    most = max(1, 16 // block_rows) if format == "bsr" else 4  # AVX2's 16 registers, see sparse.py
    return [{}] + [{"TILE_VECTORS": str(t)} for t in tiles if t <= most]


def tune(
    env,
    *,
    quick: bool = False,
    formats: tuple[str, ...] | None = None,
    values: tuple[str, ...] | None = None,
    buckets: tuple[str, ...] | None = None,
    seed: int = 0,
    progress: Callable[[str, int], Any] | None = None,
) -> list[TuneResult]:
    """Time every candidate of every (kernel, shape class) on `env`; return one result each.

    quick: csr with fp32 values and K ≤ 256 only, 5 timed runs instead of 15. `formats`,
    `values` and `buckets` narrow the set further. `progress(description, total)` is a context
    manager yielding advance(n) (the CLI's progress bar).
    """
    formats = formats or (("csr",) if quick else FORMATS)
    values = values or (("fp32",) if quick else VALUES)
    buckets = buckets or (("k<=256",) if quick else tuple(K_BUCKETS))
    runs = 5 if quick else 15
    jobs = [(f, v, b, batch) for f in formats for v in values for b in buckets for batch in BATCH_CLASSES]
    rng = np.random.default_rng(seed)
    results = []
    with _progress(progress, "tuning spmm kernels", len(jobs)) as advance:
        for format, value, bucket in dict.fromkeys((f, v, b) for f, v, b, _ in jobs):
            matrix, dense = _tuning_matrix(rng, format, value, K_BUCKETS[bucket])
            for batch, m_total in BATCH_CLASSES.items():
                x = rng.standard_normal((m_total, dense.shape[1])).astype(np.float32)
                results.append(_tune_one(env, matrix, dense, x, batch, bucket, runs))
                advance(1)
    return results


@contextmanager
def _progress(progress, description: str, total: int):
    if progress is None:
        yield lambda n=1: None
    else:
        with progress(description, total) as advance:
            yield advance


def _tuning_matrix(rng, format: str, values: str, k: int):
    """A random [ROWS, k] weight, 90 % zeros, stored as the kernel stores it; and its dense value."""
    from polaris_opt.sparse.formats import from_dense, to_dense

    w = rng.standard_normal((ROWS, k)).astype(np.float32)
    w[rng.random(w.shape) < SPARSITY] = 0
    matrix = from_dense(w, format, values=values)
    return matrix, to_dense(matrix)  # the stored values (fp16/int8 rounding) are the reference


def _tune_one(
    env, matrix, dense: np.ndarray, x: np.ndarray, batch: str, bucket: str, runs: int
) -> TuneResult:
    values = VALUE_NAMES[matrix.data.dtype]
    kernel = kernel_key(env.profile.name, matrix.format, values)
    reference = x @ dense.T
    bound = RTOL * (np.abs(x) @ np.abs(dense).T) + 1e-6
    trials = [
        _Trial(env, matrix, x, defines)
        for defines in candidates(env.profile, matrix.format, batch, matrix.block[0])
    ]
    # Round-robin: each run times every candidate once, so drift (a core's clock, other work)
    # does not favour whichever candidate ran last.
    for run in range(runs):  # rotated: the first launch of a round also wakes the device's threads
        for candidate in trials[run % len(trials) :] + trials[: run % len(trials)]:
            candidate.times.append(_timed_launch(env, candidate.launcher, candidate.feeds))
    rows = [
        {"defines": t.defines, "ms": min(t.times), "ok": bool(np.all(np.abs(t.output - reference) <= bound))}
        for t in trials
    ]
    good = [row for row in rows if row["ok"]]
    best = min(good, key=lambda row: row["ms"]) if good else None
    default = rows[0]
    if best is not None and default["ok"] and best["ms"] > (1 - NOISE_MARGIN) * default["ms"]:
        best = default  # within timing noise of the launcher's own choice: keep that
    return TuneResult(
        key=entry_key(kernel, batch, bucket),
        kernel=kernel,
        batch=batch,
        bucket=bucket,
        candidates=rows,
        best=best["defines"] if best else None,
        best_ms=best["ms"] if best else None,
        default_ms=rows[0]["ms"] if rows else None,
    )


class _Trial:
    """SparseMatMul built with one candidate's defines, launched once (the build and a warm-up),
    with its output kept for the reference check and its timed runs collected in `times` (ms)."""

    def __init__(self, env, matrix, x: np.ndarray, defines: dict[str, str]):
        import pyopencl.array as cl_array

        from polaris_opt.runtime.launchers.sparse import SparseMatMul

        attrs = {
            "format": matrix.format,
            "shape": list(matrix.shape),
            "block": list(matrix.block),
            "slice_height": matrix.slice_height,
            "activation": "none",
        }
        constants = {1: matrix.data, 2: matrix.indices, 3: matrix.indptr}
        if matrix.scale is not None:
            constants[5] = matrix.scale
        with trial(defines):
            self.launcher = SparseMatMul(env, attrs, constants)
        self.defines = defines
        self.feeds = {0: cl_array.to_device(env.queue, x)}
        self.output = self.launcher.launch(self.feeds).get()
        self.times: list[float] = []


def _timed_launch(env, launcher, feeds) -> float:
    """One launch in ms, from a marker before it to a marker after it (profiling events), or
    wall time around a finished queue when the queue does not profile."""
    import pyopencl as cl

    profiling = env.queue.properties & cl.command_queue_properties.PROFILING_ENABLE
    if profiling:
        start = cl.enqueue_marker(env.queue)
        launcher.launch(feeds)
        end = cl.enqueue_marker(env.queue)
        end.wait()
        return (end.profile.end - start.profile.start) * 1e-6
    env.queue.finish()
    began = time.perf_counter()
    launcher.launch(feeds)
    env.queue.finish()
    return (time.perf_counter() - began) * 1e3


def open_tuning_env(spec: str | None = None):
    """An environment on the device `spec` names whose queue records profiling events; None without OpenCL."""
    import pyopencl as cl

    from polaris_opt.cl_env import open_env

    env = open_env(spec)
    if env is None:
        return None
    env.queue = cl.CommandQueue(env.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
    return env


def speedup(result: TuneResult) -> float:
    """How many times faster the chosen candidate is than the launcher's default (1.0 = the default won)."""
    if not result.best_ms or not result.default_ms:
        return math.nan
    return result.default_ms / result.best_ms
