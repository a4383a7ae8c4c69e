"""`polaris-opt tune`: time each kernel's work-group sizes and tile shapes on a device; cache the fastest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from polaris_opt.cli.options import DebugFlag, DeviceOpt, JsonFlag, QuietFlag

COLUMNS = ("kernel", "batch", "K", "tile", "group", "ms", "default", "gain")
NUMBERS = ("group", "ms", "default", "gain")  # right-aligned, never wrapped

QuickFlag = Annotated[
    bool,
    typer.Option(
        "--quick",
        help="Tune K ≤ 256 only (sparse kernels: csr with fp32 values), with the work-group sizes "
        "next to the default and fewer timed runs.",
    ),
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
    """Try work-group sizes and tile shapes of each kernel on the device and cache the fastest correct one.

    Kernels: SparseMatMul/SparseConv (per format and value type), QMatMul/QGemm and MatMulInt4.

    Cached per device, driver, kernel and shape class (batch, K); the runtime's launchers use it if present.
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
        "default_local_size": env.local_size,
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
    for column in COLUMNS:
        number = column in NUMBERS
        table.add_column(column, justify="right" if number else "left", no_wrap=number)
    for row in data["results"]:
        table.add_row(
            row["kernel"].split("/", 1)[1],  # the profile is in the heading
            row["batch"],
            row["bucket"],
            _tile_text(row["best"]),
            "-" if row["local_size"] is None else str(row["local_size"]),
            _ms(row["best_ms"]),
            _ms(row["default_ms"]),
            f"{row['speedup']:.2f}×" if row["speedup"] else "-",
        )
    console.print(table)
    console.print(
        f"[dim]tile: the chosen tile defines; group: its work-group size (profile default "
        f"{data['default_local_size']}); ms: the lower quartile of its timed runs; default: the same "
        "for the launcher's own choice[/]"
    )
    console.print(f"[dim]cached in {data['cache_file']}[/]")


def _tile_text(defines: dict[str, str] | None) -> str:
    if defines is None:
        return "[red]none correct[/]"
    tile = {name: value for name, value in defines.items() if name != "LOCAL_SIZE"}
    return " ".join(f"{name}={value}" for name, value in tile.items()) or "default"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
