"""`polaris-opt sparsify`: sparse weights to ai.polaris ops (or sparse storage for stock ONNX Runtime).

A thin layer over the `sparsify` pass: the options become the pass's, the pipeline runs
(`cleanup` first unless --no-cleanup), the result is saved atomically and reported one row per
layer: the op it became, its format, and the weight's bytes before and after.

Before sparsify, unless --no-merge, `merge-sibling-matmuls` joins MatMuls that read one input
(a transformer's Q, K and V projections) into one, with the same --min-sparsity and --exclude,
so each merged layer is rewritten exactly when each of its parts would have been. It is on by
default because it costs nothing and saves launches. The outputs stay the same (each row of
the sparse product is computed as before: the runtime's outputs were bitwise equal). The
runtime launches one kernel and makes one transfer each way instead of three: on the d_model
1024 encoder of benchmarks/bench_end_to_end.py at batch 1, about 1.06x faster on PoCL
(0.99-1.10x over eight runs), and a GPU, whose kernels are shorter, pays a larger share per
launch. Dense ONNX Runtime runs the merged model as fast as the original (0.99x at batch 1
and 8), so --target onnxruntime loses nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polaris_opt.cli.options import (
    DebugFlag,
    ForceFlag,
    JsonFlag,
    ModelArg,
    OutputOpt,
    QuietFlag,
    ReportOpt,
)

WHAT = "What to rewrite"
HOW = "How to store it"
# Skipped layers named one per line, at most this many (the JSON lists all).
SHOWN_SKIPPED = 8

MinSparsityOpt = Annotated[
    float,
    typer.Option(
        "--min-sparsity",
        rich_help_panel=WHAT,
        help="Rewrite a layer whose weight has at least this share of zeros, in [0, 1].",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        rich_help_panel=WHAT,
        help="Leave this node or weight name alone; fnmatch patterns like '/fc*' (repeatable).",
    ),
]
NoQdqFlag = Annotated[
    bool,
    typer.Option(
        "--no-qdq", rich_help_panel=WHAT, help="Leave QDQ INT8 MatMul/Gemm as they are (no QMatMul/QGemm)."
    ),
]
NoMergeFlag = Annotated[
    bool,
    typer.Option(
        "--no-merge",
        rich_help_panel=WHAT,
        help="Do not merge MatMuls that read one input (Q, K, V projections) into one first.",
    ),
]
NoCleanupFlag = Annotated[
    bool,
    typer.Option(
        "--no-cleanup", rich_help_panel=WHAT, help="Do not run cleanup (constant folding...) first."
    ),
]
TargetOpt = Annotated[
    str,
    typer.Option(
        "--target",
        rich_help_panel=HOW,
        help="polaris: ai.polaris ops for polaris_opt.runtime; onnxruntime: standard ops with the "
        "weights stored sparse (COO), a smaller file stock ONNX Runtime runs.",
    ),
]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        rich_help_panel=HOW,
        help="auto (fewest bytes moved at batch 1 on --profile), csr, bsr or sell.",
    ),
]
Int8Flag = Annotated[
    bool, typer.Option("--int8", rich_help_panel=HOW, help="Store values as int8 with a scale per row.")
]
Fp16Flag = Annotated[bool, typer.Option("--fp16", rich_help_panel=HOW, help="Store values as fp16.")]
ProfileOpt = Annotated[
    str,
    typer.Option(
        "--profile",
        rich_help_panel=HOW,
        help="Device profile the format is chosen for: polaris, vega, rdna, generic-gpu or cpu.",
    ),
]


def sparsify(
    model: ModelArg,
    output: OutputOpt,
    min_sparsity: MinSparsityOpt = 0.5,
    format: FormatOpt = "auto",
    int8: Int8Flag = False,
    fp16: Fp16Flag = False,
    target: TargetOpt = "polaris",
    profile: ProfileOpt = "cpu",
    exclude: ExcludeOpt = None,
    no_qdq: NoQdqFlag = False,
    no_merge: NoMergeFlag = False,
    no_cleanup: NoCleanupFlag = False,
    report_files: ReportOpt = None,
    force: ForceFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Rewrite MODEL's sparse layers into ai.polaris ops (or sparse storage) and report each layer."""
    from polaris_opt.cli import OUTPUT
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.graph_io import check_output_path, load_model, save_model
    from polaris_opt.passes_api import PassContext
    from polaris_opt.pipeline import Pipeline
    from polaris_opt.report import check_report_paths, write_reports
    from polaris_opt.report.commands import sparsify_report

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    check_report_paths(report_files, model, output)
    # Everything the command line says is checked before the model is read.
    text = pipeline_text(min_sparsity, format, _values(int8, fp16), target, profile, exclude or [], no_qdq)
    if not no_merge:
        text = f"{merge_text(min_sparsity, exclude or [])},{text}"
    pipeline = Pipeline.parse(text if no_cleanup else f"cleanup,{text}")
    sparsify_pass = pipeline.passes()[-1][1]
    sparsify_pass.check()
    check_output_path(output, input_path=model, force=force)

    source = load_model(model)
    with out.progress("passes", total=len(pipeline.passes())) as advance:
        result = run_pipeline(
            source, pipeline, ctx=PassContext(model_dir=model.parent), on_pass=lambda _report: advance(1)
        )
    for warning in result.warnings:
        out.warn(warning)
    save_model(result.model, output, pipeline=result.pipeline, input_path=model, force=force)
    report = result.reports[-1]
    summary = {
        "input": str(model),
        "output": str(output),
        "pipeline": result.pipeline,
        "target": sparsify_pass.target.value,
        "profile": sparsify_pass.profile,
        "changed": report.modified,
        "layers": report.details["layers"],
        "skipped": report.details["skipped"],
        "totals": report.stats,
        "input_bytes": model.stat().st_size,
        "output_bytes": output.stat().st_size,
    }
    if report_files:
        with out.progress("measuring fidelity for the report", total=None):
            write_reports(sparsify_report(model, output, summary), report_files)
    out.result(summary, lambda console: render(console, summary))
    for path in report_files or []:
        out.note(f"wrote report {path}")


def _values(int8: bool, fp16: bool) -> str:
    from polaris_opt.errors import BadInput

    if int8 and fp16:
        raise BadInput("give at most one of --int8 and --fp16")
    return "int8" if int8 else "fp16" if fp16 else "fp32"


def pipeline_text(
    min_sparsity: float,
    format: str,
    values: str,
    target: str,
    profile: str,
    exclude: list[str],
    no_qdq: bool,
) -> str:
    """The `sparsify{...}` step for these options, defaults left out, so the saved pipeline is short."""
    from polaris_opt.errors import BadInput

    if any(";" in pattern for pattern in exclude):
        raise BadInput("--exclude: give one pattern per --exclude (';' separates them in pipeline text)")
    given = {
        "min-sparsity": (min_sparsity, 0.5),
        "format": (format, "auto"),
        "values": (values, "fp32"),
        "target": (target, "polaris"),
        "profile": (profile, "cpu"),
        "exclude": (";".join(exclude), ""),
        "qdq": ("false" if no_qdq else "true", "true"),
    }
    options = [f"{name}={value}" for name, (value, default) in given.items() if value != default]
    return "sparsify{" + ",".join(options) + "}" if options else "sparsify"


def merge_text(min_sparsity: float, exclude: list[str]) -> str:
    """The `merge-sibling-matmuls{...}` step that leaves out what sparsify would leave out."""
    options = [f"min-sparsity={min_sparsity}"] + ([f"exclude={';'.join(exclude)}"] if exclude else [])
    return "merge-sibling-matmuls{" + ",".join(options) + "}"


# ------------------------------------------------------------------------------- rendering


def render(console, summary: dict) -> None:
    from rich.markup import escape

    names = f"{escape(Path(summary['input']).name)} → {escape(Path(summary['output']).name)}"
    totals = summary["totals"]
    if summary["layers"]:
        console.print(
            f"{names}: {totals['sparse']} sparse, {totals['quantized']} quantized "
            f"(target {summary['target']}, profile {summary['profile']})"
        )
        console.print(_layer_table(summary["layers"]))
    else:
        console.print(f"{names}: no layer to rewrite; model unchanged")
    skipped = summary["skipped"]
    for row in skipped[:SHOWN_SKIPPED]:
        console.print(f"[dim]skipped[/] {escape(str(row['name']))}: {escape(str(row['reason']))}")
    if len(skipped) > SHOWN_SKIPPED:
        console.print(f"[dim]… and {len(skipped) - SHOWN_SKIPPED} more skipped (--json lists all)[/]")
    console.print(_wrote_line(summary))
    console.print(f"[dim]{escape(summary['pipeline'])}[/]")


def _layer_table(layers: list[dict]):
    """One row per rewritten layer; --json has the bytes of every format and the reason in full."""
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    for name in ("layer", "as", "shape", "format"):
        table.add_column(name, overflow="fold")
    for name in ("sparsity", "before", "after"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in layers:
        sparsity = f"{row['sparsity']:.1%}" if "sparsity" in row else "-"
        table.add_row(
            escape(str(row["layer"])),
            row["as"] + "".join(f"+{op}" for op in row.get("fused", [])),
            "×".join(str(d) for d in row["shape"]),
            f"{row['format']} {row['values']}",
            sparsity,
            _bytes(row["bytes_before"]),
            _bytes(row["bytes_after"]),
        )
    return table


def _wrote_line(summary: dict) -> str:
    from rich.markup import escape

    totals = summary["totals"]
    line = (
        f"wrote {escape(summary['output'])}: {_bytes(summary['output_bytes'])} "
        f"(input {_bytes(summary['input_bytes'])})"
    )
    if totals["bytes_before"]:
        ratio = totals["bytes_after"] / totals["bytes_before"]
        line += f"; rewritten weights {_bytes(totals['bytes_before'])} → {_bytes(totals['bytes_after'])}"
        line += f" ({ratio:.2f}×)"
    return line


def _bytes(count: int) -> str:
    from polaris_opt.cli.inspect_cmd import human_bytes

    return human_bytes(count)
