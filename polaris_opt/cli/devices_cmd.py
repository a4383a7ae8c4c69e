"""`polaris-opt devices`: the OpenCL devices, the profile each maps to, and whether each runs kernels."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from polaris_opt.cli.options import DebugFlag, DeviceOpt, JsonFlag, QuietFlag

CheckFlag = Annotated[
    bool,
    typer.Option(
        "--check", help="Build and run a small kernel on each device (or --device) to prove it works."
    ),
]

NO_DEVICE = (
    "no OpenCL device found; polaris-opt will run ai.polaris ops on the host with NumPy. "
    "Install pocl-binary-distribution for a CPU OpenCL device"
)


def devices(
    device: DeviceOpt = None,
    check: CheckFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """List OpenCL platforms and devices and the device profile each maps to (and why).

    With --check, each device builds and runs a small kernel; exit code 1 if one fails.
    """
    # Imported here so `polaris-opt --help` never loads pyopencl.
    from polaris_opt.cli import OUTPUT
    from polaris_opt.devices import list_devices, select_device
    from polaris_opt.errors import BadInput, GateFailed

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    found = list_devices()
    if not found:
        # Not an error: the runtime falls back to NumPy on the host.
        out.result(
            {"devices": [], "selected": None, "message": NO_DEVICE}, lambda console: console.print(NO_DEVICE)
        )
        return
    mismatch = None
    try:
        selected = select_device(device, found)
    except BadInput as error:  # still list the devices, so a stale POLARIS_DEVICE can be fixed
        selected, mismatch = None, error
    rows = [
        _row(d, d is selected, _probe(d) if _wants_probe(check, device, d, selected) else None) for d in found
    ]
    out.result(
        {"devices": rows, "selected": selected.index if selected else None}, lambda c: _render(c, rows)
    )
    if mismatch is not None:
        raise mismatch
    failed = [row for row in rows if row["probe"] is not None and not row["probe"]["ok"]]
    if failed:
        names = ", ".join(f"{row['index']}: {row['name']}" for row in failed)
        raise GateFailed(f"device check failed on {names}: {failed[0]['probe']['error']}")


def _wants_probe(check: bool, spec: str | None, device, selected) -> bool:
    # With --device, check only the device it names; otherwise every device.
    return check and (spec is None or device is selected)


def _probe(device) -> dict[str, Any]:
    from dataclasses import asdict

    from polaris_opt.probe import probe_device

    return asdict(probe_device(device))


def _row(device, selected: bool, probe: dict[str, Any] | None) -> dict[str, Any]:
    return {**device.to_dict(), "selected": selected, "probe": probe}


def _render(console: Console, rows: list[dict[str, Any]]) -> None:
    # One key/value block per device: reasons and driver strings are long, and a wide table of
    # eleven columns is unreadable in an 80-column terminal or a CI log.
    platform = None
    for row in rows:
        if row["platform"] != platform:
            platform = row["platform"]
            console.print(f"[bold]platform[/] {escape(platform)}")
        console.print(_device_block(row))
    console.print("[dim]* = the device polaris-opt uses (choose with --device or POLARIS_DEVICE)[/]")


def _device_block(row: dict[str, Any]) -> Table:
    marker = "*" if row["selected"] else " "
    block = Table.grid(padding=(0, 2), pad_edge=True)
    block.add_column(min_width=7)
    block.add_column()
    block.add_row(f"{marker} {row['index']}", f"[bold]{escape(row['name'])}[/] ({row['device_type']})")
    details = [
        ("profile", f"[bold]{row['profile_name']}[/]: {escape(row['reason'])}"),
        ("opencl", f"{escape(row['opencl_c_version'])}, driver {escape(row['driver_version'])}"),
        (
            "compute",
            f"{row['compute_units']} CUs at {row['max_clock_mhz']} MHz, "
            f"work-group ≤ {row['max_work_group_size']}",
        ),
        (
            "memory",
            f"{row['global_mem_bytes'] / 2**30:.1f} GiB global, {row['local_mem_bytes'] // 1024} KiB local",
        ),
    ]
    if row["board_name"]:
        details.insert(0, ("board", escape(row["board_name"])))
    if row["probe"] is not None:
        details.append(("check", _check_cell(row["probe"])))
    for key, value in details:
        block.add_row(f"[dim]{key}[/]", value)
    return block


def _check_cell(probe: dict[str, Any]) -> str:
    if probe["ok"]:
        return f"[green]ok[/] (built in {probe['build_seconds']:.2f} s)"
    return f"[red]failed[/]: {escape(probe['error'] or '')}"
