"""The calibration-data options shared by `quantize`, `analyze` and `compile`, declared once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

# Help-panel title that groups these options in `--help`.
CALIBRATION = "Calibration data"

CalibOpt = Annotated[
    str | None,
    typer.Option(
        "--calib",
        rich_help_panel=CALIBRATION,
        help="Calibration data: an .npz (input name → batch), a folder of .npy/.npz or images, or 'random'.",
    ),
]
BatchSizeOpt = Annotated[
    int,
    typer.Option("--batch-size", rich_help_panel=CALIBRATION, min=1, help="Samples per calibration batch."),
]
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", rich_help_panel=CALIBRATION, min=1, help="Use at most this many samples."),
]
SizeOpt = Annotated[
    str | None,
    typer.Option("--size", rich_help_panel=CALIBRATION, help="Images: resize to HxW, e.g. 224x224."),
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean", rich_help_panel=CALIBRATION, help="Images: per-channel mean, e.g. 0.485,0.456,0.406."
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option(
        "--std", rich_help_panel=CALIBRATION, help="Images: per-channel std, e.g. 0.229,0.224,0.225."
    ),
]
LayoutOpt = Annotated[
    str, typer.Option("--layout", rich_help_panel=CALIBRATION, help="Images: nchw or nhwc.")
]
BgrOpt = Annotated[
    bool, typer.Option("--bgr/--rgb", rich_help_panel=CALIBRATION, help="Images: channel order.")
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        rich_help_panel=CALIBRATION,
        help="Cache calibration statistics (and compile's gate outputs) here; default: the user cache.",
    ),
]
NoCacheFlag = Annotated[
    bool,
    typer.Option("--no-cache", rich_help_panel=CALIBRATION, help="Neither read nor write cached statistics."),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="ONNX Runtime threads for calibration.")]


def image_spec(size: str | None, mean: str | None, std: str | None, layout: str, bgr: bool):
    """The ImageSpec the image options describe; None when none was given (the defaults apply)."""
    from polaris_opt.calib_data import ImageSpec
    from polaris_opt.errors import BadInput

    if layout not in ("nchw", "nhwc"):
        raise BadInput(f"--layout must be nchw or nhwc; got '{layout}'")
    if size is None and mean is None and std is None and layout == "nchw" and not bgr:
        return None
    given = {}
    if size is not None:
        given["size"] = _size(size)
    if mean is not None:
        given["mean"] = _floats("--mean", mean)
    if std is not None:
        given["std"] = _floats("--std", std)
        if any(value == 0.0 for value in given["std"]):
            raise BadInput(f"--std {std}: a standard deviation of 0 would divide by zero")
    return ImageSpec(layout=layout, bgr=bgr, **given)


def _size(text: str) -> tuple[int, int]:
    from polaris_opt.errors import BadInput

    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise BadInput(f"--size must be HxW or one number, e.g. 224x224; got '{text}'") from None
    if height <= 0 or width <= 0:
        raise BadInput(f"--size must be positive; got '{text}'")
    return height, width


def _floats(option: str, text: str) -> tuple[float, ...]:
    from polaris_opt.errors import BadInput

    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise BadInput(f"{option} must be comma-separated numbers, e.g. 0.5,0.5,0.5; got '{text}'") from None


def cache_folder(cache_dir: Path | None, no_cache: bool) -> Path | None:
    """Where statistics are cached: --cache-dir, else $XDG_CACHE_HOME/polaris-opt or ~/.cache/polaris-opt."""
    if no_cache:
        return None
    if cache_dir is not None:
        return cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "polaris-opt"
