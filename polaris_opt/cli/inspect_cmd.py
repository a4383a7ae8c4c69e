"""`polaris-opt inspect`: what a model holds, as Rich tables or --json (polaris_opt.inspect)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from polaris_opt.cli.options import DebugFlag, JsonFlag, ModelArg, QuietFlag

TopOpt = Annotated[
    int, typer.Option("--top", min=0, help="How many initializers to list, largest first (0 = all).")
]
SparsityFlag = Annotated[
    bool,
    typer.Option(
        "--sparsity",
        help="List only the layer weights that hold zeros, sparsest first, with the pattern they form.",
    ),
]


def inspect(
    model: ModelArg,
    top: TopOpt = 20,
    sparsity: SparsityFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Show a model's opsets, inputs and outputs, op counts, parameters and largest initializers."""
    # Imported here so `polaris-opt --help` does not pay for onnx and numpy.
    from polaris_opt.cli import OUTPUT
    from polaris_opt.graph_io import load_model
    from polaris_opt.inspect import summarize

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    summary = summarize(load_model(model), path=model)
    view = render_sparsity if sparsity else render
    out.result(summary, lambda console: view(console, summary, top))


def render(console: Console, summary: dict[str, Any], top: int) -> None:
    console.print(_header(summary))
    console.print(_io_table(summary))
    console.print(_ops_table(summary))
    console.print(_dtype_table(summary["parameters"]))
    console.print(_initializer_table(summary["initializers"], top))


def _header(summary: dict[str, Any]) -> str:
    info, params = summary["model"], summary["parameters"]
    opsets = ", ".join(f"{domain} {version}" for domain, version in info["opsets"].items())
    size = f" ({human_bytes(summary['file_bytes'])})" if summary["file_bytes"] is not None else ""
    in_subgraphs = f" (+{summary['subgraph_nodes']} in sub-graphs)" if summary["subgraph_nodes"] else ""
    lines = [
        f"[bold]{escape(summary['file'] or info['graph_name'])}[/]{size}",
        f"IR {info['ir_version']} · opsets {escape(opsets)} · producer {escape(info['producer'] or '-')}",
        f"{summary['nodes']} nodes{in_subgraphs} · "
        f"{human_count(params['elements'])} parameters, {human_bytes(params['bytes'])}",
    ]
    weights = summary["weight_sparsity"]
    if weights["tensors"]:
        lines.append(
            f"layer weights: {weights['tensors']} tensors, {weights['elements']:,} elements, "
            f"{weights['sparsity']:.1%} zeros"
        )
    lines += [f"[dim]{escape(key)}[/] = {escape(value)}" for key, value in info["metadata_props"].items()]
    return "\n".join(lines)


def _io_table(summary: dict[str, Any]) -> Table:
    table = _table(
        "Inputs and outputs", [("", "left"), ("name", "left"), ("dtype", "left"), ("shape", "left")]
    )
    for kind in ("inputs", "outputs"):
        for value in summary[kind]:
            _add_row(table, kind[:-1], value["name"], value["dtype"], _shape(value["shape"]))
    return table


def _ops_table(summary: dict[str, Any]) -> Table:
    # A "where" column only when there are sub-graphs: their nodes run per iteration/branch,
    # so they are counted apart from the main graph's.
    nested = summary["subgraph_ops"]
    columns = [("op", "left"), ("count", "right")] + ([("where", "left")] if nested else [])
    table = _table("Operators", columns)
    for where, ops in [("graph", summary["ops"]), ("sub-graph", nested)]:
        for op, count in ops.items():
            _add_row(table, op, count, *([where] if nested else []))
    return table


def _dtype_table(params: dict[str, Any]) -> Table:
    constants = params["in_constant_nodes"]["tensors"]
    caption = f"{constants} of these tensors live in Constant nodes" if constants else None
    columns = [("dtype", "left"), ("tensors", "right"), ("elements", "right"), ("bytes", "right")]
    table = _table("Parameters by dtype", columns, caption)
    for dtype, entry in params["by_dtype"].items():
        _add_row(table, dtype, entry["tensors"], f"{entry['elements']:,}", human_bytes(entry["bytes"]))
    table.add_row(
        "total", str(params["tensors"]), f"{params['elements']:,}", human_bytes(params["bytes"]), style="bold"
    )
    return table


_SOURCE_LABELS = {"initializer": "init", "sparse_initializer": "sparse", "constant": "Constant"}


def _initializer_table(rows: list[dict[str, Any]], top: int) -> Table:
    shown = rows if top == 0 else rows[:top]
    hidden = len(rows) - len(shown)
    caption = f"… and {hidden} smaller (--top 0 lists all)" if hidden else None
    columns = [
        ("name", "left"),
        ("shape", "left"),
        ("dtype", "left"),
        ("elements", "right"),
        ("bytes", "right"),
    ]
    table = _table("Initializers, largest first", columns + [("zeros", "right"), ("kind", "left")], caption)
    for row in shown:
        zeros = "-" if row["sparsity"] is None else f"{row['sparsity']:.1%}"
        kind = _SOURCE_LABELS[row["source"]] + (" in sub-graph" if row["in_subgraph"] else "")
        shape, size = _shape(row["shape"]), human_bytes(row["bytes"])
        _add_row(table, row["name"], shape, row["dtype"], f"{row['elements']:,}", size, zeros, kind)
    return table


def render_sparsity(console: Console, summary: dict[str, Any], top: int) -> None:
    """`--sparsity`: the header, then only the layer weights with zeros, sparsest first."""
    console.print(_header(summary))
    rows = sorted(
        (row for row in summary["initializers"] if row["prunable"] and row["sparsity"]),
        key=lambda row: (-row["sparsity"], row["name"]),
    )
    shown = rows if top == 0 else rows[:top]
    hidden = len(rows) - len(shown)
    caption = f"… and {hidden} less sparse (--top 0 lists all)" if hidden else None
    if not rows:
        console.print("no layer weight holds zeros")
        return
    columns = [
        ("name", "left"),
        ("shape", "left"),
        ("elements", "right"),
        ("zeros", "right"),
        ("pattern", "left"),
    ]
    table = _table("Layer weights with zeros, sparsest first", columns, caption)
    for row in shown:
        zeros = f"{row['sparsity']:.1%}"
        _add_row(table, row["name"], _shape(row["shape"]), f"{row['elements']:,}", zeros, row["pattern"])
    console.print(table)


def _table(title: str, columns: list[tuple[str, str]], caption: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for index, (name, justify) in enumerate(columns):
        # The first column (a name) folds when the terminal is narrow; the others stay on one line.
        table.add_column(name, justify=justify, overflow="fold", no_wrap=index > 0)
    return table


def _add_row(table: Table, *cells: Any) -> None:
    # Names come from the model file: escape them, or "[batch]" would be read as Rich markup.
    table.add_row(*(escape(str(cell)) for cell in cells))


def _shape(shape: list[int | str] | None) -> str:
    return "unknown rank" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def human_bytes(count: int) -> str:
    """1536 → "1.5 KiB": binary units, as file managers and `ls -h` show them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(count: int) -> str:
    """1_234_567 → "1.23M"."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)
