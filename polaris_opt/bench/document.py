"""The bench result as rows and as the JSON document `polaris-opt bench --json OUT` writes.

Each row has the report's "bench" keys (polaris_opt/report/files.py BENCH_ROW_KEYS) plus
"runs", "spread" (p90/p50) and "overhead_ms" (the worker's own time per run outside
session.run). Speed-up is the first model's p50 over this one's at the same batch; size ratio
is this model's bytes over the first model's. Non-finite floats are written as null.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from polaris_opt.bench.runner import Measured, Settings
from polaris_opt.bench.stats import summarize
from polaris_opt.errors import BadInput

FORMAT_VERSION = 1


def bench_rows(measured: list[Measured]) -> list[dict[str, Any]]:
    """One row per contender; the first contender is the baseline of speed-up and size ratio."""
    first_bytes = measured[0].contender.model.file_bytes
    baseline_p50: dict[int, float] = {}
    rows = []
    for result in measured:
        contender = result.contender
        latency = summarize(result.times, contender.batch)
        base = baseline_p50.setdefault(contender.batch, latency.p50_ms)
        rows.append(
            {
                "model": str(contender.model.path),
                "runtime": contender.runtime,
                "batch": contender.batch,
                "p50_ms": latency.p50_ms,
                "p90_ms": latency.p90_ms,
                "p99_ms": latency.p99_ms,
                "throughput": latency.throughput,
                "peak_rss_mb": result.peak_rss_mb,
                "file_bytes": contender.model.file_bytes,
                "speedup": base / latency.p50_ms if latency.p50_ms > 0 else math.inf,
                "size_ratio": contender.model.file_bytes / first_bytes if first_bytes else math.inf,
                "runs": latency.runs,
                "spread": latency.spread,
                "overhead_ms": result.overhead_s * 1e3 / latency.runs,
            }
        )
    return rows


def bench_document(
    rows: list[dict[str, Any]],
    settings: Settings,
    *,
    runtime: str,
    input: str,
    shapes: list[str],
    devices: list[str],
) -> dict[str, Any]:
    """The whole --json document: format version, machine, settings and result rows."""
    return {
        "polaris_opt_bench": FORMAT_VERSION,
        "machine": machine(devices),
        "settings": {
            "runtime": runtime,
            "threads": settings.threads,
            "warmup": settings.warmup,
            "runs": settings.runs,
            "seconds": settings.seconds,
            "input": input,
            "shapes": shapes,
        },
        "results": [{key: strict(value) for key, value in row.items()} for row in rows],
    }


def machine(devices: list[str]) -> dict[str, Any]:
    """What the numbers were measured on; `devices`: the OpenCL devices the workers used."""
    from importlib.metadata import PackageNotFoundError, version

    from polaris_opt import __version__

    try:
        ort_version = version("onnxruntime")
    except PackageNotFoundError:
        ort_version = None
    return {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "polaris_opt": __version__,
        "opencl_devices": sorted(set(devices)),
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def strict(value: Any) -> Any:
    """A non-finite float as None, so the document is strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def check_json_path(path: Path, models: list[Path]) -> None:
    """Refuse a --json target we could not write, or one that is a model, before anything runs."""
    if path.is_dir():
        raise BadInput(f"--json {path}: is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"--json {path}: cannot write, folder {parent} does not exist")
    if path.exists() and any(path.resolve() == model.resolve() for model in models if model.exists()):
        raise BadInput(f"--json {path}: is one of the models; give another file name")


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Write the document whole or not at all: a temporary file beside `path`, then a rename."""
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    parent = path.parent if str(path.parent) else Path(".")
    staged = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=parent, prefix=f".{path.name}.", delete=False) as handle:
            staged = Path(handle.name)
            handle.write(text)
        os.replace(staged, path)
    except OSError as exc:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise BadInput(f"--json {path}: cannot write ({exc.strerror or exc})") from None
