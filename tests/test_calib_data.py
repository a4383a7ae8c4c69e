"""Calibration data sources: every kind, batching, checks, streaming memory, images, fingerprints."""

from __future__ import annotations

import importlib.util
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import CalibrationDataReader
from PIL import Image

from polaris_opt.calib_data import (
    RANDOM_WARNING,
    FolderSource,
    ImageSource,
    ImageSpec,
    InputSpec,
    NpzSource,
    RandomSource,
    ReaderSource,
    model_inputs,
    open_calibration,
)
from polaris_opt.errors import BadInput
from polaris_opt.numerics import make_session

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


# --- .npz files: batching, limit, streaming ------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_batches_follow_batch_size_with_a_smaller_last(tmp_path, save):
    data = rows(37)
    save(tmp_path / "cal.npz", x=data)
    source = open_calibration(tmp_path / "cal.npz", DYNAMIC, batch_size=16)
    assert isinstance(source, NpzSource)
    assert (source.num_batches, source.num_samples) == (3, 37)
    assert source.describe() == "cal.npz: 37 samples in 3 batches"
    batches = collect(source)
    assert [len(b["x"]) for b in batches] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data)
    assert sizes(source) == [16, 16, 5]  # a second pass starts again
    assert source.warnings == []


def test_static_batch_takes_the_models_size_and_drops_the_remainder(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(10))
    source = open_calibration(str(tmp_path / "cal.npz"), STATIC, batch_size=16)
    assert sizes(source) == [4, 4]
    np.testing.assert_array_equal(collect(source)[1]["x"], rows(4, start=4))
    assert (source.num_batches, source.num_samples) == (2, 8)
    assert source.warnings == [
        "cal.npz: 2 of 10 samples do not fill a batch of 4 (the model fixes its batch dimension) "
        "and are left out"
    ]


def test_static_batch_with_too_few_samples_is_refused(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(3))
    with pytest.raises(BadInput, match=r"has 3 samples, fewer than the model's fixed batch size 4"):
        open_calibration(tmp_path / "cal.npz", STATIC)


def test_limit_caps_the_samples(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(50))
    source = open_calibration(tmp_path / "cal.npz", DYNAMIC, batch_size=16, limit=20)
    assert sizes(source) == [16, 4]
    assert source.num_samples == 20
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in collect(source)]), rows(20))
    static = open_calibration(tmp_path / "cal.npz", STATIC, limit=9)
    assert sizes(static) == [4, 4] and "1 of 9 samples" in static.warnings[0]


@pytest.mark.parametrize(("options", "message"), [({"batch_size": 0}, "batch size"), ({"limit": 0}, "limit")])
def test_bad_batch_size_or_limit(options, message):
    with pytest.raises(BadInput, match=message):
        open_calibration({"x": rows(4)}, DYNAMIC, **options)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_streaming_a_20_mb_npz_holds_one_batch(tmp_path, save):
    wide = model("float[N, 1024] x", outputs="float[N, 1024] y")
    data = np.random.default_rng(0).standard_normal((5120, 1024)).astype(np.float32)  # 20 MiB
    save(tmp_path / "big.npz", x=data)
    del data
    source = open_calibration(tmp_path / "big.npz", wide, batch_size=16)
    tracemalloc.start()
    try:
        total = sum(len(batch["x"]) for batch in source.batches())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 5120
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes"


def test_big_endian_arrays_are_read_in_native_order(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(5).astype(">f4"))
    (batch,) = collect(open_calibration(tmp_path / "cal.npz", DYNAMIC))
    assert batch["x"].dtype == np.float32 and batch["x"].dtype.isnative
    np.testing.assert_array_equal(batch["x"], rows(5))


def test_npz_batches_run_in_onnx_runtime_like_the_whole_array():
    cnn = onnx.load(MODELS / "digits_cnn.onnx")
    test = np.load(MODELS / "digits_test.npz")
    session = make_session(cnn)
    source = open_calibration({"input": test["x_cnn"]}, cnn, batch_size=64, limit=200)
    streamed = np.concatenate([session.run(None, batch)[0] for batch in source.batches()])
    whole = session.run(None, {"input": test["x_cnn"][:200]})[0]
    np.testing.assert_allclose(streamed, whole, rtol=1e-5, atol=1e-6)


# --- folders of .npy/.npz ------------------------------------------------------------------


def test_folder_collects_rows_across_files_in_name_order(tmp_path):
    np.savez(tmp_path / "a.npz", x=rows(5))
    np.save(tmp_path / "b.npy", rows(7, start=5))
    np.savez_compressed(tmp_path / "c.npz", x=rows(6, start=12))
    (tmp_path / ".hidden.npy").write_bytes(b"not numpy")  # skipped, like .DS_Store
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_calibration(tmp_path, DYNAMIC, batch_size=8)
    assert isinstance(source, FolderSource)
    batches = collect(source)
    assert [len(b["x"]) for b in batches] == [8, 8, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), rows(18))
    assert source.describe() == f"{tmp_path.name}/: 18 samples in 3 batches"


def test_single_npy_file_for_a_one_input_model(tmp_path):
    np.save(tmp_path / "x.npy", rows(6))
    source = open_calibration(tmp_path / "x.npy", DYNAMIC, batch_size=4)
    assert sizes(source) == [4, 2]


def test_npy_for_a_model_with_two_inputs_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", rows(6))
    with pytest.raises(BadInput, match=r"one array but the model has 2 inputs \(x, ids\); use .npz files"):
        open_calibration(tmp_path, TWO_INPUTS)


def test_empty_folder_and_mixed_folder_are_refused(tmp_path):
    with pytest.raises(BadInput, match="holds no .npy, .npz or image files"):
        open_calibration(tmp_path, DYNAMIC)
    np.save(tmp_path / "x.npy", rows(2))
    Image.new("RGB", (4, 4)).save(tmp_path / "y.png")
    with pytest.raises(BadInput, match="holds both NumPy files and images"):
        open_calibration(tmp_path, DYNAMIC)


def test_file_named_npz_that_is_not_numpy_is_refused(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"hello, not a zip")
    with pytest.raises(BadInput, match=r"a.npz' is not a NumPy .npy or .npz file"):
        open_calibration(tmp_path, DYNAMIC)


# --- bad files -----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(BadInput, match=r"calibration data '.*nothing.npz' does not exist"):
        open_calibration(tmp_path / "nothing.npz", DYNAMIC)


def test_empty_file_and_not_numpy_file(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(BadInput, match="is an empty file"):
        open_calibration(tmp_path / "empty.npz", DYNAMIC)
    (tmp_path / "data.csv").write_text("1,2,3,4\n")
    with pytest.raises(BadInput, match="is not a NumPy .npz or .npy file"):
        open_calibration(tmp_path / "data.csv", DYNAMIC)


def test_npz_with_no_arrays(tmp_path):
    np.savez(tmp_path / "cal.npz")
    with pytest.raises(BadInput, match="holds no arrays"):
        open_calibration(tmp_path / "cal.npz", DYNAMIC)


def test_pickled_objects_are_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "cal.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(BadInput, match=r"array 'x' holds Python objects \(dtype object\)"):
        open_calibration(tmp_path / "cal.npz", DYNAMIC)


def test_fortran_order_npz_is_refused(tmp_path):
    np.savez(tmp_path / "cal.npz", x=np.asfortranarray(rows(5)))
    with pytest.raises(BadInput, match="Fortran order.*np.ascontiguousarray"):
        open_calibration(tmp_path / "cal.npz", DYNAMIC)


def test_fortran_order_npy_is_read_through_the_memory_map(tmp_path):
    np.save(tmp_path / "x.npy", np.asfortranarray(rows(5)))
    np.testing.assert_array_equal(collect(open_calibration(tmp_path / "x.npy", DYNAMIC))[0]["x"], rows(5))


def test_scalar_array_is_refused(tmp_path):
    np.savez(tmp_path / "cal.npz", x=np.float32(1.0))
    with pytest.raises(BadInput, match="is a single value"):
        open_calibration(tmp_path / "cal.npz", DYNAMIC)


def test_truncated_files_are_refused_when_opened(tmp_path):
    np.save(tmp_path / "x.npy", rows(8))
    whole = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(whole[:-16])
    with pytest.raises(BadInput, match=r"x.npy' is truncated: its header promises 8 samples of \(4,\)"):
        open_calibration(tmp_path / "x.npy", DYNAMIC)
    with zipfile.ZipFile(tmp_path / "cal.npz", "w") as archive:
        archive.writestr("x.npy", whole[:-16])
    with pytest.raises(BadInput, match=r"array 'x' is truncated"):
        open_calibration(tmp_path / "cal.npz", DYNAMIC)


def test_npz_arrays_with_different_sample_counts(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(5), ids=np.zeros((4, 2), np.int64))
    with pytest.raises(BadInput, match=r"different numbers of samples \('x' 5, 'ids' 4\)"):
        open_calibration(tmp_path / "cal.npz", TWO_INPUTS)


def test_npz_headers_are_checked_when_the_source_opens(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(450, width=64).astype(np.float64))
    cnn = onnx.load(MODELS / "digits_cnn.onnx")
    with pytest.raises(BadInput) as error:
        open_calibration(tmp_path / "cal.npz", cnn)
    assert str(error.value) == (
        f"calibration data '{tmp_path / 'cal.npz'}' has 'x' but the model's inputs are: input"
    )


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


# --- ONNX Runtime CalibrationDataReader ----------------------------------------------------


class ListReader(CalibrationDataReader):
    """A reader the way ORT users write them: one dict per get_next(), and a rewind()."""

    def __init__(self, feeds):
        self.feeds = feeds
        self.rewinds = 0
        self._next = iter(feeds)

    def get_next(self):
        return next(self._next, None)

    def rewind(self):
        self.rewinds += 1
        self._next = iter(self.feeds)


class OnceReader(CalibrationDataReader):
    def __init__(self, feeds):
        self._next = iter(feeds)

    def get_next(self):
        return next(self._next, None)


def test_reader_rows_are_regrouped_and_rewound():
    feeds = [{"x": rows(1, start=i)} for i in range(10)]
    reader = ListReader(feeds)
    source = open_calibration(reader, DYNAMIC, batch_size=4)
    assert isinstance(source, ReaderSource)
    assert source.num_batches is None and source.fingerprint() is None
    first = collect(source)
    assert [len(b["x"]) for b in first] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in first]), rows(10))
    assert (source.num_batches, source.num_samples) == (3, 10)  # known after one pass
    second = collect(source)
    assert reader.rewinds == 1
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in second]), rows(10))


def test_reader_without_rewind_cannot_be_read_twice():
    source = open_calibration(OnceReader([{"x": rows(3)}]), DYNAMIC)
    assert sizes(source) == [3]
    with pytest.raises(BadInput) as error:
        source.batches()
    assert str(error.value) == (
        "calibration reader OnceReader cannot be read twice: give it a rewind() method that starts it again"
    )


def test_reader_data_is_checked():
    source = open_calibration(OnceReader([{"x": rows(2)}, {"x": rows(2).astype(np.float64)}]), DYNAMIC)
    with pytest.raises(BadInput, match=r"get_next\(\) call 2\): input 'x' expects float32 \[batch, 4\]"):
        collect(source)
    with pytest.raises(BadInput, match="returned a list"):
        collect(open_calibration(OnceReader([[rows(2)]]), DYNAMIC))
    with pytest.raises(BadInput, match="holds no samples"):
        collect(open_calibration(OnceReader([]), DYNAMIC))


def test_reader_with_static_batch_and_limit():
    feeds = [{"x": rows(3, start=3 * i)} for i in range(4)]  # 12 samples in threes
    source = open_calibration(ListReader(feeds), STATIC, limit=10)
    batches = collect(source)
    assert [len(b["x"]) for b in batches] == [4, 4]
    np.testing.assert_array_equal(batches[1]["x"], rows(4, start=4))
    assert source.warnings == [
        "calibration reader ListReader: 2 of 10 samples do not fill a batch of 4 "
        "(the model fixes its batch dimension) and are left out"
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


# --- images --------------------------------------------------------------------------------


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def two_pngs(folder: Path) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (4, 5, 3)).astype(np.uint8) for _ in range(2)]
    for i, pixels in enumerate(images):
        write_png(folder / f"img{i}.png", pixels)
    return images


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


def test_image_options_with_numpy_data_are_reported_as_ignored(tmp_path):
    np.savez(tmp_path / "cal.npz", x=rows(2))
    source = open_calibration(tmp_path / "cal.npz", DYNAMIC, image=ImageSpec(size=(4, 4)))
    assert source.warnings == [
        "the image options (--size, --mean, --std, --layout, --bgr) are ignored: the data is not images"
    ]


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


# --- the zoo's calibration sets ------------------------------------------------------------


def load_build_zoo():
    spec = importlib.util.spec_from_file_location("build_zoo", MODELS / "build_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "samples"),
    [
        ("digits_mlp", 256),
        ("digits_cnn", 256),
        ("resnet_s", 64),
        ("mobilenetv2_s", 64),
        ("transformer_s", 64),
    ],
)
def test_zoo_calibration_sets_open_and_match_the_builder(name, samples):
    if name.startswith("digits"):
        pytest.importorskip("sklearn")  # the builder reads the digits training split
    zoo_model = onnx.load(MODELS / f"{name}.onnx")
    source = open_calibration(MODELS / f"{name}.calib.npz", zoo_model, batch_size=16)
    assert (source.num_samples, source.num_batches) == (samples, samples // 16)
    assert source.trustworthy and source.warnings == []
    expected = load_build_zoo().calibration_arrays(name, zoo_model)
    (input_name,) = expected
    streamed = np.concatenate([batch[input_name] for batch in source.batches()])
    np.testing.assert_array_equal(streamed, expected[input_name])
    sample = np.load(MODELS / f"{name}.input.npz")[input_name]
    assert not any(np.array_equal(row, sample[0]) for row in streamed)  # not the sample input again


def test_digits_calibration_sets_are_training_digits_the_models_know():
    pytest.importorskip("sklearn")
    labels = load_build_zoo().digits.load_split().y_train[:256]
    for name in ("digits_mlp", "digits_cnn"):
        zoo_model = onnx.load(MODELS / f"{name}.onnx")
        session = make_session(zoo_model)
        source = open_calibration(MODELS / f"{name}.calib.npz", zoo_model, batch_size=64)
        logits = np.concatenate([session.run(None, batch)[0] for batch in source.batches()])
        accuracy = float((logits.argmax(axis=1) == labels).mean())
        assert accuracy > 0.95, f"{name}: {accuracy:.3f}"
