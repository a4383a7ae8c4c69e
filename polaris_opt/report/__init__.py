"""Optimization reports: what a command did to a model, as JSON and as one self-contained HTML page.

Every optimizing command (quantize, prune, sparsify, compile) takes `--report FILE.html` and/or
`--report FILE.json`. The JSON document (format version FORMAT_VERSION) holds sizes, parameters,
precision mix and sparsity of both models, fidelity against the input model, one row per layer,
bench rows and quality gates, and the command's own result as is; the HTML renders it with
inline SVG charts and needs nothing else to be seen (no script, no network, no font file).
`polaris-opt report RESULT.json -o report.html` re-renders a saved document.

    check_report_paths(paths, input_path, output_path)  # first thing in a command
    ...
    report = build_report("quantize", input_path, output_path, result)
    write_reports(report, paths)
"""

from __future__ import annotations

from polaris_opt.report.document import FORMAT_VERSION, build_report
from polaris_opt.report.files import (
    check_report_paths,
    load_bench_rows,
    load_report,
    load_sensitivity,
    write_reports,
)
from polaris_opt.report.html import render_html

__all__ = [
    "FORMAT_VERSION",
    "build_report",
    "check_report_paths",
    "load_bench_rows",
    "load_report",
    "load_sensitivity",
    "render_html",
    "write_reports",
]
