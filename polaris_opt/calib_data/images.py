"""Folders of images as calibration data: how each image is decoded and preprocessed (ImageSpec),
resolved against the model's input (ImagePlan), and the source that streams them (ImageSource)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polaris_opt.calib_data.base import Batch, InputSpec, input_names
from polaris_opt.calib_data.batching import Batching
from polaris_opt.calib_data.rows import RowSource, hash_files
from polaris_opt.errors import BadInput

LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class ImageSpec:
    """How a folder of images becomes model input. Each image goes through, in this order:

    1. decode with Pillow (the first frame);
    2. convert to RGB, or to grayscale (Pillow mode L: ITU-R 601-2 luma) when the model input
       has 1 channel, so grayscale files feed RGB models and colour files feed grayscale ones;
    3. resize with bilinear filtering to (width, height): `size` = (height, width), or, when
       `size` is None, the height and width the model input declares;
    4. convert to float32 and divide by 255, so values lie in [0, 1];
    5. subtract `mean` and divide by `std`, per channel, listed in RGB order (a single value
       applies to every channel);
    6. reverse the channels to BGR when `bgr`;
    7. lay out as channels, height, width for "nchw" or height, width, channels for "nhwc".

    The batch dimension comes first; values are cast to the model input's float dtype.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "nchw"
    bgr: bool = False

    def __post_init__(self):
        # Recipes (JSON/YAML) give lists: keep tuples so specs compare and hash alike.
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.layout not in LAYOUTS:
            raise BadInput(f"image layout must be nchw or nhwc; got '{self.layout}'")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise BadInput(f"image size must be two positive numbers (height, width); got {self.size}")
        if not self.mean or not self.std or 0.0 in self.std:
            raise BadInput(
                f"image mean and std need a value per channel and no std of 0; got {self.mean}, {self.std}"
            )


@dataclass(frozen=True)
class ImagePlan:
    """An ImageSpec resolved against one model input: the exact array each image becomes."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str
    bgr: bool
    dtype: np.dtype


def plan_image(spec: ImageSpec, target: InputSpec) -> ImagePlan:
    """Resolve `spec` against the input; refuse sizes, channels or dtypes that cannot fit it."""
    where = f"calibration images for input '{target.name}' ({target.describe()})"
    if target.shape is None or len(target.shape) != 4:
        raise BadInput(f"{where}: images need a 4-D input, N C H W (nchw) or N H W C (nhwc)")
    if target.dtype.kind != "f":
        raise BadInput(f"{where}: images feed float inputs only; give .npz data instead")
    channel_axis, spatial = (1, (2, 3)) if spec.layout == "nchw" else (3, (1, 2))
    channels = target.shape[channel_axis] or 3  # a dynamic channel dim takes RGB
    if channels not in (1, 3):
        raise BadInput(
            f"{where}: {channels} channels at axis {channel_axis} ({spec.layout}); images give 1 or 3"
        )
    height, width = _image_size(spec, tuple(target.shape[axis] for axis in spatial), where)
    mean = _per_channel("mean", spec.mean, channels, where)
    std = _per_channel("std", spec.std, channels, where)
    return ImagePlan(height, width, channels, mean, std, spec.layout, spec.bgr, target.dtype)


def _image_size(spec: ImageSpec, declared: tuple[int | None, ...], where: str) -> tuple[int, int]:
    """The (height, width) images are resized to: the spec's size, else the model's; they must agree."""
    if spec.size is None and None in declared:
        raise BadInput(
            f"{where}: the model does not fix the image height and width; give the size (--size HxW)"
        )
    height, width = spec.size or declared
    if any(d is not None and d != given for d, given in zip(declared, (height, width), strict=True)):
        raise BadInput(
            f"{where}: images resized to {height}x{width} do not fit; leave the size out or match it"
        )
    return height, width


def _per_channel(name: str, values: tuple[float, ...], channels: int, where: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise BadInput(f"{where}: the image {name} has {len(values)} values for {channels} channels")
    return values


def preprocess_image(image: Any, plan: ImagePlan) -> np.ndarray:
    """One PIL image as one sample (no batch dim), following ImageSpec's steps in order."""
    from PIL import Image

    image = image.convert("L" if plan.channels == 1 else "RGB")
    if image.size != (plan.width, plan.height):
        image = image.resize((plan.width, plan.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = pixels.reshape(plan.height, plan.width, plan.channels)  # mode L has no channel axis
    pixels = (pixels - np.float32(plan.mean)) / np.float32(plan.std)
    if plan.bgr:
        pixels = pixels[:, :, ::-1]
    if plan.layout == "nchw":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=plan.dtype)


def load_image(path: Path, plan: ImagePlan) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return preprocess_image(image, plan)
    except (OSError, Image.DecompressionBombError) as exc:
        raise BadInput(f"calibration image '{path}' cannot be decoded: {exc}") from None


class ImageSource(RowSource):
    """Sorted image files of a folder for a one-input model, decoded as the batches are made."""

    def __init__(
        self, label: str, paths: list[Path], inputs: list[InputSpec], batching: Batching, spec: ImageSpec
    ):
        where = f"calibration images '{label}'"
        if len(inputs) != 1:
            raise BadInput(
                f"{where} can feed a model with one input; this one has {len(inputs)} ({input_names(inputs)})"
            )
        self.paths = paths
        self.target = inputs[0]
        self.plan = plan_image(spec, self.target)
        super().__init__(inputs, batching, where, label, len(paths))

    def _open_chunks(self) -> Iterator[Batch]:
        return ({self.target.name: load_image(path, self.plan)[None]} for path in self.paths)

    def _settings(self) -> str:
        return f"{super()._settings()};{self.plan}"

    def _hash_content(self, digest: Any) -> None:
        hash_files(digest, self.paths, with_names=True)
