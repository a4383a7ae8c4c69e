"""One output object for every command: honours --json, --quiet and --debug.

Results go to stdout (a Rich rendering, or JSON with --json); progress, notes and errors go to
stderr, so `polaris-opt inspect m.onnx --json | jq` always sees clean JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console


@dataclass
class Output:
    json: bool = False
    quiet: bool = False
    debug: bool = False
    console: Console = field(default_factory=lambda: Console(highlight=False))
    err_console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    def merged(self, *, json: bool = False, quiet: bool = False, debug: bool = False) -> Output:
        """The global flags combined with a command's own copies of them."""
        self.json, self.quiet, self.debug = self.json or json, self.quiet or quiet, self.debug or debug
        return self

    def result(self, data: dict[str, Any], render: Callable[[Console], None]) -> None:
        """The command's result: JSON on stdout with --json, else `render`, unless --quiet."""
        if self.json:
            print(json.dumps(data, indent=2, default=_jsonable))
        elif not self.quiet:
            render(self.console)

    def note(self, message: str) -> None:
        """A remark for the user (stderr), silenced by --quiet and --json."""
        if not (self.quiet or self.json):
            self.err_console.print(message)

    def warn(self, message: str) -> None:
        """A warning (stderr); shown even with --json, since it may change how a result is read."""
        if not self.quiet:
            self.err_console.print(f"[yellow]warning:[/] {message}")

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A progress bar on stderr; yields `advance(n)`. Hidden with --quiet/--json."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # Not on a terminal (CI logs, pipes) a bar would only leave blank lines behind.
        disabled = self.quiet or self.json or not self.err_console.is_terminal
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.err_console, disable=disabled, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
