"""`polaris-opt tune`: time the SparseMatMul kernels' tile shapes on a device and cache the fastest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from polaris_opt.cli.options import DebugFlag, DeviceOpt, JsonFlag, QuietFlag

QuickFlag = Annotated[
    bool, typer.Option("--quick", help="Tune csr with fp32 values and K ≤ 256 only, with fewer timed runs.")
]
TuneCacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="The polaris-opt cache folder (results go to its tune/ folder); "
        "default $XDG_CACHE_HOME/polaris-opt. The runtime reads only the default folder.",
    ),
]


def tune(
    device: DeviceOpt = None,
    quick: QuickFlag = False,
    cache_dir: TuneCacheOpt = None,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Try tile shapes of each sparse kernel on the device and cache the fastest correct one.

    The cache is keyed by device, driver, kernel and shape class (batch and K); SparseMatMul and
    SparseConv launchers use it when present.
    """
    # Imported here so `polaris-opt --help` never loads pyopencl.
    from polaris_opt import tuning
    from polaris_opt.cli import OUTPUT
    from polaris_opt.errors import BadInput

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    env = tuning.open_tuning_env(device)
    if env is None:
        raise BadInput("no OpenCL device to tune; see `polaris-opt devices`")
    results = tuning.tune(env, quick=quick, progress=out.progress)
    path = tuning.cache_file(env.device.name, env.device.driver_version, cache_dir)
    tuning.save_results(path, env.device.name, env.device.driver_version, results)
    rows = [_row(result) for result in results]
    data = {
        "device": env.device.name,
        "driver": env.device.driver_version,
        "profile": env.profile.name,
        "cache_file": str(path),
        "results": rows,
    }
    out.result(data, lambda console: _render(console, data))
    failed = [row["key"] for row in rows if row["best"] is None]
    if failed:
        out.warn(f"no candidate matched the reference for {', '.join(failed)}: nothing cached for them")


def _row(result) -> dict[str, Any]:
    from polaris_opt.tuning import speedup

    gain = speedup(result)
    return {**result.to_dict(), "speedup": None if math.isnan(gain) else round(gain, 3)}


def _render(console: Console, data: dict[str, Any]) -> None:
    console.print(f"[bold]{data['device']}[/] (driver {data['driver']}, profile {data['profile']})")
    table = Table()
    for column in ("kernel", "batch", "K", "chosen", "ms", "default", "gain"):
        table.add_column(
            column, justify="right" if column in ("ms", "default", "gain") else "left", no_wrap=True
        )
    for row in data["results"]:
        chosen = _defines_text(row["best"])
        table.add_row(
            row["kernel"].split("/", 1)[1],  # the profile is in the heading
            row["batch"],
            row["bucket"],
            chosen,
            _ms(row["best_ms"]),
            _ms(row["default_ms"]),
            f"{row['speedup']:.2f}×" if row["speedup"] else "-",
        )
    console.print(table)
    console.print("[dim]ms: the chosen candidate's fastest run; default: the launcher's own choice[/]")
    console.print(f"[dim]cached in {data['cache_file']}[/]")


def _defines_text(defines: dict[str, str] | None) -> str:
    if defines is None:
        return "[red]none correct[/]"
    return " ".join(f"{name}={value}" for name, value in defines.items()) or "default"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
