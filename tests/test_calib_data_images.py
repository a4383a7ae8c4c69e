"""Calibration data from folders of images: preprocessing checked against NumPy by hand, resizing
against a bilinear reference, and every spec that cannot fit the model refused."""

from __future__ import annotations

import numpy as np
import pytest
from test_calib_data import collect, model, sizes, two_pngs, write_png

from polaris_opt.calib_data import ImageSource, ImageSpec, open_calibration
from polaris_opt.errors import BadInput

# --- images --------------------------------------------------------------------------------


def by_hand(pixels: np.ndarray, mean, std, bgr: bool, layout: str) -> np.ndarray:
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if bgr:
        x = x[:, :, ::-1]
    return x.transpose(2, 0, 1) if layout == "nchw" else x


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bgr", [False, True])
def test_images_are_preprocessed_like_numpy_by_hand(tmp_path, layout, bgr):
    images = two_pngs(tmp_path)
    declared = "float[N, 3, 4, 5] x" if layout == "nchw" else "float[N, 4, 5, 3] x"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = ImageSpec(mean=mean, std=std, layout=layout, bgr=bgr)
    source = open_calibration(tmp_path, model(declared, outputs=declared.replace(" x", " y")), image=spec)
    assert isinstance(source, ImageSource)
    (batch,) = collect(source)
    expected = np.stack([by_hand(p, mean, std, bgr, layout) for p in images])
    assert batch["x"].dtype == np.float32
    np.testing.assert_allclose(batch["x"], expected, rtol=1e-6, atol=1e-6)


def bilinear_half_pixel(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and clamped edges, what Pillow does when enlarging."""

    def axis_weights(size_in, size_out):
        src = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, src - low

    x = pixels.astype(np.float64)
    low, high, t = axis_weights(x.shape[0], height)
    x = x[low] * (1 - t)[:, None, None] + x[high] * t[:, None, None]
    low, high, t = axis_weights(x.shape[1], width)
    return x[:, low] * (1 - t)[None, :, None] + x[:, high] * t[None, :, None]


def test_images_are_resized_bilinear_to_the_models_size(tmp_path):
    # Multiples of 16 keep every bilinear weight product an integer, so Pillow's uint8 rounding is exact.
    pixels = np.random.default_rng(1).integers(0, 16, (2, 2, 3)) * 16
    write_png(tmp_path / "small.png", pixels)
    declared = "float[N, 3, 4, 4] x"
    (batch,) = collect(open_calibration(tmp_path, model(declared, outputs="float[N, 3, 4, 4] y")))
    expected = bilinear_half_pixel(pixels, 4, 4).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(batch["x"][0], expected, rtol=0, atol=1e-6)


def test_image_size_option_for_a_model_without_fixed_size(tmp_path):
    two_pngs(tmp_path)
    dynamic = model("float[N, 3, H, W] x", outputs="float[N, 3, H, W] y")
    with pytest.raises(
        BadInput, match=r"does not fix the image height and width; give the size \(--size HxW\)"
    ):
        open_calibration(tmp_path, dynamic)
    (batch,) = collect(open_calibration(tmp_path, dynamic, image=ImageSpec(size=(8, 10))))
    assert batch["x"].shape == (2, 3, 8, 10)


def test_grayscale_model_takes_luma(tmp_path):
    pixels = np.array([[[200, 100, 50], [16, 16, 16]], [[0, 255, 0], [255, 255, 255]]], dtype=np.uint8)
    write_png(tmp_path / "a.png", pixels)
    gray = model("float[N, 1, 2, 2] x", outputs="float[N, 1, 2, 2] y")
    (batch,) = collect(open_calibration(tmp_path, gray, image=ImageSpec(mean=(0.5,), std=(0.25,))))
    luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = (luma / 255.0 - 0.5) / 0.25
    assert batch["x"].shape == (1, 1, 2, 2)
    np.testing.assert_allclose(batch["x"][0, 0], expected, atol=1.0 / 255 / 0.25)
    # Gray pixels convert exactly.
    np.testing.assert_allclose(batch["x"][0, 0, 0, 1], (16 / 255 - 0.5) / 0.25, atol=1e-6)


def test_images_in_batches_with_limit(tmp_path):
    for i in range(5):
        write_png(tmp_path / f"{i}.jpg", np.full((4, 4, 3), 40 * i))
    source = open_calibration(
        tmp_path, model("float[N, 3, 4, 4] x", outputs="float[N, 3, 4, 4] y"), batch_size=2, limit=3
    )
    assert (source.num_batches, source.num_samples) == (2, 3)
    assert sizes(source) == [2, 1]


@pytest.mark.parametrize(
    ("declared", "spec", "message"),
    [
        ("float[N, 3, 4, 5] x, float[N, 2] z", ImageSpec(), r"one input; this one has 2 \(x, z\)"),
        ("float[N, 20] x", ImageSpec(), "images need a 4-D input"),
        ("float[N, 5, 4, 5] x", ImageSpec(), "5 channels at axis 1"),
        ("uint8[N, 3, 4, 5] x", ImageSpec(), "images feed float inputs only"),
        ("float[N, 3, 4, 5] x", ImageSpec(size=(8, 8)), "images resized to 8x8 do not fit"),
        ("float[N, 3, 4, 5] x", ImageSpec(mean=(0.5, 0.5)), "the image mean has 2 values for 3 channels"),
    ],
)
def test_image_folders_that_cannot_fit_the_model(tmp_path, declared, spec, message):
    two_pngs(tmp_path)
    with pytest.raises(BadInput, match=message):
        open_calibration(tmp_path, model(declared, outputs="float[N] y"), image=spec)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"layout": "chw"}, "nchw or nhwc"), ({"std": (0.0,)}, "no std of 0"), ({"size": (0, 4)}, "positive")],
)
def test_bad_image_spec(fields, message):
    with pytest.raises(BadInput, match=message):
        ImageSpec(**fields)


def test_image_spec_from_recipe_lists_equals_tuples():
    assert ImageSpec(size=[4, 5], mean=[0.5], std=[0.5]) == ImageSpec(size=(4, 5), mean=(0.5,), std=(0.5,))


def test_undecodable_image_names_the_file(tmp_path):
    two_pngs(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    source = open_calibration(tmp_path, model("float[N, 3, 4, 5] x", outputs="float[N] y"))
    with pytest.raises(BadInput, match=r"calibration image '.*broken.png' cannot be decoded"):
        collect(source)
