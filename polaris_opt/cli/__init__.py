"""The `polaris-opt` command line: a Typer app whose commands are thin wrappers over the library.

Each command module imports its heavy dependencies inside the command body, so
`polaris-opt --help` starts without onnxruntime or pyopencl.
"""

from __future__ import annotations

import logging
import sys

import typer

from polaris_opt import __version__
from polaris_opt.cli.options import DebugFlag, JsonFlag, QuietFlag
from polaris_opt.cli.output import Output

app = typer.Typer(
    name="polaris-opt",
    help="An optimizing compiler for ONNX models: clean-up, quantization, pruning, sparse rewrite.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# The process-wide output settings from the global flags; commands merge in their own flags.
OUTPUT = Output()


def _print_version(value: bool) -> None:
    if value:
        print(f"polaris-opt {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """An optimizing compiler for ONNX models: clean-up, quantization, pruning, sparse rewrite."""
    # Reset, not merge: an in-process caller (tests, scripts) may run several commands.
    OUTPUT.json, OUTPUT.quiet, OUTPUT.debug = json, quiet, debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


def _register_commands() -> None:
    from polaris_opt.cli import (
        analyze_cmd,
        compile_cmd,
        devices_cmd,
        inspect_cmd,
        passes_cmd,
        prune_cmd,
        quantize_cmd,
    )

    app.command("quantize")(quantize_cmd.quantize)
    app.command("compile")(compile_cmd.compile)
    app.command("inspect")(inspect_cmd.inspect)
    app.command("devices")(devices_cmd.devices)
    app.command("passes")(passes_cmd.passes)
    app.command("analyze")(analyze_cmd.analyze)
    app.command("prune")(prune_cmd.prune)
    from polaris_opt.cli import lower_cmd

    app.command("lower")(lower_cmd.lower)
    from polaris_opt.cli import run_cmd

    app.command("run")(run_cmd.run)
    from polaris_opt.cli import sparsify_cmd

    app.command("sparsify")(sparsify_cmd.sparsify)
    from polaris_opt.cli import tune_cmd

    app.command("tune")(tune_cmd.tune)
    from polaris_opt.cli import report_cmd

    app.command("report")(report_cmd.report)
    from polaris_opt.cli import bench_cmd

    app.command("bench")(bench_cmd.bench)


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning any error into one line and an exit code (DESIGN §9)."""
    from polaris_opt.errors import PolarisError

    try:
        app(args=argv, prog_name="polaris-opt", standalone_mode=True)
    except SystemExit as done:
        return _exit_code(done.code)
    except PolarisError as error:
        _report(error, str(error), error.exit_code)
        return error.exit_code
    except KeyboardInterrupt:
        print("polaris-opt: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, exit 3
        _report(error, f"internal error: {type(error).__name__}: {error} (re-run with --debug)", 3)
        return 3
    return 0


def _report(error: BaseException, line: str, code: int) -> None:
    if OUTPUT.debug or "--debug" in sys.argv:
        import traceback

        traceback.print_exception(error)
    print(f"polaris-opt: error: {line}", file=sys.stderr)


def _exit_code(code) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
