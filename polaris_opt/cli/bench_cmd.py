"""`polaris-opt bench`: time models side by side on the same inputs, interleaved A B A B ...

    polaris-opt bench models/resnet_s.onnx build/resnet_s.int8.onnx --batch 1,8
    polaris-opt bench pruned.onnx pruned.polaris.onnx --runtime ort,polaris --json bench.json

A thin layer over polaris_opt.bench: the arguments are checked and the inputs made before any
worker starts (polaris_opt/bench/plan.py), each contender runs in its own worker process
(runner.py), and the result is a table, or with --json OUT also the bench JSON document
(document.py) that `polaris-opt report --bench` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from polaris_opt.bench import DEFAULT_RUNS, DEFAULT_WARMUP
from polaris_opt.cli.options import DebugFlag, DeviceOpt, QuietFlag

ModelsArg = Annotated[
    list[Path],
    typer.Argument(help="ONNX models taking the same inputs; the first is the baseline.", show_default=False),
]
RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="ort (onnxruntime.InferenceSession) or polaris (polaris_opt.runtime.Session); "
        "a comma list gives each model its own, e.g. ort,polaris.",
    ),
]
BatchOpt = Annotated[
    str | None,
    typer.Option("--batch", help="Batch sizes, e.g. 1,8,32.", show_default="the batch of the inputs"),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="ONNX Runtime intra-op threads of every session.")]
WarmupOpt = Annotated[
    int, typer.Option("--warmup", help="Unmeasured runs per contender before timing (and at least 0.1 s).")
]
RunsOpt = Annotated[
    int | None,
    typer.Option("--runs", help="Measured runs per contender.", show_default=str(DEFAULT_RUNS)),
]
SecondsOpt = Annotated[
    float | None,
    typer.Option("--seconds", help="Instead of --runs: run each contender for S measured seconds."),
]
InputOpt = Annotated[
    str,
    typer.Option(
        "--input", "-i", help="FILE.npz (one array per input, by name) or random (from the first model)."
    ),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option("--shape", help="A random input's whole shape, NAME=AxBxC, for dynamic dims; repeatable."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")]
BenchJsonOpt = Annotated[
    Path | None,
    typer.Option("--json", help="Write the bench JSON (rows, settings, machine) to this file."),
]


def bench(
    models: ModelsArg,
    runtime: RuntimeOpt = "ort",
    batch: BatchOpt = None,
    threads: ThreadsOpt = 1,
    warmup: WarmupOpt = DEFAULT_WARMUP,
    runs: RunsOpt = None,
    seconds: SecondsOpt = None,
    input: InputOpt = "random",
    shape: ShapeOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_out: BenchJsonOpt = None,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Time MODELs interleaved on the same inputs: latency, throughput, peak RSS, size."""
    # Imported here so `polaris-opt --help` loads neither onnxruntime nor pyopencl.
    from polaris_opt.bench.document import bench_document, bench_rows, check_json_path, write_document
    from polaris_opt.bench.plan import plan_bench
    from polaris_opt.bench.runner import run_bench
    from polaris_opt.cli import OUTPUT

    out = OUTPUT.merged(quiet=quiet, debug=debug)
    settings = _settings(threads, warmup, runs, seconds, device)
    if json_out is not None:
        check_json_path(json_out, models)
    plan = plan_bench(models, runtime=runtime, batch=batch, input=input, shapes=shape, seed=seed)
    if plan.unused_arrays:
        out.warn(f"--input {input}: no model takes {', '.join(plan.unused_arrays)}; left out")
    contenders = len(plan.pairs) * len(plan.feeds_by_batch)
    total = contenders * (settings.warmup + settings.runs) if settings.runs is not None else None
    with out.progress(f"bench: {contenders} contenders", total) as advance:
        measured = run_bench(plan.pairs, plan.feeds_by_batch, settings, advance)
    devices = [result.device for result in measured if result.device]
    if any(result.contender.runtime == "polaris" and not result.device for result in measured):
        out.warn("the polaris runtime found no OpenCL device: its ai.polaris ops ran on the host (NumPy)")
    document = bench_document(
        bench_rows(measured), settings, runtime=runtime, input=input, shapes=shape or [], devices=devices
    )
    if json_out is not None:
        write_document(json_out, document)
    out.result(document, lambda console: render(console, document, json_out))


def _settings(threads: int, warmup: int, runs: int | None, seconds: float | None, device: str | None):
    from polaris_opt.bench.runner import Settings
    from polaris_opt.errors import BadInput

    if runs is not None and seconds is not None:
        raise BadInput("--runs and --seconds both given; give one: a run count, or seconds per contender")
    if runs is not None and runs < 1:
        raise BadInput(f"--runs {runs}: give at least 1")
    if seconds is not None and not seconds > 0:
        raise BadInput(f"--seconds {seconds}: give a time above 0")
    if warmup < 0:
        raise BadInput(f"--warmup {warmup}: give 0 or more")
    if threads < 1:
        raise BadInput(f"--threads {threads}: give at least 1")
    runs = DEFAULT_RUNS if runs is None and seconds is None else runs
    return Settings(threads=threads, warmup=warmup, runs=runs, seconds=seconds, device=device)


# Two-line headers, no padding (the box puts one space between columns): eleven columns fit in
# 80 characters for model names of up to about 15 characters.
COLUMNS = (
    ("model", "left"),
    ("runtime", "left"),
    ("batch", "right"),
    ("p50\nms", "right"),
    ("p90\nms", "right"),
    ("p99\nms", "right"),
    ("samples\n/s", "right"),
    ("RSS\nMB", "right"),
    ("size\nMB", "right"),
    ("speed\n-up", "right"),
    ("size\nratio", "right"),
)


def render(console, document: dict[str, Any], json_out: Path | None) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    rows, settings = document["results"], document["settings"]
    console.print(_headline(rows, settings))
    table = Table(box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    for name, justify in COLUMNS:
        table.add_column(name, justify=justify, overflow="fold")
    names = _short_names([row["model"] for row in rows])
    for row in rows:
        table.add_row(
            escape(names[row["model"]]),
            row["runtime"],
            str(row["batch"]),
            *(_ms(row[key]) for key in ("p50_ms", "p90_ms", "p99_ms")),
            _number(row["throughput"], "{:,.0f}"),
            _number(row["peak_rss_mb"], "{:.0f}"),
            f"{row['file_bytes'] / 1e6:.3g}",
            _ratio(row["speedup"]),
            _ratio(row["size_ratio"]),
        )
    console.print(table)
    console.print(_quality_line(rows))
    if json_out is not None:
        console.print(f"wrote {escape(str(json_out))}")


def _short_names(paths: list[str]) -> dict[str, str]:
    """Each model by its file's stem when the stems tell the models apart, else by its path."""
    stems = {path: Path(path).stem for path in paths}
    distinct = len(set(stems.values())) == len(set(paths))
    return stems if distinct else {path: path for path in paths}


def _headline(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The first line: what was run, the same from run to run and machine to machine."""
    batches = len({row["batch"] for row in rows})
    contenders = len(rows) // batches
    measured = f"{settings['runs']} runs" if settings["runs"] is not None else f"{settings['seconds']:g} s"
    return (
        f"[bold]bench[/]: {contenders} model{'s' * (contenders != 1)} x {batches} "
        f"batch{'es' * (batches != 1)}, {measured} each after {settings['warmup']} warm-up, interleaved"
    )


def _quality_line(rows: list[dict[str, Any]]) -> str:
    """How far the numbers can be trusted: the worst spread, and bench's own time per run."""
    spreads = [row["spread"] for row in rows if row["spread"] is not None]
    overheads = [row["overhead_ms"] / row["p50_ms"] for row in rows if row["p50_ms"]]
    worst_spread = f"{max(spreads):.2f}" if spreads else "-"
    worst_overhead = f"{100 * max(overheads):.2g} %" if overheads else "-"
    return f"worst spread p90/p50 {worst_spread}; bench's own time per run at most {worst_overhead} of p50"


def _ms(value: float | None) -> str:
    """Three significant digits, trailing zeros kept: 0.0123, 0.380, 3.80, 123, 1234."""
    if value is None:
        return "-"
    return f"{value:#.3g}".rstrip(".") if value < 100 else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)
