"""The CI conversion step's cache (issue 6): `polaris-opt compile` re-run with a warm cache against
its first run, on resnet_s with entropy calibration. Target: the warm run >= 5x faster.

The command is the CI step of docs/ci.md: the pipeline of examples/ci/recipe.yaml (cleanup,
prune 0.3, calibrate entropy, quantize, structure verified after each pass), --eval data and
two gates, on models/resnet_s.onnx. A cold run starts from an empty cache folder; a warm run
reuses the folder an identical run filled (calibration statistics and both models' outputs on
the --eval data). Every run is a fresh process timed from outside, interpreter start-up and
imports included: what a CI job waits for. Cold and warm alternate (C W C W ...) after one
warm-up pair; reported: median and p10 of each, and the ratio of the medians.

Calibration sets: the shipped 64 samples of resnet_s.calib.npz, and sets built here from them,
repeated with N(0, 0.1²) noise up to N samples (seeded). The --eval set: 256 samples built the
same way from another seed. The floor: `compile` with a pipeline that does no work
(`infer-shapes`) on the same model, what no cache can save. Cold and warm outputs are compared
byte for byte.

    .venv/bin/python benchmarks/bench_ci.py [--runs 7] [--samples 64,512,2048] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json  # noqa: E402

from polaris_opt.recipe import load_recipe  # noqa: E402

CLI = Path(sys.executable).parent / "polaris-opt"
MODEL = ROOT / "models" / "resnet_s.onnx"
SHIPPED = ROOT / "models" / "resnet_s.calib.npz"
RECIPE = ROOT / "examples" / "ci" / "recipe.yaml"
NOISE = 0.1
EVAL_SAMPLES = 256
GATES = ("sqnr>=10", "size_ratio<=0.5")


def noisy_copies(samples: int, seed: int) -> np.ndarray:
    """The shipped calibration samples, repeated with seeded noise, cut to `samples` rows."""
    base = np.load(SHIPPED)["input"]
    rng = np.random.default_rng(seed)
    copies = -(-samples // len(base))
    noisy = [base + NOISE * rng.standard_normal(base.shape).astype(np.float32) for _ in range(copies)]
    return np.concatenate(noisy)[:samples]


def entropy_pipeline() -> str:
    """The CI recipe's pipeline, which must calibrate with entropy for this benchmark to mean anything."""
    text = load_recipe(RECIPE).pipeline
    if "calibrate{method=entropy}" not in text:
        raise SystemExit(f"{RECIPE} no longer calibrates with entropy: {text}")
    return text


def compile_command(pipeline: str, calib: Path, eval_data: Path, output: Path, cache: Path) -> list[str]:
    checks = [arg for gate in GATES for arg in ("--check", gate)]
    return [
        str(CLI), "compile", str(MODEL), "-p", pipeline, "--calib", str(calib), "--eval", str(eval_data),
        "-o", str(output), "--cache-dir", str(cache), "-q", *checks,
    ]  # fmt: skip


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def cold_and_warm(pipeline: str, calib: Path, eval_data: Path, work: Path, runs: int) -> dict:
    """Interleaved cold and warm runs on one calibration set; their times and outputs' equality."""
    warm_cache = work / "warm-cache"
    cold_out, warm_out = work / "cold.onnx", work / "warm.onnx"
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    for index in range(runs + 1):  # the first pair warms the OS file cache and fills warm_cache
        cold_cache = work / f"cold-cache-{index}"
        cold = timed(compile_command(pipeline, calib, eval_data, cold_out, cold_cache))
        warm = timed(compile_command(pipeline, calib, eval_data, warm_out, warm_cache))
        if index > 0:
            times["cold"].append(cold)
            times["warm"].append(warm)
    return {
        "cold_s": summary(times["cold"]),
        "warm_s": summary(times["warm"]),
        "ratio": statistics.median(times["cold"]) / statistics.median(times["warm"]),
        "identical_outputs": cold_out.read_bytes() == warm_out.read_bytes(),
    }


def floor_seconds(work: Path, runs: int) -> dict:
    """`compile` doing nothing worth caching: interpreter, imports, load, one pass, save."""
    command = [str(CLI), "compile", str(MODEL), "-p", "infer-shapes", "-o", str(work / "floor.onnx"), "-q"]
    timed(command)
    return summary([timed(command) for _ in range(runs)])


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p10": ordered[int(0.1 * (len(ordered) - 1))],
        "runs": ordered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--samples", default="64,512,2048", help="calibration set sizes")
    parser.add_argument("--quick", action="store_true", help="2 runs, 64 and 512 samples")
    args = parser.parse_args()
    runs, sizes = (2, [64, 512]) if args.quick else (args.runs, [int(s) for s in args.samples.split(",")])
    pipeline = entropy_pipeline()
    results = {"machine": machine(), "model": MODEL.name, "pipeline": pipeline, "gates": list(GATES)}
    results["eval"] = f"{EVAL_SAMPLES} samples, resnet_s.calib.npz + N(0, {NOISE}^2) noise (seed 1)"
    results["sets"] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ci.") as scratch:
        work = Path(scratch)
        eval_data = work / "eval.npz"
        np.savez(eval_data, input=noisy_copies(EVAL_SAMPLES, seed=1))
        results["floor_s"] = floor_seconds(work, runs)
        print(f"floor (compile -p infer-shapes): median {results['floor_s']['median']:.3f} s")
        for samples in sizes:
            calib = SHIPPED if samples == 64 else work / f"calib-{samples}.npz"
            if samples != 64:
                np.savez(calib, input=noisy_copies(samples, seed=0))
            folder = work / f"set-{samples}"
            folder.mkdir()
            measured = cold_and_warm(pipeline, calib, eval_data, folder, runs)
            results["sets"][str(samples)] = measured
            report(samples, calib, measured)
    path = write_json("ci", results)
    print(f"wrote {path}")


def report(samples: int, calib: Path, measured: dict) -> None:
    cold, warm = measured["cold_s"], measured["warm_s"]
    source = "shipped" if calib == SHIPPED else f"64 shipped + N(0, {NOISE}^2) noise"
    print(
        f"{samples:5d} calibration samples ({source}): cold {cold['median']:.3f} s (p10 {cold['p10']:.3f}), "
        f"warm {warm['median']:.3f} s (p10 {warm['p10']:.3f}), cold/warm {measured['ratio']:.2f}x, "
        f"outputs identical: {measured['identical_outputs']}"
    )


if __name__ == "__main__":
    main()
