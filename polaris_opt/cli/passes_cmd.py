"""`polaris-opt passes`: the passes and aliases a pipeline may name, with their options."""

from __future__ import annotations

from polaris_opt.cli.options import JsonFlag, QuietFlag


def passes(json: JsonFlag = False, quiet: QuietFlag = False) -> None:
    """List the passes and aliases usable in --pipeline, with their options and defaults."""
    from polaris_opt.cli import OUTPUT
    from polaris_opt.passes import ALIASES, PASSES, load_pass

    out = OUTPUT.merged(json=json, quiet=quiet)
    rows = []
    for name in PASSES:
        pass_class = load_pass(name)
        options = [option.describe() for option in pass_class.options()]
        rows.append({"name": name, "summary": pass_class.summary(), "options": options})
    aliases = [{"name": name, "expands_to": text} for name, text in ALIASES.items()]
    out.result({"passes": rows, "aliases": aliases}, lambda console: _render(console, rows, aliases))


def _render(console, rows: list[dict], aliases: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="passes", title_justify="left")
    for column in ("name", "what it does", "options"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["summary"], "\n".join(row["options"]) or "—")
    for alias in aliases:
        table.add_row(alias["name"], f"alias: {alias['expands_to']}", "—")
    console.print(table)
