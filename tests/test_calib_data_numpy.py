"""Calibration data from .npz/.npy files and folders of them: batching, limits, streaming
memory, and every kind of bad file refused with a clear message."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest
from PIL import Image
from test_calib_data import DYNAMIC, MODELS, STATIC, TWO_INPUTS, collect, model, rows, sizes

from polaris_opt.calib_data import FolderSource, NpzSource, open_calibration
from polaris_opt.errors import BadInput
from polaris_opt.numerics import make_session

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
