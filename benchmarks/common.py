"""Shared measuring tools: fresh child processes, interleaved runs, medians, machine facts.

Each contender runs in its own Python process so peak RSS is its own (VmHWM of the child
itself), and contenders alternate A B A B ... so drift on a shared machine cancels.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from polaris_opt.bench.document import cpu_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"

# A child runs `body` (which may set `result`), then reports wall time and its own peak RSS.
_CHILD = """
import json, sys, time
started = time.perf_counter()
result = None
{body}
wall = time.perf_counter() - started
# VmHWM belongs to this process's own address space; ru_maxrss would carry over the parent's
# peak, which Linux keeps across fork + exec.
status = open("/proc/self/status").read()
peak_kb = int(status.split("VmHWM:")[1].split()[0])
print("@@" + json.dumps({{"wall": wall, "peak_mb": peak_kb / 1024, "result": result}}))
"""


def run_child(body: str) -> dict:
    """Run `body` in a fresh interpreter; returns wall seconds, peak RSS (MB) and `result`."""
    code = _CHILD.format(body=body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-2000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("@@"))
    return json.loads(line[2:])


def interleave(contenders: dict[str, str], runs: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Run each contender's body `warmup + runs` times, alternating; keep the measured runs."""
    samples: dict[str, list[dict]] = {name: [] for name in contenders}
    for index in range(warmup + runs):
        for name, body in contenders.items():
            measured = run_child(body)
            if index >= warmup:
                samples[name].append(measured)
    return samples


def median(samples: list[dict], key: str) -> float:
    return statistics.median(sample[key] for sample in samples)


def spread(samples: list[dict], key: str) -> float:
    """max / min over the runs: how far a single run can be trusted."""
    values = [sample[key] for sample in samples]
    return max(values) / min(values) if min(values) > 0 else float("inf")


def machine() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "opencl": _opencl_devices(),
    }


def _opencl_devices() -> str:
    try:
        import pyopencl as cl

        return "; ".join(d.name for p in cl.get_platforms() for d in p.get_devices()) or "none"
    except Exception:  # noqa: BLE001 - no OpenCL is a fact to report, not an error
        return "none"


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
