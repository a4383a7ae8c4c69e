"""ONNX Runtime CalibrationDataReaders as calibration data: regrouped rows, rewinding, and readers
without rewind() replayed from a spool on disk with bounded memory."""

from __future__ import annotations

import gc
import tempfile
import tracemalloc

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import CalibrationDataReader
from test_calib_data import DYNAMIC, STATIC, TWO_INPUTS, collect, model, rows, sizes

from polaris_opt.calib_data import ReaderSource, open_calibration
from polaris_opt.errors import BadInput

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


class CountingReader(CalibrationDataReader):
    """A reader without rewind() that counts its get_next() calls."""

    def __init__(self, feeds):
        self._next = iter(feeds)
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return next(self._next, None)


@pytest.fixture
def spool_root(tmp_path, monkeypatch):
    """Temporary folders (the spool's among them) made under tmp_path, where the test can see them."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_reader_without_rewind_is_replayed_from_its_spool(spool_root):
    ids = np.arange(20, dtype=np.int64).reshape(10, 2)
    feeds = [{"ids": ids[i : i + 3], "x": rows(3, start=i)[: len(ids[i : i + 3])]} for i in range(0, 10, 3)]
    reader = CountingReader(feeds)
    source = open_calibration(reader, TWO_INPUTS, batch_size=4)
    first = collect(source)
    assert reader.calls == 5  # four chunks, then None
    assert [len(b["x"]) for b in first] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in first]), rows(10))
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in first]), ids)
    for _ in range(2):
        again = collect(source)
        assert reader.calls == 5  # replayed from disk, the reader is not asked again
        assert [list(b) for b in again] == [list(b) for b in first]
        for a, b in zip(first, again, strict=True):
            for name in a:
                assert a[name].dtype == b[name].dtype
                np.testing.assert_array_equal(a[name], b[name])
    assert (source.num_batches, source.num_samples) == (3, 10)


def test_a_limited_first_pass_is_complete_although_the_reader_is_not_exhausted(spool_root):
    reader = CountingReader([{"x": rows(3, start=3 * i)} for i in range(4)])
    source = open_calibration(reader, DYNAMIC, batch_size=4, limit=5)
    assert sizes(source) == [4, 1]
    assert reader.calls == 2  # stopped pulling once it had 5 rows
    replayed = collect(source)
    assert [len(b["x"]) for b in replayed] == [4, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in replayed]), rows(5))


def test_a_second_pass_before_the_first_has_ended_is_refused(spool_root):
    feeds = [{"x": rows(2, start=2 * i)} for i in range(3)]
    source = open_calibration(CountingReader(feeds), DYNAMIC, batch_size=2)
    first = source.batches()
    next(first)
    with pytest.raises(BadInput) as error:
        source.batches()
    assert str(error.value) == (
        "calibration reader CountingReader has no rewind(), so it is read once: read all the batches of the "
        "first batches() before calling it again (or give the reader a rewind() method)"
    )
    assert sum(len(b["x"]) for b in first) == 4  # the first pass goes on unharmed
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in collect(source)]), rows(6))


def test_a_first_pass_that_failed_cannot_be_replayed(spool_root):
    source = open_calibration(CountingReader([{"x": rows(2)}, {"x": rows(2).astype(np.float64)}]), DYNAMIC)
    with pytest.raises(BadInput, match="expects float32"):
        collect(source)
    with pytest.raises(BadInput, match="has no rewind\\(\\), so it is read once"):
        source.batches()


def test_the_spool_folder_goes_when_the_source_is_dropped(spool_root):
    feeds = [{"x": rows(2, start=2 * i)} for i in range(5)]
    source = open_calibration(CountingReader(feeds), DYNAMIC, batch_size=4)
    collect(source)
    (folder,) = spool_root.iterdir()
    assert sorted(f.name for f in folder.iterdir()) == ["000000-000.npy", "000001-000.npy", "000002-000.npy"]
    del source
    gc.collect()
    assert not folder.exists()
    assert list(spool_root.iterdir()) == []


def test_closing_the_source_removes_the_spool_at_once(spool_root):
    source = open_calibration(CountingReader([{"x": rows(3)}]), DYNAMIC)
    collect(source)
    (folder,) = spool_root.iterdir()
    source.close()
    assert not folder.exists()
    with pytest.raises(BadInput) as error:
        source.batches()
    assert str(error.value) == (
        "calibration reader CountingReader was closed: its spooled batches are gone, "
        "so it cannot be read again"
    )


def test_a_reader_with_rewind_is_rewound_not_spooled(spool_root):
    reader = ListReader([{"x": rows(2)}])
    source = open_calibration(reader, DYNAMIC)
    collect(source)
    collect(source)
    assert reader.rewinds == 1
    assert list(spool_root.iterdir()) == []


class NoiseReader:
    """20 MiB of seeded noise made a chunk at a time, as a reader over a large data set would."""

    CHUNKS, ROWS, WIDTH = 80, 64, 1024  # 80 x 256 KiB

    def __init__(self):
        self.rng = np.random.default_rng(5)
        self.left = self.CHUNKS

    def get_next(self):
        if self.left == 0:
            return None
        self.left -= 1
        return {"x": self.rng.standard_normal((self.ROWS, self.WIDTH), dtype=np.float32)}


def traced_peak(run) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_spooling_and_replaying_20_mb_holds_about_one_batch(spool_root):
    wide = model("float[N, 1024] x", outputs="float[N, 1024] y")
    source = open_calibration(NoiseReader(), wide, batch_size=64)
    first_peak = traced_peak(lambda: sum(len(b["x"]) for b in source.batches()))

    def replay_and_compare():
        expected = np.random.default_rng(5)
        for batch in source.batches():
            want = expected.standard_normal((NoiseReader.ROWS, NoiseReader.WIDTH), dtype=np.float32)
            assert np.array_equal(batch["x"], want)

    replay_peak = traced_peak(replay_and_compare)
    assert (source.num_batches, source.num_samples) == (80, 5120)
    assert first_peak < 2 * 1024 * 1024, f"first pass peak {first_peak} bytes"
    assert replay_peak < 2 * 1024 * 1024, f"replay peak {replay_peak} bytes"


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
