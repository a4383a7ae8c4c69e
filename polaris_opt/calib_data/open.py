"""open_calibration: what the user gives (a path, 'random', arrays, a reader) as a checked source."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from polaris_opt.calib_data.arrays import ArraySource
from polaris_opt.calib_data.base import CalibrationSource, InputSpec, model_inputs
from polaris_opt.calib_data.batching import Batching, plan_batching
from polaris_opt.calib_data.images import ImageSource, ImageSpec
from polaris_opt.calib_data.numpy_files import numpy_kind
from polaris_opt.calib_data.numpy_sources import FolderSource, NpzSource
from polaris_opt.calib_data.random_source import RandomSource
from polaris_opt.calib_data.readers import ReaderSource
from polaris_opt.errors import BadInput

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"})
NUMPY_SUFFIXES = frozenset({".npy", ".npz"})
IGNORED_IMAGE_OPTIONS = (
    "the image options (--size, --mean, --std, --layout, --bgr) are ignored: the data is not images"
)


def open_calibration(
    spec: Any,
    model: onnx.ModelProto,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    image: ImageSpec | None = None,
    seed: int = 0,
    random_batches: int = 8,
) -> CalibrationSource:
    """The calibration source `spec` describes, checked against `model`'s inputs.

    `spec`: "random"; a path (str or Path) to an .npz or .npy file, a folder of .npy/.npz files
    or a folder of images (preprocessed as `image` says); a dict of input name -> array; or any
    object with `get_next()` (ONNX Runtime's CalibrationDataReader). Batches hold `batch_size`
    samples, the last one fewer, unless the model fixes its batch dimension: then every batch
    has that size and samples that do not fill one are left out (said in `warnings`). `limit`
    caps the number of samples; `seed` and `random_batches` apply to "random" only.
    """
    inputs = model_inputs(model)
    if not inputs:
        raise BadInput("the model has no inputs to feed calibration data to")
    batching = plan_batching(inputs, batch_size, limit)
    if isinstance(spec, str) and spec == "random":
        source: CalibrationSource = RandomSource(inputs, batching, seed=seed, batches=random_batches)
    elif isinstance(spec, (str, os.PathLike)):
        source = open_path(Path(spec), inputs, batching, image or ImageSpec())
    elif isinstance(spec, Mapping):
        source = ArraySource(spec, inputs, batching)
    elif callable(getattr(spec, "get_next", None)):
        source = ReaderSource(spec, inputs, batching)
    else:
        raise BadInput(
            "calibration data must be 'random', a path, a dict of arrays or an object with get_next(); "
            f"got a {type(spec).__name__}"
        )
    if image is not None and not isinstance(source, ImageSource):
        source.warnings.append(IGNORED_IMAGE_OPTIONS)
    return source


def open_path(path: Path, inputs: list[InputSpec], batching: Batching, image: ImageSpec) -> CalibrationSource:
    """An .npz or .npy file (judged by content), or a folder of either kind or of images."""
    where = f"calibration data '{path}'"
    if not path.exists():
        raise BadInput(f"{where} does not exist")
    if path.is_dir():
        return open_folder(path, inputs, batching, image)
    kind = numpy_kind(path, where)
    if kind == "npz":
        return NpzSource(path, inputs, batching)
    if kind == "npy":
        return FolderSource(path.name, [path], inputs, batching)
    raise BadInput(f"{where} is not a NumPy .npz or .npy file; images are given as their folder")


def open_folder(
    folder: Path, inputs: list[InputSpec], batching: Batching, image: ImageSpec
) -> CalibrationSource:
    """NumPy files or images, in file-name order; hidden files (.DS_Store, ._x.png) are skipped."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix.lower() in NUMPY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    label = f"{folder.name}/"
    if arrays and images:
        raise BadInput(
            f"calibration folder '{folder}' holds both NumPy files and images; keep one kind per folder"
        )
    if arrays:
        return FolderSource(label, arrays, inputs, batching)
    if images:
        return ImageSource(label, images, inputs, batching, image)
    raise BadInput(f"calibration folder '{folder}' holds no .npy, .npz or image files")
