"""Calibration data, the parts every source shares: model inputs, checks against them, array
sources, opening what the user gives, random data and fingerprints. The helpers here (tiny models,
row data, collecting batches, writing PNGs) are shared by the other test_calib_data_* files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from polaris_opt.calib_data import (
    RANDOM_WARNING,
    ImageSpec,
    InputSpec,
    RandomSource,
    model_inputs,
    open_calibration,
)
from polaris_opt.errors import BadInput

MODELS = Path(__file__).resolve().parents[1] / "models"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def model(inputs: str, body: str = "y = Relu(x)", outputs: str = "float[N, 4] y") -> onnx.ModelProto:
    return onnx.parser.parse_model(f"{HEADER} g ({inputs}) => ({outputs}) {{ {body} }}")


DYNAMIC = model("float[N, 4] x")
STATIC = model("float[4, 4] x", outputs="float[4, 4] y")
TWO_INPUTS = model("float[N, 4] x, int64[N, 2] ids")


def rows(count: int, width: int = 4, start: int = 0) -> np.ndarray:
    return np.arange(start * width, (start + count) * width, dtype=np.float32).reshape(count, width)


def collect(source) -> list[dict[str, np.ndarray]]:
    return [{name: array.copy() for name, array in batch.items()} for batch in source.batches()]


def sizes(source, name: str = "x") -> list[int]:
    return [len(batch[name]) for batch in source.batches()]


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def two_pngs(folder: Path) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (4, 5, 3)).astype(np.uint8) for _ in range(2)]
    for i, pixels in enumerate(images):
        write_png(folder / f"img{i}.png", pixels)
    return images


# --- model inputs --------------------------------------------------------------------------


def test_model_inputs_skip_initializers_and_read_dims():
    m = onnx.parser.parse_model(f"""{HEADER}
      g (float[batch, 3] x, int64[2, seq] ids, float[3] bias) => (float[batch, 3] y)
        <float[3] bias = {{1.0, 2.0, 3.0}}> {{ y = Add(x, bias) }}""")
    assert [i.name for i in m.graph.input] == ["x", "ids", "bias"]
    assert model_inputs(m) == [
        InputSpec("x", (None, 3), np.dtype(np.float32)),
        InputSpec("ids", (2, None), np.dtype(np.int64)),
    ]
    assert model_inputs(m)[0].describe() == "float32 [batch, 3]"
    assert model_inputs(m)[1].describe() == "int64 [2, ?]"


def test_zoo_inputs():
    assert model_inputs(onnx.load(MODELS / "digits_cnn.onnx")) == [
        InputSpec("input", (None, 1, 8, 8), np.dtype(np.float32))
    ]


@pytest.mark.parametrize(("options", "message"), [({"batch_size": 0}, "batch size"), ({"limit": 0}, "limit")])
def test_bad_batch_size_or_limit(options, message):
    with pytest.raises(BadInput, match=message):
        open_calibration({"x": rows(4)}, DYNAMIC, **options)


# --- checks against the model's inputs -----------------------------------------------------


CNN = model("float[N, 1, 8, 8] input", outputs="float[N, 1, 8, 8] y", body="y = Relu(input)")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"input": np.zeros((450, 64))},
            "calibration data: input 'input' expects float32 [batch, 1, 8, 8], got float64 (450, 64); "
            "convert it with .astype(np.float32)",
        ),
        (
            {"input": np.zeros((2, 1, 8, 8), np.float64)},
            "calibration data: input 'input' expects float32 [batch, 1, 8, 8], got float64 (2, 1, 8, 8); "
            "convert it with .astype(np.float32)",
        ),
        (
            {"input": np.zeros((2, 8, 8), np.float32)},
            "calibration data: input 'input' expects float32 [batch, 1, 8, 8], got float32 (2, 8, 8)",
        ),
        (
            {"input": np.zeros((2, 3, 8, 8), np.float32)},
            "calibration data: input 'input' expects float32 [batch, 1, 8, 8], got float32 (2, 3, 8, 8)",
        ),
        (
            {"x": np.zeros((2, 1, 8, 8), np.float32)},
            "calibration data has 'x' but the model's inputs are: input",
        ),
        ({}, "calibration data has no data for the model's input 'input' (it holds nothing)"),
    ],
)
def test_mismatches_name_the_input_what_was_expected_and_given(arrays, message):
    with pytest.raises(BadInput) as error:
        open_calibration(arrays, CNN)
    assert str(error.value) == message


def test_missing_input_of_two():
    with pytest.raises(BadInput, match=r"has no data for the model's input 'ids' \(it holds 'x'\)"):
        open_calibration({"x": rows(4)}, TWO_INPUTS)


def test_nan_is_reported_with_its_batch():
    data = rows(40)
    data[35, 2] = np.nan
    source = open_calibration({"x": data}, DYNAMIC, batch_size=16)
    with pytest.raises(BadInput) as error:
        collect(source)
    assert str(error.value) == (
        "calibration data: input 'x' holds NaN or Inf in batch 3 (samples 32..39, counting from 0)"
    )
    data[35, 2] = np.inf
    with pytest.raises(BadInput, match="batch 3"):
        collect(open_calibration({"x": data}, DYNAMIC, batch_size=16))


def test_array_source_batches_and_two_inputs():
    ids = np.arange(20, dtype=np.int64).reshape(10, 2)
    source = open_calibration({"x": rows(10), "ids": ids}, TWO_INPUTS, batch_size=4)
    batches = collect(source)
    assert [len(b["ids"]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(batches[2]["ids"], ids[8:])
    np.testing.assert_array_equal(batches[2]["x"], rows(2, start=8))
    assert source.describe() == "arrays: 10 samples in 3 batches"


def test_models_with_conflicting_static_batch_dims_are_refused():
    conflicting = model("float[2, 4] x, float[3, 4] z", outputs="float[2, 4] y")
    with pytest.raises(BadInput, match="declare batch dimensions 'x' 2, 'z' 3"):
        open_calibration("random", conflicting)


def test_unsupported_spec_type():
    with pytest.raises(BadInput, match="got a list"):
        open_calibration([rows(4)], DYNAMIC)


def test_image_options_with_numpy_data_are_reported_as_ignored(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(2))
    source = open_calibration(tmp_path / "cal.npz", DYNAMIC, image=ImageSpec(size=(4, 4)))
    assert source.warnings == [
        "the image options (--size, --mean, --std, --layout, --bgr) are ignored: the data is not images"
    ]


# --- random data ---------------------------------------------------------------------------


def test_random_source_warns_and_repeats():
    mixed = model("float[N, 3, S] x, int64[N, 2] ids", outputs="float[N, 3, S] y")
    source = open_calibration("random", mixed, batch_size=5, random_batches=3, seed=7)
    assert isinstance(source, RandomSource)
    assert source.trustworthy is False
    assert source.warnings == [RANDOM_WARNING]
    assert RANDOM_WARNING == (
        "calibrating on random data (--calib random): ranges and accuracy of the result are not trustworthy"
    )
    first, again = collect(source), collect(source)
    assert len(first) == 3 and source.num_samples == 15
    assert first[0]["x"].shape == (5, 3, 1) and first[0]["x"].dtype == np.float32
    assert set(np.unique(np.concatenate([b["ids"] for b in first]))) == {0, 1}
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    expected = np.random.default_rng(7).standard_normal((5, 3, 1)).astype(np.float32)
    np.testing.assert_array_equal(first[0]["x"], expected)
    other = collect(open_calibration("random", mixed, batch_size=5, random_batches=3, seed=8))
    assert not np.array_equal(other[0]["x"], first[0]["x"])
    assert source.describe() == "random data: 15 samples in 3 batches (not trustworthy)"


def test_random_source_takes_a_static_batch_size():
    source = open_calibration("random", STATIC, batch_size=16, random_batches=2)
    assert sizes(source) == [4, 4]


def test_random_source_refuses_inputs_it_cannot_draw():
    strings = model("string[N] s", body="y = Identity(s)", outputs="string[N] y")
    with pytest.raises(BadInput, match="random data covers numbers only"):
        open_calibration("random", strings)


# --- fingerprints --------------------------------------------------------------------------


def test_npz_fingerprint_follows_content_and_settings(tmp_path):
    np.savez(tmp_path / "a.npz", x=rows(20))
    np.savez(tmp_path / "b.npz", x=rows(20))
    np.savez(tmp_path / "c.npz", x=rows(20, start=1))

    def fp(name, **how):
        return open_calibration(tmp_path / name, DYNAMIC, **how).fingerprint()

    assert fp("a.npz") == fp("b.npz")  # same bytes under another name
    assert len(fp("a.npz")) == 64 and int(fp("a.npz"), 16) >= 0
    assert fp("a.npz") != fp("c.npz")
    assert fp("a.npz", batch_size=8) != fp("a.npz", batch_size=16)
    assert fp("a.npz", limit=10) != fp("a.npz")


def test_array_image_and_random_fingerprints(tmp_path):
    assert (
        open_calibration({"x": rows(8)}, DYNAMIC).fingerprint()
        == open_calibration({"x": rows(8).copy()}, DYNAMIC).fingerprint()
    )
    assert (
        open_calibration({"x": rows(8)}, DYNAMIC).fingerprint()
        != open_calibration({"x": rows(8, start=1)}, DYNAMIC).fingerprint()
    )
    two_pngs(tmp_path)
    image_model = model("float[N, 3, 4, 5] x", outputs="float[N] y")
    plain = open_calibration(tmp_path, image_model).fingerprint()
    assert plain == open_calibration(tmp_path, image_model).fingerprint()
    assert plain != open_calibration(tmp_path, image_model, image=ImageSpec(mean=(0.5,))).fingerprint()
    write_png(tmp_path / "img1.png", np.zeros((4, 5, 3)))
    assert plain != open_calibration(tmp_path, image_model).fingerprint()
    assert (
        open_calibration("random", DYNAMIC).fingerprint()
        != open_calibration("random", DYNAMIC, seed=1).fingerprint()
    )
