"""A report document rendered as one self-contained HTML page.

Everything is inline: the style sheet, the charts (inline SVG from polaris_opt.report.svg), the
tables. No script, font, image or style sheet is fetched, so the page opens offline, in a mail
attachment or a CI artefact viewer, and prints (the colours are kept when printing). Every
string that comes from a model or a command line is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

from polaris_opt.report.svg import BEHIND_COLOUR, MAX_BARS, Bar, bar_chart

SQNR_COLOUR = "#1f5fa8"
SPARSITY_COLOUR = "#c2571a"
BYTES_COLOUR = "#2e7d32"
SENSITIVITY_COLOUR = "#b2182b"
LATENCY_COLOUR = "#6a3d9a"
PARAMETERS_COLOUR = "#1f5fa8"
# Per-layer SQNR bars take the colour of the layer's precision, so the chart shows both.
PRECISION_COLOURS = {
    "int8": "#1f5fa8",
    "uint8": "#1f5fa8",
    "int4": "#6a3d9a",
    "float16": "#b8860b",
    "float": "#5b7f6e",
    "float32": "#5b7f6e",
}
OTHER_PRECISION_COLOUR = "#666666"
CHART_COLOURS = (
    SQNR_COLOUR,
    SPARSITY_COLOUR,
    BYTES_COLOUR,
    SENSITIVITY_COLOUR,
    LATENCY_COLOUR,
    *PRECISION_COLOURS.values(),
    OTHER_PRECISION_COLOUR,
)
LAYER_SQNR_MEANING = (
    "A layer's SQNR compares its output tensor in the output model with the tensor of the same name "
    "in the input model, on the fidelity data: the error accumulated up to that layer, not the "
    "layer's own error alone. Layers without a tensor of the same name in both models have none."
)
STYLE = """
body { font-family: sans-serif; font-size: 14px; color: #111; margin: 24px; max-width: 1000px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { max-width: 360px; overflow-wrap: anywhere; }
.pass { color: #1b5e20; font-weight: bold; } .fail { color: #b71c1c; font-weight: bold; }
.caption, .note { color: #444; font-size: 12px; }
svg.chart { display: block; margin: 12px 0; }
* { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
"""


def render_html(report: dict) -> str:
    """The page for `report` (a document from build_report or load_report)."""
    title = f"polaris-opt {report['command']}: {_name(report['input'])} → {_name(report['output'])}"
    sections = [
        f"<h1>{_esc(title)}</h1>",
        _summary(report),
        _gates(report.get("gates") or []),
        _charts(report),
        _layer_table(report.get("layers") or []),
        _bench_table(report.get("bench") or []),
        _footer(report),
    ]
    body = "\n".join(section for section in sections if section)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------- summary


def _summary(report: dict) -> str:
    source, target = report["input"], report["output"]
    rows = [
        ("file", _esc(source["path"]), _esc(target["path"]), ""),
        ("size", _bytes(source["bytes"]), _bytes(target["bytes"]), f"{_ratio(report.get('size_ratio'))}"),
        ("parameters", _count(source["parameters"]), _count(target["parameters"]), _change(source, target)),
        ("precision", _mix(source["precision"]), _mix(target["precision"]), ""),
        ("sparsity", _percent(source["sparsity"]), _percent(target["sparsity"]), ""),
    ]
    table = ["<table>", "<tr><th></th><th>input</th><th>output</th><th>output / input</th></tr>"]
    table += [f'<tr><th>{h}</th><td>{a}</td><td>{b}</td><td class="num">{c}</td></tr>' for h, a, b, c in rows]
    table.append("</table>")
    return "<h2>Summary</h2>\n" + "\n".join(table) + "\n" + _fidelity(report.get("fidelity"))


def _change(source: dict, target: dict) -> str:
    return _ratio(target["parameters"] / source["parameters"]) if source["parameters"] else ""


def _mix(precision: dict[str, int]) -> str:
    total = sum(precision.values())
    if not total:
        return "-"
    return ", ".join(f"{_esc(kind)} {_share(count / total)}" for kind, count in precision.items() if count)


def _share(fraction: float) -> str:
    """A share of the parameters; scales and zero points are a sliver, not "0.0%"."""
    return "<0.1%" if fraction < 0.001 else f"{fraction:.1%}"


def _fidelity(fidelity: dict | None) -> str:
    if fidelity is None:
        return '<p class="note">Fidelity: not measured by this command.</p>'
    cells = [
        ("SQNR", _model_sqnr(fidelity)),
        ("cosine", _fixed(fidelity.get("cosine"), 5)),
        ("top-1 agreement", _percent(fidelity.get("top1_agreement"))),
        ("top-1 accuracy", _accuracy(fidelity)),
        ("samples", _esc(fidelity.get("samples") if fidelity.get("samples") is not None else "-")),
    ]
    header = "".join(f"<th>{name}</th>" for name, _ in cells)
    values = "".join(f'<td class="num">{value}</td>' for _, value in cells)
    data = f" on {_esc(fidelity['data'])}" if fidelity.get("data") else ""
    return (
        f"<p>Fidelity of the output model against the input model{data}:</p>\n"
        f"<table><tr>{header}</tr><tr>{values}</tr></table>"
    )


def _model_sqnr(fidelity: dict) -> str:
    """JSON has no infinity: an SQNR of null beside a measured cosine was +inf, no error at all."""
    if fidelity.get("sqnr_db") is None and _finite(fidelity.get("cosine")):
        return "exact"
    return _db(fidelity.get("sqnr_db"))


def _accuracy(fidelity: dict) -> str:
    after, before = fidelity.get("top1_accuracy"), fidelity.get("top1_accuracy_reference")
    if after is None:
        return "-"
    if before is None:
        return _percent(after)
    return f"{_percent(before)} → {_percent(after)}"


def _gates(gates: list[dict]) -> str:
    if not gates:
        return ""
    rows = ["<h2>Checks</h2>", "<table>", '<tr><th>check</th><th class="num">value</th><th>result</th></tr>']
    for gate in gates:
        verdict = '<span class="pass">pass</span>' if gate.get("passed") else '<span class="fail">FAIL</span>'
        value = gate.get("value")
        shown = _fixed(value, 4) if isinstance(value, (int, float)) else "-"
        rows.append(
            f'<tr><td>{_esc(gate.get("check", ""))}</td><td class="num">{shown}</td><td>{verdict}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------ charts


def _charts(report: dict) -> str:
    layers = report.get("layers") or []
    charts = [
        _parameters_chart(report["input"]["precision"], report["output"]["precision"]),
        _sqnr_chart(layers),
        _sparsity_chart(layers),
        _bytes_chart(layers),
        _sensitivity_chart(layers),
        _latency_chart(report.get("bench") or []),
    ]
    return "<h2>Charts</h2>\n" + "\n".join(chart for chart in charts if chart)


def _parameters_chart(before: dict[str, int], after: dict[str, int]) -> str:
    kinds = list(dict.fromkeys([*after, *before]))
    bars = [
        Bar(
            kind,
            after.get(kind, 0),
            f"{_count(before.get(kind, 0))} → {_count(after.get(kind, 0))}",
            PARAMETERS_COLOUR,
            behind=before.get(kind, 0),
        )
        for kind in kinds
    ]
    legend = [(BEHIND_COLOUR, "input model"), (PARAMETERS_COLOUR, "output model")]
    return bar_chart("Parameters by stored type", bars, unit="parameters", legend=legend)


def _sqnr_chart(layers: list[dict]) -> str:
    measured = [row for row in layers if _finite(row.get("sqnr_db"))]
    if not measured:
        return ""
    shown, caption = _chosen(measured, key=lambda row: row["sqnr_db"], lowest=True, what="the lowest SQNR")
    bars = [
        Bar(
            row["name"],
            row["sqnr_db"],
            _db(row["sqnr_db"]),
            _precision_colour(row.get("precision")),
            tooltip=f"{_db(row['sqnr_db'])}, {row.get('op', '')}, {row.get('precision') or 'precision n/a'}",
        )
        for row in shown
    ]
    precisions = dict.fromkeys(str(row["precision"]) for row in shown if row.get("precision"))
    legend = [(_precision_colour(p), p) for p in precisions]
    return bar_chart(
        "Per-layer SQNR against the input model", bars, unit="dB", legend=legend, caption=caption
    )


def _sparsity_chart(layers: list[dict]) -> str:
    measured = [row for row in layers if _finite(row.get("sparsity"))]
    if not measured or not any(row["sparsity"] for row in measured):
        return ""
    shown, caption = _chosen(measured, key=lambda row: row["sparsity"], lowest=False, what="the most zeros")
    bars = [
        Bar(row["name"], 100 * row["sparsity"], _percent(row["sparsity"]), SPARSITY_COLOUR) for row in shown
    ]
    return bar_chart("Per-layer weight sparsity", bars, unit="% of weights zero", caption=caption)


def _bytes_chart(layers: list[dict]) -> str:
    measured = [row for row in layers if _finite(row.get("bytes_after"))]
    if not measured:
        return ""
    shown, caption = _chosen(
        measured, key=lambda row: row.get("bytes_before") or 0, lowest=False, what="the largest weights"
    )
    bars = [
        Bar(
            row["name"],
            row["bytes_after"] / 1024,
            _bytes_change(row),
            BYTES_COLOUR,
            behind=(row.get("bytes_before") or 0) / 1024,
            tooltip=f"{_bytes_change(row)}; {row.get('note', '')}",
        )
        for row in shown
    ]
    legend = [(BEHIND_COLOUR, "weight before"), (BYTES_COLOUR, "weight after (format in the table)")]
    return bar_chart("Per-layer weight bytes", bars, unit="KiB", legend=legend, caption=caption)


def _sensitivity_chart(layers: list[dict]) -> str:
    measured = [row for row in layers if _finite(row.get("sensitivity_db"))]
    if not measured:
        return ""
    shown, caption = _chosen(
        measured,
        key=lambda row: row["sensitivity_db"],
        lowest=True,
        what="the lowest SQNR when quantized alone",
    )
    bars = [
        Bar(row["name"], row["sensitivity_db"], _db(row["sensitivity_db"]), SENSITIVITY_COLOUR)
        for row in shown
    ]
    return bar_chart(
        "Per-layer sensitivity (model SQNR with only this layer quantized)", bars, unit="dB", caption=caption
    )


def _latency_chart(bench: list[dict]) -> str:
    if not bench:
        return ""
    bars = [
        Bar(
            f"{_name({'path': row['model']})} · {row['runtime']} · batch {row['batch']}",
            row["p50_ms"],
            f"{row['p50_ms']:.3g} ms ({_ratio(row.get('speedup'))} speed-up)",
            LATENCY_COLOUR,
            behind=row.get("p90_ms"),
            tooltip=f"p50 {row['p50_ms']:.3g} ms, p90 {row['p90_ms']:.3g} ms, p99 {row['p99_ms']:.3g} ms",
        )
        for row in bench[:MAX_BARS]
    ]
    legend = [(LATENCY_COLOUR, "p50 latency"), (BEHIND_COLOUR, "p90 latency")]
    return bar_chart("Latency (lower is better)", bars, unit="ms", legend=legend)


def _chosen(rows: list[dict], *, key: Callable[[dict], float], lowest: bool, what: str) -> tuple[list, str]:
    """All rows when they fit; else the MAX_BARS with the most telling `key`, in model order."""
    if len(rows) <= MAX_BARS:
        return rows, ""
    ranked = sorted(range(len(rows)), key=lambda i: key(rows[i]), reverse=not lowest)[:MAX_BARS]
    kept = [rows[i] for i in sorted(ranked)]
    return kept, f"The {MAX_BARS} of {len(rows)} layers with {what}, in model order; the table lists all."


def _precision_colour(precision: Any) -> str:
    """Bars of layers without a precision (pruning keeps it) in the plain SQNR colour."""
    if precision is None:
        return SQNR_COLOUR
    return PRECISION_COLOURS.get(str(precision), OTHER_PRECISION_COLOUR)


# ------------------------------------------------------------------------------------ tables


def _layer_table(layers: list[dict]) -> str:
    if not layers:
        return '<h2>Layers</h2>\n<p class="note">The command reported no layer.</p>'
    with_bytes = any(row.get("bytes_after") is not None for row in layers)
    head = (
        ["layer", "op", "precision", "sparsity", "SQNR", "sensitivity"]
        + (["bytes"] if with_bytes else [])
        + ["note"]
    )
    numeric = {"sparsity", "SQNR", "sensitivity", "bytes"}
    rows = ["<h2>Layers</h2>", "<table>", "<tr>" + "".join(_th(h, h in numeric) for h in head) + "</tr>"]
    for row in layers:
        cells = [
            f'<td class="name">{_esc(row.get("name", ""))}</td>',
            f"<td>{_esc(row.get('op', ''))}</td>",
            f"<td>{_esc(row.get('precision') or '-')}</td>",
            f'<td class="num">{_percent(row.get("sparsity"))}</td>',
            f'<td class="num">{_db(row.get("sqnr_db"))}</td>',
            f'<td class="num">{_db(row.get("sensitivity_db"))}</td>',
        ]
        if with_bytes:
            cells.append(f'<td class="num">{_bytes_change(row)}</td>')
        cells.append(f"<td>{_esc(row.get('note') or '')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    rows.append(f'<p class="note">{_esc(LAYER_SQNR_MEANING)}</p>')
    return "\n".join(rows)


def _bench_table(bench: list[dict]) -> str:
    if not bench:
        return ""
    head = (
        "model",
        "runtime",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "throughput /s",
        "peak RSS MB",
        "file",
        "speed-up",
        "size ratio",
    )
    rows = [
        "<h2>Benchmark</h2>",
        "<table>",
        "<tr>" + "".join(_th(h, i >= 2) for i, h in enumerate(head)) + "</tr>",
    ]
    for row in bench:
        cells = [
            f'<td class="name">{_esc(row["model"])}</td>',
            f"<td>{_esc(row['runtime'])}</td>",
            *(
                f'<td class="num">{value}</td>'
                for value in (
                    _esc(row["batch"]),
                    _fixed(row["p50_ms"], 3),
                    _fixed(row["p90_ms"], 3),
                    _fixed(row["p99_ms"], 3),
                    _fixed(row["throughput"], 1),
                    _fixed(row["peak_rss_mb"], 1),
                    _bytes(row["file_bytes"]),
                    _ratio(row["speedup"]),
                    _ratio(row["size_ratio"]),
                )
            ),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _footer(report: dict) -> str:
    from polaris_opt import __version__

    result = report.get("result") or {}
    pipeline = result.get("pipeline") if isinstance(result, dict) else None
    lines = [
        f"Written by polaris-opt {_esc(__version__)}, report format {_esc(report['polaris_opt_report'])}."
    ]
    if pipeline:
        lines.insert(0, f"Pipeline: <code>{_esc(pipeline)}</code>")
    return "<h2>About</h2>\n" + "\n".join(f'<p class="note">{line}</p>' for line in lines)


def _th(text: str, numeric: bool) -> str:
    return f'<th class="num">{_esc(text)}</th>' if numeric else f"<th>{_esc(text)}</th>"


# -------------------------------------------------------------------------------- formatting


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name(model: dict) -> str:
    return str(model["path"]).replace("\\", "/").rsplit("/", 1)[-1]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _db(value: Any) -> str:
    return f"{value:.1f} dB" if _finite(value) else "-"


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if _finite(value) else "-"


def _fixed(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "-"


def _ratio(value: Any) -> str:
    return f"{value:.2f}×" if _finite(value) else "-"


def _count(count: Any) -> str:
    if not _finite(count):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(int(count))


def _bytes(count: Any) -> str:
    if not _finite(count):
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def _bytes_change(row: dict) -> str:
    before, after = row.get("bytes_before"), row.get("bytes_after")
    if not _finite(after):
        return "-"
    return f"{_bytes(before)} → {_bytes(after)}" if _finite(before) else _bytes(after)
