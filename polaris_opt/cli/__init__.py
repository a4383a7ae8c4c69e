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
    """Each command under its name, in the order `polaris-opt --help` lists them. The command
    modules import only typer and rich at the top, so this keeps `--help` fast."""
    from polaris_opt.cli import (
        analyze_cmd,
        bench_cmd,
        compile_cmd,
        devices_cmd,
        inspect_cmd,
        lower_cmd,
        passes_cmd,
        prune_cmd,
        quantize_cmd,
        report_cmd,
        run_cmd,
        sparsify_cmd,
        tune_cmd,
    )

    commands = {
        "quantize": quantize_cmd.quantize,
        "compile": compile_cmd.compile,
        "inspect": inspect_cmd.inspect,
        "devices": devices_cmd.devices,
        "passes": passes_cmd.passes,
        "analyze": analyze_cmd.analyze,
        "prune": prune_cmd.prune,
        "lower": lower_cmd.lower,
        "run": run_cmd.run,
        "sparsify": sparsify_cmd.sparsify,
        "tune": tune_cmd.tune,
        "report": report_cmd.report,
        "bench": bench_cmd.bench,
    }
    for name, command in commands.items():
        app.command(name)(command)


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
