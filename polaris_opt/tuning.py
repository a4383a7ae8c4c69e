"""`polaris-opt tune`: measure each kernel's work-group size and tile shape on this device and cache the best.

The kernels take their shape from `-D` defines:
- kernels/spmm.cl (SparseMatMul, SparseConv): VEC_WIDTH (floats per vector, 4 or 8) and, on GPU
  profiles, ROW_LANES (work-items per CSR row) for batch 1; TILE_VECTORS (vectors of
  activations per work-item) for larger batches.
- kernels/qmatmul.cl (QMatMul, QGemm) and kernels/int4.cl (MatMulInt4): TILE_M (batch rows per
  work-item or work-group) for large batches.
- every kernel: LOCAL_SIZE, its work-group size (the profile's default unless overridden).

The launchers' defaults are rules of thumb; the best choice depends on the device, its driver,
the kernel and the problem's shape. `tune` times candidates per shape class on a random problem
(a 90 %-sparse [512, K] weight; a dense int8 or int4 one) in interleaved rounds, keeps the
fastest candidate whose output matches the NumPy reference (polaris_opt.ops.reference) if it
beats the launcher's own choice by NOISE_MARGIN twice (in the race and in a rematch), and writes
it to a JSON file per (device, driver) under <cache>/tune/ (<cache> is
$XDG_CACHE_HOME/polaris-opt or ~/.cache/polaris-opt).

Axes are searched one after the other, not multiplied: first the tile shapes at the default
work-group size, then the work-group sizes (multiples of the profile's wavefront, 16 to 256)
with the winning tile shape. On a 2-core CPU a full tune takes about a minute, `--quick` ten
seconds (each with PoCL's kernel cache empty; less once it holds the variants).

A shape class is a batch class ("batch 1", "batch<=8", "batch>8") and a K bucket ("k<=256",
"k<=2048", "k>2048"). Kernel keys start with the profile, which picks the kernel layout (a tuned
CPU layout says nothing about a GPU one): "<profile>/<format>_<values>" for the sparse kernels,
"<profile>/<kernel name>" for the quantized GEMMs (qgemm_rows, matmul_int4_wave, ...). The
runtime reads the file through `tuned_for` when a launcher is built; a missing file means the
defaults, a corrupt one (or one from another cache version) is ignored with a warning.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# 2: entries may set LOCAL_SIZE and TILE_M and name the quantized GEMMs; a version-1 file's
# choices were measured at the default work-group size only, so it is ignored (re-tune).
CACHE_VERSION = 2
SPARSITY = 0.9
BATCH_CLASSES = {"batch 1": 1, "batch<=8": 8, "batch>8": 32}  # class -> the batch tuned for it
K_BUCKETS = {"k<=256": 256, "k<=2048": 1024, "k>2048": 4096}  # bucket -> the K tuned for it
ROWS = 512  # N of the tuning weights: enough rows to fill every core, small enough to time quickly
FAMILIES = ("spmm", "qmatmul", "int4")
FORMATS = ("csr", "bsr", "sell")
VALUES = ("fp32", "fp16", "int8")
VALUE_NAMES = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8"}
INT4_BLOCK = 32
LOCAL_SIZES = ("16", "32", "64", "128", "256")
# The values each tunable define may take; anything else in a cache file is not trusted.
ALLOWED = {
    "VEC_WIDTH": {"4", "8"},
    "TILE_VECTORS": {"1", "2", "4"},
    "ROW_LANES": {"2", "4", "8", "16", "32", "64"},
    "TILE_M": {"1", "2", "4", "8", "16"},
    "LOCAL_SIZE": set(LOCAL_SIZES),
}
NOISE_MARGIN = 0.05  # a candidate must beat the launcher's own choice by 5 % to replace it
# A candidate's time is this quantile of its runs, not the fastest: on this shared 2-core VM a
# kernel runs for seconds at one speed (csr batch 1: 0.035-0.04 ms in one process, 0.006 in the
# next) with rare runs far faster (0.010) or slower, so the fastest run picked whichever candidate
# got lucky, while the quartile stays with the speed of the period.
SCORE_QUANTILE = 0.25
RTOL = 1e-4  # float32 sums in another order, relative to Σ|x|·|w| per output
QUANT_RTOL = 1e-5  # int32 sums are exact: only the float epilogue rounds (~3 ulp, see test_quant_kernels)
UNIT_ROUNDOFF = 2.0**-24

# While the tuner times a candidate, launchers built in this context use its defines.
_TRIAL: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("tune_trial", default=None)
# Loaded cache files: (path, largest work-group) -> entries, read once per process.
_LOADED: dict[tuple[Path, int | None], dict[str, dict[str, str]]] = {}


# ------------------------------------------------------------------------------ shape classes


def batch_class(m_total: int) -> str:
    if m_total <= 1:
        return "batch 1"
    return "batch<=8" if m_total <= 8 else "batch>8"


def k_bucket(k: int) -> str:
    if k <= 256:
        return "k<=256"
    return "k<=2048" if k <= 2048 else "k>2048"


def kernel_key(profile: str, *parts: str) -> str:
    """ "cpu/csr_fp32" from ("cpu", "csr", "fp32"); "cpu/qgemm_rows" from ("cpu", "qgemm_rows")."""
    return f"{profile}/{'_'.join(parts)}"


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


def load_entries(path: Path, max_local_size: int | None = None) -> dict[str, dict[str, str]]:
    """entry key -> overriding defines from `path`; {} when it is missing or unreadable (with a
    warning), or when it asks for a LOCAL_SIZE above `max_local_size` (the device's largest group)."""
    if (path, max_local_size) in _LOADED:
        return _LOADED[path, max_local_size]
    entries: dict[str, dict[str, str]] = {}
    if path.exists():
        try:
            entries = _parse(json.loads(path.read_text()), max_local_size)
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
            log.warning("ignoring the tuning cache %s (%s); re-run `polaris-opt tune`", path, error)
            entries = {}
    _LOADED[path, max_local_size] = entries
    return entries


def _parse(document: Any, max_local_size: int | None = None) -> dict[str, dict[str, str]]:
    """The entries of a cache document, each define checked against ALLOWED (ValueError otherwise)."""
    if document.get("version") != CACHE_VERSION:
        raise ValueError(f"version {document.get('version')!r}, expected {CACHE_VERSION}")
    entries = {}
    for key, entry in document["entries"].items():
        defines = {str(name): str(value) for name, value in entry["defines"].items()}
        bad = {name: value for name, value in defines.items() if value not in ALLOWED.get(name, ())}
        if bad:
            raise ValueError(f"entry {key!r} has defines outside the tuned set: {bad}")
        if max_local_size is not None and int(defines.get("LOCAL_SIZE", 0)) > max_local_size:
            raise ValueError(f"entry {key!r} needs work-groups above this device's {max_local_size}")
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
    for loaded in [key for key in _LOADED if key[0] == path]:
        del _LOADED[loaded]


def forget_loaded() -> None:
    """Drop the in-process copies of cache files (tests, or after another process tuned)."""
    _LOADED.clear()


def tuned_for(env, kernel: str, k: int) -> dict[str, dict[str, str]]:
    """batch class -> overriding defines for `kernel` (a kernel_key) with K = k: the tuner's trial
    while it times a candidate, else the device's cache file; classes without an entry are absent."""
    trial = _TRIAL.get()
    if trial is not None:
        return {batch: trial for batch in BATCH_CLASSES}
    path = cache_file(env.device.name, env.device.driver_version)
    entries = load_entries(path, env.device.max_work_group_size)
    found = {batch: entries.get(entry_key(kernel, batch, k_bucket(k))) for batch in BATCH_CLASSES}
    return {batch: defines for batch, defines in found.items() if defines}


def tuned_choices(env, profile: str, format: str, values: str, k: int) -> dict[str, dict[str, str]]:
    """`tuned_for` the sparse kernels of one weight format and value type."""
    return tuned_for(env, kernel_key(profile, format, values), k)


@contextmanager
def trial(defines: dict[str, str]) -> Iterator[None]:
    """Launchers built inside use `defines` for every batch class (the tuner's candidate)."""
    token = _TRIAL.set(defines)
    try:
        yield
    finally:
        _TRIAL.reset(token)


# ------------------------------------------------------------------------------- the candidates


def local_size_candidates(profile, max_work_group_size: int, near: int | None = None) -> list[int]:
    """Work-group sizes worth timing: the allowed ones that are whole wavefronts (on a GPU a
    partial wavefront leaves lanes idle; on the cpu profile every size qualifies) and that the
    device can run; with `near`, only those within a factor of two of it (`tune --quick`)."""
    sizes = [int(size) for size in LOCAL_SIZES]
    if near is not None:
        sizes = [s for s in sizes if near // 2 <= s <= near * 2]
    return [s for s in sizes if s % profile.wavefront == 0 and s <= max_work_group_size]


def spmm_tile_candidates(profile, format: str, batch: str, block_rows: int) -> list[dict[str, str]]:
    """The tile shapes the sparse launcher supports for this kernel and batch class."""
    if batch == "batch 1":
        if format == "csr" and not profile.row_per_work_item:
            return [{"ROW_LANES": str(n)} for n in (4, 8, 16, 32) if n <= profile.wavefront]
        return [{"VEC_WIDTH": "4"}, {"VEC_WIDTH": "8"}]
    tiles = (1, 2, 4) if profile.row_per_work_item else (1, 2)
    most = max(1, 16 // block_rows) if format == "bsr" else 4  # AVX2's 16 registers, see sparse.py
    return [{"TILE_VECTORS": str(t)} for t in tiles if t <= most]


def gemm_tile_candidates(batch: str) -> list[dict[str, str]]:
    """TILE_M for large batches (smaller batches take the smallest tile that holds them)."""
    return [{"TILE_M": t} for t in ("4", "8", "16")] if batch == "batch>8" else []


def _is_default(candidate: dict[str, str], defaults: dict[str, str | None]) -> bool:
    return all(defaults.get(name) == value for name, value in candidate.items())


def _new_gemm_tiles(gemm, batch: str, m_total: int) -> list[dict[str, str]]:
    """gemm_tile_candidates other than the TILE_M the launcher's TunedGemm `gemm` picks itself."""
    return [t for t in gemm_tile_candidates(batch) if t["TILE_M"] != str(gemm.tile(m_total))]


# ---------------------------------------------------------------------------------- the problems


@dataclass
class Problem:
    """One (kernel, shape class) to tune: a node's attributes and constants, an input, and the
    reference output with the error each element may have."""

    kernel: str
    batch: str
    bucket: str
    op_type: str
    attrs: dict[str, Any]
    constants: dict[int, np.ndarray]
    x: np.ndarray
    expected: np.ndarray
    bound: np.ndarray
    tiles: list[dict[str, str]]  # tile-shape candidates other than the launcher's own choice

    @property
    def key(self) -> str:
        return entry_key(self.kernel, self.batch, self.bucket)


def _reference(op_type: str, x: np.ndarray, constants: dict[int, np.ndarray], attrs: dict, count: int):
    from polaris_opt.ops.reference import REFERENCES

    return REFERENCES[op_type]([x] + [constants.get(i) for i in range(1, count)], attrs)


def _default_launcher(env, op_type: str, attrs: dict, constants: dict[int, np.ndarray]):
    """The launcher as it chooses for itself, whatever the cache says (to skip candidates equal to it)."""
    from polaris_opt.runtime.launchers import LAUNCHERS

    with trial({}):
        return LAUNCHERS[op_type](env, attrs, constants)


def spmm_problems(env, rng, format: str, values: str, bucket: str) -> Iterator[Problem]:
    """The sparse kernels of one format and value type at K = K_BUCKETS[bucket], per batch class."""
    from polaris_opt.sparse.formats import from_dense, to_dense

    w = rng.standard_normal((ROWS, K_BUCKETS[bucket])).astype(np.float32)
    w[rng.random(w.shape) < SPARSITY] = 0
    matrix = from_dense(w, format, values=values)
    dense = to_dense(matrix)  # the stored values (fp16/int8 rounding) are the reference's
    attrs = {
        "format": format,
        "shape": list(matrix.shape),
        "block": list(matrix.block),
        "slice_height": matrix.slice_height,
        "activation": "none",
    }
    constants = {1: matrix.data, 2: matrix.indices, 3: matrix.indptr}
    if matrix.scale is not None:
        constants[5] = matrix.scale
    weight = _default_launcher(env, "SparseMatMul", attrs, constants).weight
    for batch, m_total in BATCH_CLASSES.items():
        x = rng.standard_normal((m_total, dense.shape[1])).astype(np.float32)
        defaults = {
            "VEC_WIDTH": str(weight.vec_width),
            "TILE_VECTORS": str(weight.tile_vectors(m_total)),
            "ROW_LANES": weight.defines.get("ROW_LANES"),
        }
        tiles = spmm_tile_candidates(env.profile, format, batch, matrix.block[0])
        yield Problem(
            kernel_key(env.profile.name, format, values),
            batch,
            bucket,
            "SparseMatMul",
            attrs,
            constants,
            x,
            _reference("SparseMatMul", x, constants, attrs, 6),
            RTOL * (np.abs(x) @ np.abs(dense).T) + 1e-6,
            [tile for tile in tiles if not _is_default(tile, defaults)],
        )


def qmatmul_problems(env, rng, bucket: str) -> Iterator[Problem]:
    """QMatMul's GEMM at K = K_BUCKETS[bucket], per batch class, with static activation
    parameters: the GEMM is what is tuned, not the dynamic range search."""
    from polaris_opt.ops.reference import quantize_static

    k = K_BUCKETS[bucket]
    w_q = rng.integers(-128, 128, (ROWS, k), dtype=np.int8)
    w_scale = rng.uniform(1e-3, 2e-2, ROWS).astype(np.float32)
    x_scale, zero_point = np.float32(0.02), np.uint8(128)
    constants = {1: w_q, 2: w_scale, 4: np.array(x_scale), 5: np.array(zero_point)}
    gemm = _default_launcher(env, "QMatMul", {}, constants).gemm
    weight = np.abs(w_q.astype(np.float64) * w_scale[:, None])
    for batch, m_total in BATCH_CLASSES.items():
        x = rng.standard_normal((m_total, k)).astype(np.float32)
        steps = np.abs(quantize_static(x, x_scale, zero_point).astype(np.float64) - float(zero_point))
        magnitude = (steps * float(x_scale)) @ weight.T  # Σ |x_q − zp|·x_scale·|w|: bounds |acc|·scales
        yield Problem(
            kernel_key(env.profile.name, gemm.name),
            batch,
            bucket,
            "QMatMul",
            {},
            constants,
            x,
            _reference("QMatMul", x, constants, {}, 6),
            QUANT_RTOL * magnitude + 1e-6,
            _new_gemm_tiles(gemm, batch, m_total),
        )


def int4_problems(env, rng, bucket: str) -> Iterator[Problem]:
    """MatMulInt4 at K = K_BUCKETS[bucket] (blocks of INT4_BLOCK, with zero points), per batch class."""
    from polaris_opt.int4 import pack_nibbles, packed_weight, quantize_blocks
    from polaris_opt.ops.reference import int4_weight

    k = K_BUCKETS[bucket]
    codes, scales, points = quantize_blocks(
        rng.standard_normal((k, ROWS)).astype(np.float32), INT4_BLOCK, symmetric=False
    )
    constants = {1: packed_weight(codes, INT4_BLOCK), 2: scales, 3: pack_nibbles(points)}
    attrs = {"K": k, "N": ROWS, "block_size": INT4_BLOCK}
    weight = np.abs(int4_weight(constants[1], constants[2], constants[3], attrs)).astype(np.float64)
    gemm = _default_launcher(env, "MatMulInt4", attrs, constants).gemm
    gamma = k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)  # float32 sums of k terms in any order
    for batch, m_total in BATCH_CLASSES.items():
        x = rng.standard_normal((m_total, k)).astype(np.float32)
        yield Problem(
            kernel_key(env.profile.name, gemm.name),
            batch,
            bucket,
            "MatMulInt4",
            attrs,
            constants,
            x,
            _reference("MatMulInt4", x, constants, attrs, 5),
            2 * gamma * (np.abs(x).astype(np.float64) @ weight.T) + 1e-6,  # the reference rounds too
            _new_gemm_tiles(gemm, batch, m_total),
        )


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
    local_size: int | None = None  # the chosen candidate's work-group size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tune(
    env,
    *,
    quick: bool = False,
    families: tuple[str, ...] | None = None,
    formats: tuple[str, ...] | None = None,
    values: tuple[str, ...] | None = None,
    buckets: tuple[str, ...] | None = None,
    seed: int = 0,
    progress: Callable[[str, int], Any] | None = None,
) -> list[TuneResult]:
    """Time the candidates of every (kernel, shape class) on `env`; return one result each.

    quick: K ≤ 256 only, csr with fp32 values for the sparse kernels, work-group sizes within a
    factor of two of the default, 8 timed runs instead of 15.
    `families` (of FAMILIES), `formats`, `values` and `buckets` narrow the set further.
    `progress(description, total)` is a context manager yielding advance(n) (the CLI's bar).
    """
    families = families or FAMILIES
    formats = formats or (("csr",) if quick else FORMATS)
    values = values or (("fp32",) if quick else VALUES)
    buckets = buckets or (("k<=256",) if quick else tuple(K_BUCKETS))
    runs = 8 if quick else 15
    most = env.device.max_work_group_size
    sizes = local_size_candidates(env.profile, most, near=env.local_size if quick else None)
    rng = np.random.default_rng(seed)
    sources = []  # each yields the problems of one weight, one per batch class
    if "spmm" in families:
        sources += [(spmm_problems, (f, v, b)) for f in formats for v in values for b in buckets]
    sources += [(qmatmul_problems, (b,)) for b in buckets if "qmatmul" in families]
    sources += [(int4_problems, (b,)) for b in buckets if "int4" in families]
    results = []
    with _progress(progress, "tuning kernels", len(sources) * len(BATCH_CLASSES)) as advance:
        for make, arguments in sources:
            for problem in make(env, rng, *arguments):
                results.append(tune_one(env, problem, runs, sizes))
                advance(1)
    return results


@contextmanager
def _progress(progress, description: str, total: int):
    if progress is None:
        yield lambda n=1: None
    else:
        with progress(description, total) as advance:
            yield advance


def tune_one(env, problem: Problem, runs: int, sizes: list[int]) -> TuneResult:
    """Tile shapes at the default work-group size, then work-group sizes with the winning tile
    shape; a winner other than the launcher's own choice must then beat it again, head to head.

    The rematch is there because a shared machine's speed drifts while a race runs: on this 2-core
    VM, 40-run races of work-group sizes 16-256 put them within 0.3-7 % of each other (five shape
    classes, all three families), yet 15-run races still crown one by 5-10 % now and then."""
    default = _Trial(env, problem, {})
    tiles = [default] + [_Trial(env, problem, tile) for tile in problem.tiles]
    winner = (_fastest(_race(env, tiles, runs)) if len(tiles) > 1 else None) or default
    widened = [
        _Trial(env, problem, {**winner.defines, "LOCAL_SIZE": str(size)})
        for size in sizes
        if size != env.local_size
    ]
    scores = _race(env, _distinct(default, winner, *widened), runs)
    best = _fastest(scores)
    if best is not None and best is not default and default.ok:
        scores = _race(env, [default, best], 2 * runs)
        if scores[best] > (1 - NOISE_MARGIN) * scores[default]:
            best = default  # within timing noise of the launcher's own choice: keep that
    return TuneResult(
        key=problem.key,
        kernel=problem.kernel,
        batch=problem.batch,
        bucket=problem.bucket,
        candidates=[{"defines": t.defines, "ms": t.ms, "ok": t.ok} for t in _distinct(*tiles, *widened)],
        best=best.defines if best else None,
        best_ms=scores.get(best),
        default_ms=scores.get(default),
        local_size=best.local_size if best else None,
    )


def _distinct(*trials: _Trial) -> list[_Trial]:
    return list({id(t): t for t in trials}.values())


def _race(env, trials: list[_Trial], runs: int) -> dict[_Trial, float]:
    """Each runnable trial's score (ms, the SCORE_QUANTILE of its runs) over `runs` rounds that time
    every one of them once (the runs are also added to each trial's `times`)."""
    runnable = [t for t in trials if t.launcher is not None]
    fresh: dict[_Trial, list[float]] = {t: [] for t in runnable}
    # Round-robin and rotated: drift (a core's clock, other work) does not favour whichever
    # candidate ran last, nor any candidate's place in a round.
    for run in range(runs):
        shift = run % max(len(runnable), 1)
        for candidate in runnable[shift:] + runnable[:shift]:
            fresh[candidate].append(_timed_launch(env, candidate.launcher, candidate.feeds))
    for candidate, times in fresh.items():
        candidate.times += times
    return {candidate: _score(times) for candidate, times in fresh.items() if times}


def _score(times: list[float]) -> float:
    return float(np.quantile(times, SCORE_QUANTILE))


def _fastest(scores: dict[_Trial, float]) -> _Trial | None:
    correct = [t for t in scores if t.ok]
    return min(correct, key=scores.__getitem__) if correct else None


@dataclass(eq=False)
class _Trial:
    """The problem's launcher built with one candidate's defines and launched once (the build and
    a warm-up), its output checked against the reference; timed runs go to `times` (ms). A
    candidate the device cannot run (a work-group too large for one kernel) has no launcher."""

    env: Any
    problem: Problem
    defines: dict[str, str]
    launcher: Any = None
    feeds: dict = field(default_factory=dict)
    ok: bool = False
    local_size: int | None = None
    times: list[float] = field(default_factory=list)

    def __post_init__(self):
        import pyopencl.array as cl_array

        from polaris_opt.cl_env import LocalSizeError
        from polaris_opt.runtime.launchers import LAUNCHERS

        problem = self.problem
        feeds = {0: cl_array.to_device(self.env.queue, problem.x)}
        try:  # launchers build some kernels at their first launch
            with trial(self.defines):
                launcher = LAUNCHERS[problem.op_type](self.env, problem.attrs, problem.constants)
            output = launcher.launch(feeds).get()
        except LocalSizeError as error:
            log.info("%s: %s cannot run: %s", problem.key, self.defines, error)
            return
        self.launcher, self.feeds = launcher, feeds
        self.local_size = self.env.local_size_for(self.defines)
        self.ok = bool(np.all(np.abs(output - problem.expected) <= problem.bound))

    @property
    def ms(self) -> float | None:
        return _score(self.times) if self.times else None


def _timed_launch(env, launcher, feeds) -> float:
    """One launch in ms, right after an untimed one, from a marker before it to a marker after it
    (profiling events), or wall time around a finished queue when the queue does not profile.

    With profiling, everything waits behind a gate (a user event) until all of it is enqueued, so
    the device runs the untimed launch, the markers and the timed launch back to back: the timed
    one finds the device's threads awake instead of waiting for an idle core to wake. Measured
    on PoCL (2 cores, a VM), QMatMul batch 1 at K = 256 over 12 runs: 0.011-0.14 ms median
    launched plainly, 0.010-0.011 behind the gate. Launchers only enqueue in `launch` (they never
    wait on the queue), so holding the queue cannot deadlock."""
    import pyopencl as cl

    if not env.queue.properties & cl.command_queue_properties.PROFILING_ENABLE:
        launcher.launch(feeds)
        env.queue.finish()
        began = time.perf_counter()
        launcher.launch(feeds)
        env.queue.finish()
        return (time.perf_counter() - began) * 1e3
    gate = cl.UserEvent(env.context)
    try:
        cl.enqueue_marker(env.queue, wait_for=[gate])
        launcher.launch(feeds)
        start = cl.enqueue_marker(env.queue)
        launcher.launch(feeds)
        end = cl.enqueue_marker(env.queue)
    finally:
        gate.set_status(cl.command_execution_status.COMPLETE)
    end.wait()
    return (end.profile.end - start.profile.start) * 1e-6


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
