"""`polaris-opt run`: run a model on the inputs of an .npz file with the runtime shim.

A thin layer over polaris_opt.runtime.Session: ONNX Runtime for standard nodes, OpenCL kernels
or NumPy for ai.polaris nodes. It shows each output's shape and range and each step's place and
time (or --json), and with -o writes the outputs to an .npz file, whole or not at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from polaris_opt.cli.options import DebugFlag, DeviceOpt, JsonFlag, ModelArg, QuietFlag

InputOpt = Annotated[
    Path,
    typer.Option("--input", "-i", help="An .npz file holding one array per model input, by input name."),
]
OutputNpzOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the outputs to this .npz file, by output name.")
]
PlacementOpt = Annotated[
    str,
    typer.Option(
        "--placement", help="Where ai.polaris ops run: auto (cost model) | device (OpenCL) | host (NumPy)."
    ),
]
RunThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads.")]


def run(
    model: ModelArg,
    input: InputOpt,
    output: OutputNpzOpt = None,
    device: DeviceOpt = None,
    placement: PlacementOpt = "auto",
    threads: RunThreadsOpt = 1,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Run MODEL on the arrays in --input; ai.polaris ops run on the OpenCL device or the host."""
    # Imported here so `polaris-opt --help` loads neither onnxruntime nor pyopencl.
    import time

    from polaris_opt.cli import OUTPUT
    from polaris_opt.graph_io import check_output_path, load_model
    from polaris_opt.runtime import Session

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    # Everything the command line says is checked before the model is read.
    if output is not None:
        _check_output(check_output_path(output), model, input)
    feeds = load_feeds(input)
    session = Session(load_model(model), device, threads=threads, placement=placement)
    names = [arg.name for arg in session.get_outputs()]
    trace: list = []
    started = time.perf_counter()
    values = session.run(names, feeds, trace=trace)
    seconds = time.perf_counter() - started
    outputs = dict(zip(names, values, strict=True))
    if output is not None:
        write_npz(output, outputs)
    summary = _summary(model, input, output, session, seconds, outputs, trace)
    out.result(summary, lambda console: _render(console, summary))


def load_feeds(path: Path) -> dict:
    """The arrays of an .npz file, by name; no pickles (the file may come from a stranger)."""
    from polaris_opt.bench.feeds import load_npz

    return load_npz(path)


def write_npz(path: Path, arrays: dict) -> None:
    """The .npz written whole or not at all: a temporary file beside `path`, then a rename."""
    import numpy as np

    from polaris_opt.errors import BadInput

    parent = path.parent if str(path.parent) else Path(".")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", delete=False) as handle:
            try:
                np.savez(handle, **arrays)
            except BaseException:
                os.unlink(handle.name)
                raise
        os.replace(handle.name, path)
    except OSError as exc:
        raise BadInput(f"--output {path}: cannot write ({exc.strerror or exc})") from None


def _check_output(output: Path, model: Path, input: Path) -> None:
    from polaris_opt.errors import BadInput

    for given, what in ((model, "model"), (input, "input")):
        if output.exists() and given.exists() and output.resolve() == given.resolve():
            raise BadInput(f"--output {output}: is the {what} file; give another file name")


def _summary(model, input, output, session, seconds: float, outputs: dict, trace: list) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "model": str(model),
        "input": str(input),
        "output": str(output) if output is not None else None,
        "device": session.device_name,
        "placement": session.placement,
        "seconds": seconds,
        "outputs": [_described(name, value) for name, value in outputs.items()],
        "steps": [asdict(record) for record in trace],
    }


def _described(name: str, value) -> dict[str, Any]:
    import numpy as np

    row: dict[str, Any] = {"name": name, "shape": list(value.shape), "dtype": str(value.dtype)}
    if value.size and value.dtype.kind in "biuf":
        row |= {"min": float(np.min(value)), "max": float(np.max(value)), "mean": float(np.mean(value))}
    return row


def _render(console: Console, summary: dict[str, Any]) -> None:
    polaris_steps = any(record["op_type"] != "onnxruntime" for record in summary["steps"])
    device = summary["device"] or ("none: ai.polaris ops on the host" if polaris_steps else "not needed")
    took = f"{summary['seconds'] * 1e3:.2f} ms"
    # The first line stays the same from run to run and machine to machine; time and device follow.
    steps = len(summary["steps"])
    console.print(f"[bold]ran {escape(summary['model'])}[/]: {steps} step{'s' if steps != 1 else ''}")
    console.print(f"device {escape(device)} · {took}")
    console.print(_outputs_table(summary["outputs"]))
    console.print(_steps_table(summary["steps"]))
    if summary["output"]:
        console.print(f"outputs written to {escape(summary['output'])}")


STATS = ("min", "max", "mean")


def _outputs_table(rows: list[dict[str, Any]]) -> Table:
    table = _table(
        "Outputs", [("name", "left"), ("shape", "left"), ("dtype", "left")] + [(s, "right") for s in STATS]
    )
    for row in rows:
        stats = [f"{row[stat]:.4g}" if stat in row else "-" for stat in STATS]
        table.add_row(escape(row["name"]), str(row["shape"]), row["dtype"], *stats)
    return table


def _steps_table(records: list[dict[str, Any]]) -> Table:
    table = _table("Steps", [("step", "left"), ("op", "left"), ("where", "left"), ("ms", "right")])
    for record in records:
        ms = f"{record['seconds'] * 1e3:.3f}"
        table.add_row(escape(record["name"]), record["op_type"], record["placement"], ms)
    return table


def _table(title: str, columns: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in columns:
        table.add_column(name, justify=justify)
    return table
