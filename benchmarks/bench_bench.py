"""`polaris-opt bench` against its two targets (issue 6), and the measurements behind its defaults.

1. Spread: p90/p50 of every contender at the default warm-up and run count, target <= 1.2, for
   the 5 zoo models at batch 1 and 8 in pairs: ORT against ORT (each model against itself, and
   resnet_s against mobilenetv2_s, the two zoo models with the same inputs), and ORT on the
   model pruned to 90 % against the polaris runtime on the same model sparsified.
2. Overhead: the bench's own time per run (the worker's loop outside session.run) as a % of
   p50, target <= 2 % for models of 1 ms and more (resnet_s and mobilenetv2_s at batch 8,
   mlp_large at batch 1 and 8, and the sparse models that take >= 1 ms). Also shown, as facts
   rather than targets: the round trip to the worker per run (transit, mostly waking a
   sleeping process) and the whole bench's wall time over the measured time.
3. Why the defaults: spread and the A/A speed-up error (a model against itself should come
   out 1.00x) with each choice of the runner undone in turn (the re-warm run per turn, the
   warm-up's time floor, pinning every worker to the same CPUs); how many runs a fresh session
   needs to settle; the wall time of a default bench of two small models.

All through the library the command uses (polaris_opt.bench), so Measured.transit_s is at hand.

    .venv/bin/python benchmarks/bench_bench.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json  # noqa: E402

import polaris_opt.bench.runner as runner  # noqa: E402
from polaris_opt.bench import DEFAULT_RUNS, DEFAULT_WARMUP  # noqa: E402
from polaris_opt.bench.document import bench_rows  # noqa: E402
from polaris_opt.bench.plan import plan_bench  # noqa: E402
from polaris_opt.compiler import run_pipeline  # noqa: E402
from polaris_opt.pipeline import Pipeline  # noqa: E402
from polaris_opt.runtime.partition import has_polaris_nodes  # noqa: E402

MODELS = ROOT / "models"
ZOO = ["digits_mlp", "digits_cnn", "resnet_s", "mobilenetv2_s", "transformer_s"]
LARGE = MODELS / "large" / "mlp_large.onnx"
SPREAD_TARGET, OVERHEAD_TARGET = 1.2, 0.02
CLI = Path(sys.executable).parent / "polaris-opt"


@dataclass(frozen=True)
class Case:
    name: str
    models: list[Path]
    runtime: str  # as --runtime takes it


def measure(case: Case, batch: int, settings: runner.Settings) -> list[dict]:
    """One bench of `case` at `batch`: its rows, with transit and wall time added."""
    plan = plan_bench(case.models, runtime=case.runtime, batch=str(batch))
    started = time.perf_counter()
    measured = runner.run_bench(plan.pairs, plan.feeds_by_batch, settings)
    wall = time.perf_counter() - started
    rows = bench_rows(measured)
    busy = sum(sum(m.times) for m in measured)
    for position, (row, result) in enumerate(zip(rows, measured, strict=True)):
        row["case"], row["position"] = case.name, position
        row["bench_wall_s"], row["bench_wall_over_measured"] = wall, wall / busy
        row["transit_ms"] = result.transit_s * 1e3 / row["runs"]
    return rows


# ------------------------------------------------------------------------------------ models


def sparse_twins(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Each zoo model pruned to 90 % (dense, for ORT) and sparsified (ai.polaris, for polaris)."""
    twins = {}
    for name in ZOO:
        pruned = run_pipeline(
            onnx.load(MODELS / f"{name}.onnx"), Pipeline.parse("cleanup,prune{sparsity=0.9}")
        )
        sparse = run_pipeline(pruned.model, Pipeline.parse("sparsify"))
        if not has_polaris_nodes(sparse.model):
            print(f"  {name}: sparsify made no ai.polaris node; no polaris pair")
            continue
        dense_path, sparse_path = folder / f"{name}.p90.onnx", folder / f"{name}.p90.polaris.onnx"
        onnx.save(pruned.model, dense_path)
        onnx.save(sparse.model, sparse_path)
        twins[name] = (dense_path, sparse_path)
    return twins


def large_model() -> Path | None:
    if not LARGE.exists():
        build = [sys.executable, str(MODELS / "build_zoo.py"), "--large", str(LARGE)]
        if subprocess.run(build, cwd=ROOT).returncode != 0:
            print("  mlp_large could not be built; overhead measured on the zoo only")
            return None
    return LARGE


def spread_cases(twins: dict[str, tuple[Path, Path]]) -> list[Case]:
    cases = [Case(f"{name} vs itself (ort)", [MODELS / f"{name}.onnx"] * 2, "ort") for name in ZOO]
    same_inputs = [MODELS / "resnet_s.onnx", MODELS / "mobilenetv2_s.onnx"]
    cases.append(Case("resnet_s vs mobilenetv2_s (ort)", same_inputs, "ort"))
    cases += [
        Case(f"{name} p90: ort vs polaris", list(paths), "ort,polaris") for name, paths in twins.items()
    ]
    return cases


# ----------------------------------------------------------------------------------- targets


def spread_target(cases: list[Case], repeats: int, settings: runner.Settings) -> list[dict]:
    """Each case benched, right after a plain loop of each of its contenders (the machine's spread)."""
    rows = []
    for repeat in range(repeats):
        for batch in (1, 8):
            for case in cases:
                contenders = zip(case.models, runner_runtimes(case), strict=True)
                plain = {(m, r): plain_loop(m, r, batch, settings) for m, r in contenders}
                for row in measure(case, batch, settings):
                    row["plain_spread"] = plain[(Path(row["model"]), row["runtime"])]
                    rows.append(row | {"repeat": repeat})
                    name = Path(row["model"]).name
                    figures = f"p50 {row['p50_ms']:8.3f} ms  spread {row['spread']:.3f}"
                    figures += f" (plain loop {row['plain_spread']:.3f})"
                    print(f"  {repeat} b{batch} {case.name:40s} {name:28s} {row['runtime']:8s} {figures}")
    return rows


def runner_runtimes(case: Case) -> list[str]:
    names = case.runtime.split(",")
    return names * len(case.models) if len(names) == 1 else names


def plain_loop(path: Path, runtime: str, batch: int, settings: runner.Settings) -> float:
    """p90/p50 of the simplest measurement: one worker, the same warm-up, then all its runs back
    to back with nothing interleaved; what the machine itself adds to the spread just now."""
    from polaris_opt.bench.feeds import random_feeds
    from polaris_opt.bench.models import read_model
    from polaris_opt.bench.process import WorkerProcess
    from polaris_opt.bench.stats import summarize
    from polaris_opt.bench.worker import Job

    feeds = random_feeds(read_model(path).inputs, {}, batch, 0)
    worker = WorkerProcess(path.name)
    try:
        worker.ask("open", Job(str(path), runtime, 1, None, feeds, runner.worker_cpus(1)))
        worker.ask("run", settings.warmup, runner.WARMUP_SECONDS)
        times = worker.ask("run", settings.runs, None)[1]
    finally:
        worker.stop()
    return summarize(times, batch).spread


def overhead_target(
    rows: list[dict], large: Path | None, repeats: int, settings: runner.Settings
) -> list[dict]:
    """Rows of models >= 1 ms from the spread runs, plus mlp_large at batch 1 and 8."""
    chosen = [row for row in rows if row["p50_ms"] >= 1.0]
    if large is not None:
        for repeat in range(repeats):
            for batch in (1, 8):
                for row in measure(Case("mlp_large vs itself (ort)", [large, large], "ort"), batch, settings):
                    chosen.append(row | {"repeat": repeat})
    for row in chosen:
        row["overhead_pct"] = 100 * row["overhead_ms"] / row["p50_ms"]
        row["transit_pct"] = 100 * row["transit_ms"] / row["p50_ms"]
    return chosen


# ---------------------------------------------------------------------------------- defaults


# Each variant undoes one choice of the runner: (settings changes, runner module constants).
VARIANTS = {
    "defaults": ({}, {}),
    "no re-warm per turn": ({}, {"REWARM_SECONDS": None}),
    "no warm-up floor": ({}, {"WARMUP_SECONDS": 0.0}),
    "not pinned": ({"pin": False}, {}),
}


def ablation(cases: list[Case], settings: runner.Settings) -> dict[str, dict]:
    """Spread, and the A/A speed-up error of a model against itself, per variant.

    The variants alternate case by case, so each sees the machine as the others do.
    """
    spreads: dict[str, list[float]] = {label: [] for label in VARIANTS}
    errors: dict[str, list[float]] = {label: [] for label in VARIANTS}
    for batch in (1, 8):
        for case in cases:
            for label, (changes, constants) in VARIANTS.items():
                defaults = {name: getattr(runner, name) for name in constants}
                try:
                    for name, value in constants.items():
                        setattr(runner, name, value)
                    rows = measure(case, batch, replace(settings, **changes))
                finally:
                    for name, value in defaults.items():
                        setattr(runner, name, value)
                spreads[label] += [row["spread"] for row in rows]
                errors[label].append(abs(rows[1]["speedup"] - 1))
    return {
        label: spread_figures(spreads[label]) | {"aa_speedup_error_worst": max(errors[label])}
        for label in VARIANTS
    }


def warmup_curve(paths: dict[str, tuple[Path, str]], runs: int = 40) -> dict[str, list[float]]:
    """The first `runs` run times of a fresh session over the median of its last 10, per model."""
    from polaris_opt.bench.feeds import random_feeds
    from polaris_opt.bench.models import read_model
    from polaris_opt.bench.process import WorkerProcess
    from polaris_opt.bench.worker import Job

    curves = {}
    for name, (path, runtime) in paths.items():
        model = read_model(path)
        worker = WorkerProcess(name)
        try:
            worker.ask("open", Job(str(path), runtime, 1, None, random_feeds(model.inputs, {}, 1, 0)))
            times = worker.ask("run", runs, None)[1]
        finally:
            worker.stop()
        steady = statistics.median(times[-10:])
        curves[name] = [t / steady for t in times]
    return curves


def default_wall(repeats: int) -> dict[str, float]:
    """Median wall time of a default `polaris-opt bench` of two small models, whole process."""
    pair = [MODELS / "resnet_s.onnx", MODELS / "mobilenetv2_s.onnx"]
    commands = {
        "digits_mlp vs digits_mlp": [MODELS / "digits_mlp.onnx"] * 2,
        "resnet_s vs mobilenetv2_s": pair,
        "resnet_s vs mobilenetv2_s, --batch 1,8": [*pair, "--batch", "1,8"],
    }
    walls = {}
    for label, args in commands.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([str(CLI), "-q", "bench", *map(str, args)], check=True, cwd=ROOT)
            times.append(time.perf_counter() - started)
        walls[label] = statistics.median(times)
    return walls


# ------------------------------------------------------------------------------------- report


def summarize(spread_rows: list[dict], overhead_rows: list[dict]) -> dict:
    spreads = [row["spread"] for row in spread_rows]
    plain = [row["plain_spread"] for row in spread_rows]
    overheads = [row["overhead_pct"] for row in overhead_rows]
    # A model against itself: the second row's speed-up should be 1.
    self_pairs = [row for row in spread_rows if "itself" in row["case"] and row["position"] == 1]
    return {
        "aa_speedup_error_worst": max(abs(row["speedup"] - 1) for row in self_pairs),
        "contenders": len(spreads),
        "spread_worst": max(spreads),
        "spread_median": statistics.median(spreads),
        "spread_over_target": sum(s > SPREAD_TARGET for s in spreads),
        "plain_loop_spread_worst": max(plain),
        "plain_loop_spread_median": statistics.median(plain),
        "plain_loop_spread_over_target": sum(s > SPREAD_TARGET for s in plain),
        "overhead_pct_worst": max(overheads) if overheads else None,
        "overhead_pct_median": statistics.median(overheads) if overheads else None,
        "transit_pct_worst": max(row["transit_pct"] for row in overhead_rows) if overhead_rows else None,
    }


def spread_figures(spreads: list[float]) -> dict:
    over = sum(spread > SPREAD_TARGET for spread in spreads)
    return {
        "worst": max(spreads),
        "median": statistics.median(spreads),
        "over_target": over,
        "of": len(spreads),
    }


def print_worst(spread_rows: list[dict], overhead_rows: list[dict]) -> None:
    print("\nspread p90/p50 per case and batch (worst over repeats):")
    worst: dict[tuple, tuple[float, float]] = {}
    for row in spread_rows:
        key = (row["case"], Path(row["model"]).name, row["runtime"], row["batch"])
        bench, plain = worst.get(key, (0.0, 0.0))
        worst[key] = (max(bench, row["spread"]), max(plain, row["plain_spread"]))
    for (case, model, runtime, batch), (spread, plain) in worst.items():
        flag = "" if spread <= SPREAD_TARGET else "  > target"
        print(f"  {case:40s} {model:28s} {runtime:8s} b{batch:<2d} {spread:.3f} (plain {plain:.3f}){flag}")
    print("\noverhead per run, models >= 1 ms (worker loop = target; transit = round trip, not a target):")
    for row in overhead_rows:
        name = f"{Path(row['model']).name:28s} {row['runtime']:8s} b{row['batch']:<2d}"
        shares = f"loop {row['overhead_pct']:.3f} %  transit {row['transit_pct']:.2f} %"
        wall = f"wall/measured {row['bench_wall_over_measured']:.2f}"
        print(f"  {name} p50 {row['p50_ms']:8.3f} ms  {shares}  {wall}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="benches per case and batch")
    parser.add_argument("--quick", action="store_true", help="1 repeat, no ablation or warm-up curve")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    settings = runner.Settings(warmup=DEFAULT_WARMUP, runs=DEFAULT_RUNS)
    turns = f"turn {runner.TURN_SECONDS * 1e3:g} ms, re-warm {runner.REWARM_SECONDS * 1e3:g} ms"
    print(
        f"defaults: warm-up {DEFAULT_WARMUP}, runs {DEFAULT_RUNS}, {turns}, at least {runner.MIN_TURNS} turns"
    )
    with tempfile.TemporaryDirectory() as scratch:
        print("pruning and sparsifying the zoo ...")
        twins = sparse_twins(Path(scratch))
        cases = spread_cases(twins)
        print("spread target ...")
        spread_rows = spread_target(cases, repeats, settings)
        print("overhead target ...")
        overhead_rows = overhead_target(spread_rows, large_model(), repeats, settings)
        extra = {}
        if not args.quick:
            print("ablation (ORT, each model against itself) ...")
            extra["ablation"] = ablation(cases[: len(ZOO)], settings)
            print("warm-up curves ...")
            paths = {name: (MODELS / f"{name}.onnx", "ort") for name in ZOO}
            paths |= {f"{name} p90 polaris": (pair[1], "polaris") for name, pair in twins.items()}
            curves = warmup_curve(paths)
            extra["warmup_runs_over_steady"] = {
                name: [round(v, 3) for v in curve[:12]] for name, curve in curves.items()
            }
            extra["default_bench_wall_s"] = default_wall(3)
    print_worst(spread_rows, overhead_rows)
    summary = summarize(spread_rows, overhead_rows)
    print("\nsummary:", summary)
    for key, value in extra.items():
        print(f"{key}:")
        for label, figures in value.items():
            print(f"  {label}: {figures}")
    document = {"machine": machine(), "summary": summary, "spread": spread_rows, "overhead": overhead_rows}
    path = write_json("bench_bench", document | extra)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
