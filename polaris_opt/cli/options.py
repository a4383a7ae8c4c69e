"""Options shared by several commands, declared once as Annotated aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
DebugFlag = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logging.")]
ModelArg = Annotated[Path, typer.Argument(help="An ONNX model file.", show_default=False)]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.")]
ForceFlag = Annotated[bool, typer.Option("--force", help="Allow the output to overwrite the input model.")]
# Read from POLARIS_DEVICE here, in the CLI layer only: the library takes the spec as an argument.
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", envvar="POLARIS_DEVICE", help="OpenCL device: an index or a name substring."),
]
# Shared by every optimizing command (quantize, prune, sparsify, compile): polaris_opt.report.
ReportOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--report", help="Write a report: FILE.html (self-contained, charts) and/or FILE.json; repeatable."
    ),
]
