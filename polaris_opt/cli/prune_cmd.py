"""`polaris-opt prune`: unstructured, N:M, block or structured pruning, over polaris_opt.prune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polaris_opt.cli.calib_options import (
    BatchSizeOpt,
    BgrOpt,
    CacheDirOpt,
    CalibOpt,
    LayoutOpt,
    LimitOpt,
    MeanOpt,
    NoCacheFlag,
    SizeOpt,
    StdOpt,
    ThreadsOpt,
)
from polaris_opt.cli.options import (
    DebugFlag,
    ForceFlag,
    JsonFlag,
    ModelArg,
    OutputOpt,
    QuietFlag,
    ReportOpt,
)

# Help panels, so `prune --help` reads by topic.
WHAT = "What to prune"
STRUCTURED = "Structured pruning (physically smaller layers)"
RESULT = "Correction and results"
# Skipped layers named one per line, at most this many (the JSON lists all).
SHOWN_SKIPPED = 8

SparsityOpt = Annotated[
    float | None,
    typer.Option(
        "--sparsity",
        rich_help_panel=WHAT,
        help="Fraction of weights (or channels) to remove, in [0, 1) (default 0.5; N:M fixes its own).",
        show_default=False,
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        rich_help_panel=WHAT,
        help="magnitude (|W|), wanda (|W|·‖X‖, needs --calib) or sparsegpt (OBS updates, needs --calib).",
    ),
]
ScopeOpt = Annotated[
    str,
    typer.Option(
        "--scope",
        rich_help_panel=WHAT,
        help="local: every layer at --sparsity; global: one threshold across layers.",
    ),
]
MaxLayerOpt = Annotated[
    float,
    typer.Option(
        "--max-layer-sparsity",
        rich_help_panel=WHAT,
        help="--scope global: no layer pruned beyond this fraction.",
    ),
]
PatternOpt = Annotated[
    str,
    typer.Option(
        "--pattern",
        rich_help_panel=WHAT,
        help="unstructured, N:M (2:4, 4:8: keep N of every M weights along a row) or block:RxC "
        "(block:4x4). A row or column count that is not a multiple of M or of the block is padded "
        "with zeros that count as pruned.",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        rich_help_panel=WHAT,
        help="Keep this node or weight name dense; fnmatch patterns like '/fc*' (repeatable).",
    ),
]
SkipEndsFlag = Annotated[
    bool,
    typer.Option(
        "--skip-first-last", rich_help_panel=WHAT, help="Keep the first and the last prunable layer dense."
    ),
]
OneShotFlag = Annotated[
    bool,
    typer.Option(
        "--one-shot",
        rich_help_panel=WHAT,
        help="sparsegpt: take every layer's statistics from the dense model in one pass, instead "
        "of layer by layer from the model pruned so far (the default).",
    ),
]
StructuredOpt = Annotated[
    str | None,
    typer.Option(
        "--structured",
        rich_help_panel=STRUCTURED,
        help="Remove whole output channels (channel, filter) or attention heads (head).",
        show_default=False,
    ),
]
ImportanceOpt = Annotated[
    str,
    typer.Option(
        "--importance",
        rich_help_panel=STRUCTURED,
        help="l1 or l2 norm of a channel's weights, or taylor: the energy its activations carry into "
        "the next layers on --calib data.",
    ),
]
CorrectFlag = Annotated[
    bool,
    typer.Option(
        "--correct",
        rich_help_panel=RESULT,
        help="Re-fit biases and BatchNorm statistics so each pruned layer's output mean matches the "
        "dense model's on --calib data.",
    ),
]
EvalOpt = Annotated[
    Path | None,
    typer.Option(
        "--eval",
        rich_help_panel=RESULT,
        help="Labelled data (.npz: the model's inputs + 'labels'): top-1 accuracy before and after.",
    ),
]
NoCleanupFlag = Annotated[
    bool,
    typer.Option(
        "--no-cleanup",
        rich_help_panel=RESULT,
        help="Do not run cleanup first (constant folding, BatchNorm folding...).",
    ),
]


def prune(
    model: ModelArg,
    output: OutputOpt,
    sparsity: SparsityOpt = None,
    method: MethodOpt = "magnitude",
    scope: ScopeOpt = "local",
    max_layer_sparsity: MaxLayerOpt = 0.99,
    pattern: PatternOpt = "unstructured",
    exclude: ExcludeOpt = None,
    skip_first_last: SkipEndsFlag = False,
    one_shot: OneShotFlag = False,
    structured: StructuredOpt = None,
    importance: ImportanceOpt = "l2",
    correct: CorrectFlag = False,
    eval_data: EvalOpt = None,
    report: ReportOpt = None,
    no_cleanup: NoCleanupFlag = False,
    calib: CalibOpt = None,
    batch_size: BatchSizeOpt = 16,
    limit: LimitOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = "nchw",
    bgr: BgrOpt = False,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheFlag = False,
    threads: ThreadsOpt = 1,
    force: ForceFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Prune MODEL's weights (unstructured, N:M, blocks) or whole channels and heads, and report the cost."""
    from polaris_opt.cli import OUTPUT
    from polaris_opt.cli.calib_options import cache_folder, image_spec
    from polaris_opt.graph_io import check_output_path
    from polaris_opt.pruning.api import PruneOptions
    from polaris_opt.pruning.api import prune as run_prune
    from polaris_opt.report import check_report_paths, write_reports
    from polaris_opt.report.commands import prune_report

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    check_report_paths(report, model, output)
    options = PruneOptions(
        sparsity=sparsity,
        method=method,
        scope=scope,
        pattern=pattern,
        max_layer_sparsity=max_layer_sparsity,
        exclude=tuple(exclude or ()),
        skip_first_last=skip_first_last,
        sequential=not one_shot,
        structured=structured,
        importance=importance,
        correct=correct,
        cleanup=not no_cleanup,
    )
    # Everything the command line says is checked before the model is read.
    options.check(has_calibration=calib is not None)
    image = image_spec(size, mean, std, layout, bgr)
    check_output_path(output, input_path=model, force=force)
    result = run_prune(
        model,
        output,
        calib=calib,
        options=options,
        eval_data=eval_data,
        batch_size=batch_size,
        limit=limit,
        image=image,
        cache_dir=cache_folder(cache_dir, no_cache),
        threads=threads,
        force=force,
        progress=out.progress,
    )
    for warning in result.warnings:
        out.warn(warning)
    summary = {"input": str(model), "output": str(output), **result.report, "warnings": result.warnings}
    summary["input_bytes"], summary["output_bytes"] = model.stat().st_size, output.stat().st_size
    summary["size_ratio"] = summary["output_bytes"] / max(summary["input_bytes"], 1)
    if report:
        calib_options = {"batch_size": batch_size, "limit": limit, "image": image}
        document = prune_report(
            model, output, summary, calib=calib, calib_options=calib_options, threads=threads
        )
        write_reports(document, report)
    out.result(summary, lambda console: render(console, summary))
    for path in report or []:
        out.note(f"wrote report {path}")


# ------------------------------------------------------------------------------- rendering


def render(console, summary: dict) -> None:
    from rich.markup import escape

    from polaris_opt.cli.quantize_cmd import _fidelity_line

    names = f"{escape(Path(summary['input']).name)} → {escape(Path(summary['output']).name)}"
    if not summary["changed"]:
        console.print(f"{_nothing_pruned(summary)}: model unchanged")
    else:
        console.print(f"{names}: {_what(summary)}")
        if summary.get("groups"):
            console.print(_groups_table(summary["groups"]))
        if summary["layers"]:
            console.print(_layer_table(summary["layers"], structured=summary["kind"] != "unstructured"))
    for row in summary.get("correction", []):
        console.print(_correction_line(row))
    skipped = summary["skipped"]
    for row in skipped[:SHOWN_SKIPPED]:
        console.print(f"[dim]skipped[/] {escape(str(row['name']))}: {escape(str(row['reason']))}")
    if len(skipped) > SHOWN_SKIPPED:
        console.print(f"[dim]… and {len(skipped) - SHOWN_SKIPPED} more skipped (--json lists all)[/]")
    if summary["changed"]:
        console.print(_fidelity_line(summary))
    console.print(_wrote_line(summary))
    console.print(f"[dim]{escape(summary['pipeline'])}[/]")


def _nothing_pruned(summary: dict) -> str:
    kind = summary["kind"]
    return "no prunable layer" if kind in (None, "unstructured") else f"no safe {kind} group"


def _what(summary: dict) -> str:
    totals = summary["totals"]
    if summary["kind"] == "unstructured":
        patterns = sorted({str(row.get("pattern")) for row in summary["layers"]})
        methods = sorted({str(row.get("method")) for row in summary["layers"]})
        return (
            f"{totals['layers']} layers pruned to {totals['sparsity_after']:.1%} "
            f"({', '.join(methods)}, {', '.join(patterns)})"
        )
    groups = len(summary.get("groups", []))
    before, after = totals["model_params_before"], totals["model_params_after"]
    return (
        f"{groups} {summary['kind']} groups pruned, parameters {_count(before)} → {_count(after)} "
        f"({after / max(before, 1):.2f}×)"
    )


def _layer_table(layers: list[dict], structured: bool):
    """One row per pruned layer, narrow enough for 80 columns; --json has every figure."""
    from rich.table import Table

    # Pattern and method are in the first line; a column only when layers differ (a fallback).
    varying = [key for key in ("pattern", "method") if len({str(row.get(key)) for row in layers}) > 1]
    varying = [] if structured else varying
    numbers = ("params", "SQNR") if structured else ("params", "sparsity", "CSR", "SQNR")
    table = Table()
    for name in ("layer", "op", *varying, "shape"):
        table.add_column(name, overflow="fold")
    for name in numbers:
        table.add_column(name, justify="right", no_wrap=True)
    for row in layers:
        table.add_row(*_layer_cells(row, varying, structured))
    return table


def _layer_cells(row: dict, varying: list[str], structured: bool) -> list[str]:
    from rich.markup import escape

    cells = [escape(str(row["layer"])), row["op"], *(escape(str(row.get(key))) for key in varying)]
    cells.append(_shape(row["shape_after"]))
    sqnr = describe_sqnr(row.get("sqnr_db"))
    if structured:  # the weight is physically smaller: its parameters before and after
        return cells + [f"{_count(row['params_before'])} → {_count(row['params_after'])}", sqnr]
    sparsity = f"{row['sparsity_before']:.0%} → {row['sparsity_after']:.1%}"
    return cells + [_count(row["params_after"]), sparsity, _bytes(row["csr_bytes"]), sqnr]


def _groups_table(groups: list[dict]):
    from rich.markup import escape
    from rich.table import Table

    unit = "heads" if any("heads_before" in g for g in groups) else "channels"
    table = Table()
    table.add_column("group", overflow="fold")
    table.add_column(unit, justify="right")
    table.add_column("params", justify="right")
    for group in groups:
        before = group.get(f"{unit}_before", "?")
        after = group.get(f"{unit}_after", "?")
        params = f"{_count(group.get('params_before', 0))} → {_count(group.get('params_after', 0))}"
        table.add_row(escape(str(group.get("group"))), f"{before} → {after}", params)
    return table


def _correction_line(row: dict) -> str:
    """What --correct did to one layer: its output SQNR on the calibration data before and after."""
    from rich.markup import escape

    layer = escape(str(row.get("layer")))
    if row.get("reason"):
        return f"[dim]not corrected[/] {layer}: {escape(str(row['reason']))}"
    return (
        f"[dim]corrected[/] {layer} ({escape(str(row.get('refit')))}): output SQNR "
        f"{describe_sqnr(row.get('sqnr_before_db'))} → {describe_sqnr(row.get('sqnr_after_db'))}"
    )


def _wrote_line(summary: dict) -> str:
    from rich.markup import escape

    line = (
        f"wrote {escape(summary['output'])}: {summary['output_bytes'] / 1e6:.3f} MB "
        f"({summary['size_ratio']:.2f}× the input's {summary['input_bytes'] / 1e6:.3f} MB)"
    )
    totals = summary["totals"]
    if summary["changed"] and summary["kind"] == "unstructured" and totals["bytes_after"]:
        # Unstructured zeros do not shrink a dense file; say what sparse storage would.
        ratio = totals["csr_bytes"] / totals["bytes_after"]
        line += f"\nas CSR the pruned weights would take {_bytes(totals['csr_bytes'])} ({ratio:.2f}× dense)"
    return line


def describe_sqnr(value: float | None) -> str:
    """A layer's SQNR for the table: "31.2 dB", "exact" when nothing changed, "-" when not measured."""
    if value is None:
        return "-"
    if value == float("inf"):
        return "exact"
    return f"{value:.1f} dB"


def _shape(shape: list[int]) -> str:
    return "×".join(str(d) for d in shape)


def _count(count: int) -> str:
    from polaris_opt.cli.inspect_cmd import human_count

    return human_count(count)


def _bytes(count: int) -> str:
    from polaris_opt.cli.inspect_cmd import human_bytes

    return human_bytes(count)
