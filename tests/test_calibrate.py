"""calibrate pass: ranges on the cleaned digits CNN checked against values captured
independently, merged halves, the statistics cache, and the errors a user can cause."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from export_like import paddle_like, pytorch_like, tf2onnx_like, with_if, with_loop, with_unknown_domains
from helpers import run_pass_with_stats

from polaris_opt import capture
from polaris_opt.calib_data import CalibrationSource
from polaris_opt.calib_stats import CalibMethod, CalibrationTable
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.passes.calibrate import Calibrate, run_ahead
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline

MODELS = Path(__file__).resolve().parent.parent / "models"


class ListSource(CalibrationSource):
    """Batches from a list; the fingerprint hashes their bytes (None: caching off)."""

    def __init__(self, batches: list[dict[str, np.ndarray]], hashable: bool = True):
        self._batches = batches
        self._hashable = hashable

    def batches(self):
        return iter(self._batches)

    def fingerprint(self) -> str | None:
        if not self._hashable:
            return None
        digest = hashlib.sha256()
        for batch in self._batches:
            for name, array in sorted(batch.items()):
                digest.update(name.encode() + np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    @property
    def num_batches(self) -> int:
        return len(self._batches)


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    return run_pipeline(model, Pipeline.parse("cleanup")).model


@pytest.fixture(scope="module")
def digit_batches() -> list[dict[str, np.ndarray]]:
    images = np.load(MODELS / "digits_test.npz")["x_cnn"][:96]
    return [{"input": images[i : i + 16]} for i in range(0, len(images), 16)]


def calibrate(model, source, **options) -> tuple[CalibrationTable, dict]:
    ctx = PassContext(calib=source)
    _, stats = run_pass_with_stats(Calibrate(**options), model, ctx)
    return ctx.calibration, stats


def captured_min_max(model, batches, names) -> dict[str, tuple[float, float]]:
    """min and max of `names` over all batches, from values captured here, not by the pass."""
    lows = {name: [] for name in names}
    highs = {name: [] for name in names}
    for values in capture.stream_tensors(model, batches, names):
        for name in names:
            lows[name].append(values[name].min())
            highs[name].append(values[name].max())
    return {name: (float(min(lows[name])), float(max(highs[name]))) for name in names}


def test_minmax_ranges_equal_the_captured_min_and_max(cnn, digit_batches):
    table, stats = calibrate(cnn, ListSource(digit_batches))
    names = capture.float_activations(cnn)
    assert set(table.ranges) == set(names) and len(names) == 8
    assert stats == {"method": "minmax", "tensors": 8, "batches": 6, "cached": 0}
    assert table.ranges == captured_min_max(cnn, digit_batches, names)
    images = np.concatenate([b["input"] for b in digit_batches])
    assert table.ranges["input"] == (float(images.min()), float(images.max()))
    assert table.stats["/relu1/Relu_output_0"].count == 96 * 8 * 8 * 8


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_every_method_gives_every_activation_a_range_inside_min_max(cnn, digit_batches, method):
    table, stats = calibrate(cnn, ListSource(digit_batches), method=CalibMethod(method), percentile=99.0)
    minmax, _ = calibrate(cnn, ListSource(digit_batches))
    assert table.method == method and stats["tensors"] == 8 and set(table.ranges) == set(minmax.ranges)
    for name, (lo, hi) in table.ranges.items():
        low, high = minmax.ranges[name]
        assert low <= lo <= hi <= high, name
    # With 1 % cut, the percentile range is strictly inside min/max for the wide activations.
    if method == "percentile":
        lo, hi = table.ranges["logits"]
        assert (lo, hi) != minmax.ranges["logits"]


@pytest.mark.parametrize(
    "build",
    [pytorch_like, paddle_like, tf2onnx_like, with_if, with_loop, lambda: with_unknown_domains(custom=False)],
    ids=["pytorch", "paddle", "tf2onnx", "if", "loop", "com.microsoft"],
)
def test_exporter_shaped_models_calibrate_their_main_graph(build):
    model, feeds = build()
    table, stats = calibrate(model, ListSource([feeds]), method=CalibMethod.PERCENTILE, percentile=100.0)
    names = capture.float_activations(model)
    assert stats["tensors"] == len(names) > 0
    # At percentile 100 nothing is cut: the ranges are the exact min and max.
    assert table.ranges == captured_min_max(model, [feeds], names)


def test_the_graph_is_not_changed(cnn, digit_batches):
    graph = to_graph(cnn)
    before = [(node.op, [t.name for t in node.inputs]) for node in graph.nodes]
    result = Calibrate(method=CalibMethod.ENTROPY).run(graph, PassContext(calib=ListSource(digit_batches)))
    assert result.modified is False
    assert [(node.op, [t.name for t in node.inputs]) for node in graph.nodes] == before


def test_statistics_of_two_halves_merge_into_those_of_the_whole(cnn, digit_batches):
    options = {"method": CalibMethod.ENTROPY, "bins": 512}
    first, _ = calibrate(cnn, ListSource(digit_batches[:3]), **options)
    second, _ = calibrate(cnn, ListSource(digit_batches[3:]), **options)
    whole, _ = calibrate(cnn, ListSource(digit_batches), **options)
    merged = first.merge(second)
    assert merged.ranges == whole.ranges and merged.batches == whole.batches == 6
    for name, stats in whole.stats.items():
        assert np.array_equal(merged.stats[name].counts, stats.counts), name
        assert (merged.stats[name].min, merged.stats[name].max) == (stats.min, stats.max)


def test_a_cache_hit_skips_onnx_runtime_and_gives_the_same_ranges(cnn, digit_batches, tmp_path, monkeypatch):
    source = ListSource(digit_batches)
    ctx = PassContext(calib=source, cache_dir=tmp_path / "cache")
    _, first = run_pass_with_stats(Calibrate(method=CalibMethod.PERCENTILE), cnn, ctx)
    computed = ctx.calibration
    assert first["cached"] == 0 and len(list((tmp_path / "cache").glob("calibration-*.npz"))) == 1

    def no_onnx_runtime(*args, **kwargs):
        raise AssertionError("ONNX Runtime ran although the statistics were cached")

    monkeypatch.setattr(capture, "stream_tensors", no_onnx_runtime)
    ctx = PassContext(calib=source, cache_dir=tmp_path / "cache")
    _, second = run_pass_with_stats(Calibrate(method=CalibMethod.PERCENTILE), cnn, ctx)
    assert second == {"method": "percentile", "tensors": 8, "batches": 6, "cached": 1}
    assert ctx.calibration.ranges == computed.ranges
    # The percentile is applied to the cached histograms, not baked into the cache.
    ctx = PassContext(calib=source, cache_dir=tmp_path / "cache")
    run_pass_with_stats(Calibrate(method=CalibMethod.PERCENTILE, percentile=90.0), cnn, ctx)
    assert ctx.calibration.ranges["logits"] != computed.ranges["logits"]


def test_other_data_or_method_misses_the_cache(cnn, digit_batches, tmp_path):
    def run(batches, method):
        ctx = PassContext(calib=ListSource(batches), cache_dir=tmp_path)
        return run_pass_with_stats(Calibrate(method=method), cnn, ctx)[1]["cached"]

    assert run(digit_batches, CalibMethod.MINMAX) == 0
    assert run(digit_batches, CalibMethod.MINMAX) == 1
    assert run(digit_batches[:2], CalibMethod.MINMAX) == 0
    assert run(digit_batches, CalibMethod.MSE) == 0
    assert len(list(tmp_path.glob("calibration-*.npz"))) == 3


def test_data_without_a_fingerprint_is_not_cached(cnn, digit_batches, tmp_path):
    ctx = PassContext(calib=ListSource(digit_batches, hashable=False), cache_dir=tmp_path)
    run_pass_with_stats(Calibrate(), cnn, ctx)
    assert ctx.calibration.ranges and list(tmp_path.iterdir()) == []


def test_an_unreadable_cache_file_is_recomputed(cnn, digit_batches, tmp_path):
    source = ListSource(digit_batches)
    ctx = PassContext(calib=source, cache_dir=tmp_path)
    run_pass_with_stats(Calibrate(), cnn, ctx)
    (cache_file,) = tmp_path.glob("calibration-*.npz")
    cache_file.write_bytes(b"truncated")
    _, stats = run_pass_with_stats(Calibrate(), cnn, ctx)
    assert stats["cached"] == 0 and CalibrationTable.load(cache_file).ranges == ctx.calibration.ranges


def test_calibrate_in_a_pipeline_leaves_the_table_in_the_context(cnn, digit_batches):
    ctx = PassContext(calib=ListSource(digit_batches))
    result = run_pipeline(cnn, Pipeline.parse("cleanup,calibrate{method=mse,bins=256}"), ctx=ctx)
    assert ctx.calibration.method == "mse" and len(ctx.calibration.ranges) == 8
    assert result.reports[-1].stats["method"] == "mse" and not result.reports[-1].modified


def test_the_progress_bar_counts_batches(cnn, digit_batches):
    seen = []

    @contextlib.contextmanager
    def progress(description, total):
        seen.append((description, total))
        yield lambda n=1: seen.append(n)

    ctx = PassContext(calib=ListSource(digit_batches), progress=progress)
    run_pass_with_stats(Calibrate(method=CalibMethod.ENTROPY), cnn, ctx)
    assert seen == [("calibrating", 6), 1, 1, 1, 1, 1, 1]


def test_run_ahead_yields_everything_in_order_and_passes_errors_on():
    assert list(run_ahead(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise RuntimeError("broken batch")

    with pytest.raises(RuntimeError, match="broken batch"):
        list(run_ahead(failing()))


def test_run_ahead_makes_at_most_one_item_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    for i in run_ahead(items()):
        time.sleep(0.01)  # give the worker time to run ahead as far as it would
        assert len(produced) <= i + 2


# ----------------------------------------------------------------------------------------- errors


def test_no_calibration_data_is_bad_input(cnn):
    with pytest.raises(BadInput, match=r"calibrate needs calibration data: pass --calib DATA"):
        calibrate(cnn, None)


def test_data_with_no_batches_is_bad_input(cnn):
    with pytest.raises(BadInput, match="no batches"):
        calibrate(cnn, ListSource([]))


@pytest.mark.parametrize("method", [CalibMethod.MINMAX, CalibMethod.ENTROPY])
def test_a_nan_activation_names_the_tensor_and_the_batch(method):
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N,4] x) => (float[N,4] y) { y = Log(x) }'
    )
    batches = [{"x": np.full((2, 4), 2.0, np.float32)}, {"x": np.array([[1, 2, -1, 3]], np.float32)}]
    batches += [{"x": np.ones((1, 4), np.float32)}] * 3
    closed = []

    @contextlib.contextmanager
    def progress(description, total):
        try:
            yield lambda n=1: None
        finally:
            closed.append(description)

    expected = "calibration: activation 'y' is NaN or Inf on batch 2; check the calibration data"
    ctx = PassContext(calib=ListSource(batches), progress=progress)
    with pytest.raises(BadInput, match=expected) as raised:
        run_pass_with_stats(Calibrate(method=method), model, ctx)
    # The progress bar is closed at once, not when the traceback (kept here) lets it go.
    assert closed == ["calibrating"] and raised.traceback


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"percentile": 0.0}, "percentile must be in"),
        ({"percentile": 100.5}, "percentile must be in"),
        ({"percentile": float("nan")}, "percentile must be in"),
        ({"bins": 1000}, "power of two"),
        ({"bins": 8}, "power of two"),
        ({"method": "kl"}, "method must be one of"),
    ],
)
def test_bad_options_are_bad_input(options, message):
    with pytest.raises(BadInput, match=message):
        Calibrate(**options)


@pytest.mark.parametrize(
    "text", ["calibrate{bins=100}", "calibrate{percentile=101}", "calibrate{method=kl}", "calibrate{bins=x}"]
)
def test_bad_options_in_pipeline_text_are_bad_input(text):
    with pytest.raises(BadInput):
        Pipeline.parse(text).passes()


def test_a_method_given_as_text_from_python_is_accepted():
    assert Calibrate(method="entropy").method is CalibMethod.ENTROPY
