"""`polaris-opt analyze`: which layers lose accuracy in INT8, ranked, and where inside the model.

A thin layer over polaris_opt.analysis: it reads the model and the calibration data, runs the
analysis with a progress bar and shows the ranked table (or --json).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from polaris_opt.cli.calib_options import (
    BatchSizeOpt,
    BgrOpt,
    CalibOpt,
    LayoutOpt,
    LimitOpt,
    MeanOpt,
    SizeOpt,
    StdOpt,
    ThreadsOpt,
)
from polaris_opt.cli.options import DebugFlag, JsonFlag, ModelArg, QuietFlag

METHODS = ("minmax", "percentile", "entropy", "mse")
ACTIVATIONS = ("uint8", "int8")

MethodOpt = Annotated[
    str, typer.Option("--method", help="Calibration method: minmax | percentile | entropy | mse.")
]
PerTensorFlag = Annotated[
    bool, typer.Option("--per-tensor", help="One weight scale per tensor instead of per output channel.")
]
ActivationsOpt = Annotated[
    str, typer.Option("--activations", help="Activations: uint8 (asymmetric) or int8 (symmetric).")
]
TopOpt = Annotated[
    int,
    typer.Option("--top", min=0, help="Rows to show: the most sensitive layers and worst tensors (0 = all)."),
]


def analyze(
    model: ModelArg,
    calib: CalibOpt = None,
    method: MethodOpt = "minmax",
    per_tensor: PerTensorFlag = False,
    activations: ActivationsOpt = "uint8",
    batch_size: BatchSizeOpt = 16,
    limit: LimitOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = "nchw",
    bgr: BgrOpt = False,
    threads: ThreadsOpt = 1,
    top: TopOpt = 20,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Rank MODEL's layers by how much INT8 quantization of each alone costs the output (SQNR)."""
    from polaris_opt.analysis import analyze as run_analysis
    from polaris_opt.calib_data import open_calibration
    from polaris_opt.cli import OUTPUT
    from polaris_opt.cli.calib_options import image_spec
    from polaris_opt.graph_io import load_model

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    # Everything the command line says is checked before the model is read.
    _check_arguments(calib, method, activations)
    image = image_spec(size, mean, std, layout, bgr)
    source_model = load_model(model)
    source = open_calibration(calib, source_model, batch_size=batch_size, limit=limit, image=image)
    report = run_analysis(
        source_model,
        source,
        method=method,
        per_channel=not per_tensor,
        activations=activations,
        threads=threads,
        progress=out.progress,
    )
    # After the run: a source learns some of what it has to say (samples left out) while read.
    for warning in source.warnings:
        out.warn(warning)
    data = {"model": str(model), **report.as_dict()}
    out.result(data, lambda console: render(console, model.name, data, top))


def _check_arguments(calib: str | None, method: str, activations: str) -> None:
    from polaris_opt.errors import BadInput

    if calib is None:
        raise BadInput("analyze needs calibration data: give --calib DATA (.npz, a folder, or 'random')")
    if method not in METHODS:
        raise BadInput(f"--method must be one of {', '.join(METHODS)}; got '{method}'")
    if activations not in ACTIVATIONS:
        raise BadInput(f"--activations must be uint8 or int8; got '{activations}'")


def render(console: Console, title: str, data: dict[str, Any], top: int) -> None:
    settings, full = data["settings"], data["full_model"]
    granularity = "per-channel" if settings["per_channel"] else "per-tensor"
    console.print(f"[bold]{escape(title)}[/]: {settings['samples']} samples in {settings['batches']} batches")
    console.print(
        f"{settings['method']} calibration, {granularity} weights, {settings['activations']} activations"
    )
    console.print(f"all layers INT8: SQNR {_db(full['sqnr_db'])}, cosine {_cosine(full['cosine'])}")
    console.print(_layer_table(data["layers"], top))
    console.print(_tensor_table(data["tensors"], top))


def _layer_table(rows: list[dict[str, Any]], top: int) -> Table:
    shown = rows if top == 0 else rows[:top]
    hidden = len(rows) - len(shown)
    table = Table(
        title="Layers, most sensitive first (only that layer in INT8)",
        title_justify="left",
        caption=f"… and {hidden} less sensitive (--top 0 lists all)" if hidden else None,
        caption_justify="left",
    )
    for name, justify in [("rank", "right"), ("layer", "left"), ("op", "left")]:
        table.add_column(name, justify=justify, overflow="fold")
    for name in ("SQNR", "cosine", "proxy"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in shown:
        table.add_row(
            str(row["rank"]),
            escape(row["name"]),
            row["op"],
            _db(row["sqnr_db"]),
            _cosine(row["cosine"]),
            "-" if row["proxy"] is None else f"{row['proxy']:.3g}",
        )
    return table


def _tensor_table(rows: list[dict[str, Any]], top: int) -> Table:
    # The worst tensors, kept in graph order: where the SQNR falls is where the error enters.
    worst = sorted(range(len(rows)), key=lambda i: _sort_db(rows[i]["sqnr_db"]))
    shown = sorted(worst if top == 0 else worst[:top])
    hidden = len(rows) - len(shown)
    table = Table(
        title="Activations, all layers INT8 vs FP32 (graph order)",
        title_justify="left",
        caption=f"{hidden} better tensors not shown (--top 0 lists all)" if hidden else None,
        caption_justify="left",
    )
    table.add_column("tensor", overflow="fold")
    table.add_column("SQNR", justify="right", no_wrap=True)
    table.add_column("cosine", justify="right", no_wrap=True)
    for index in shown:
        row = rows[index]
        table.add_row(escape(row["tensor"]), _db(row["sqnr_db"]), _cosine(row["cosine"]))
    return table


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f} dB"


def _sort_db(value: float | None) -> float:
    return float("inf") if value is None else value


def _cosine(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"
