"""`polaris-opt report`: render a saved report document again, optionally with bench results merged in.

    polaris-opt quantize m.onnx --int8 --calib c.npz -o q.onnx --report q.json
    polaris-opt bench m.onnx q.onnx --json bench.json
    polaris-opt report q.json -o q.html --bench bench.json
    polaris-opt analyze m.onnx --calib c.npz --json > analyze.json
    polaris-opt report q.json -o q.html --analyze analyze.json

The document is read and checked (polaris_opt.report.load_report), the bench file's result rows
are appended to its "bench" list, an analyze result's per-layer SQNR (the model's, with only that
layer quantized) becomes the sensitivity of the layers of the same name, and the document is
written as HTML or JSON by the suffix of -o.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polaris_opt.cli.options import DebugFlag, JsonFlag, QuietFlag

ReportArg = Annotated[
    Path, typer.Argument(help="A report JSON written by --report FILE.json.", show_default=False)
]
ReportOutputOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Where to write the report: FILE.html or FILE.json.")
]
AnalyzeOpt = Annotated[
    Path | None,
    typer.Option("--analyze", help="Per-layer sensitivity from `polaris-opt analyze --json` output."),
]
BenchOpt = Annotated[
    list[Path] | None,
    typer.Option("--bench", help="Merge the results of `polaris-opt bench --json FILE` (repeatable)."),
]


def report(
    document: ReportArg,
    output: ReportOutputOpt,
    bench: BenchOpt = None,
    analyze: AnalyzeOpt = None,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Render REPORT (a --report JSON) as HTML or JSON, with bench results merged in."""
    from polaris_opt.cli import OUTPUT
    from polaris_opt.report import (
        check_report_paths,
        load_bench_rows,
        load_report,
        load_sensitivity,
        write_reports,
    )

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    loaded = load_report(document)
    check_report_paths(
        [output], Path(loaded["input"]["path"]), Path(loaded["output"]["path"]), option="--output"
    )
    added = [row for path in bench or [] for row in load_bench_rows(path)]
    loaded["bench"] = [*(loaded.get("bench") or []), *added]
    sensitive = _merge_sensitivity(loaded["layers"], load_sensitivity(analyze)) if analyze else 0
    if analyze and not sensitive:
        out.warn(f"--analyze {analyze}: no layer of that result is a layer of this report")
    write_reports(loaded, [output])
    summary = {
        "report": str(document),
        "output": str(output),
        "command": loaded["command"],
        "layers": len(loaded["layers"]),
        "bench_rows": len(loaded["bench"]),
        "bench_rows_added": len(added),
        "sensitivity_layers": sensitive,
    }
    out.result(summary, lambda console: render(console, summary))


def _merge_sensitivity(layers: list[dict], sensitivity: dict[str, float | None]) -> int:
    """Set each layer's sensitivity_db from `sensitivity` by name; how many layers got one."""
    from polaris_opt.report.files import strict

    merged = 0
    for row in layers:
        if row.get("name") in sensitivity:
            row["sensitivity_db"] = strict(sensitivity[row["name"]])
            merged += 1
    return merged


def render(console, summary: dict) -> None:
    from rich.markup import escape

    parts = [f"{summary['layers']} layers"]
    if summary["bench_rows"]:
        parts.append(f"{summary['bench_rows']} bench rows ({summary['bench_rows_added']} added)")
    if summary["sensitivity_layers"]:
        parts.append(f"sensitivity of {summary['sensitivity_layers']} layers")
    console.print(
        f"wrote {escape(summary['output'])}: the {escape(summary['command'])} report of "
        f"{escape(Path(summary['report']).name)}, {', '.join(parts)}"
    )
