"""polaris_opt.bench: percentiles, input making and checking, turn sizes, and the real runner's rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import MODELS
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.bench.document import bench_document, bench_rows, strict, write_document
from polaris_opt.bench.feeds import check_feeds_fit, file_batch, file_feeds, random_batch, random_feeds
from polaris_opt.bench.inputs import (
    DeclaredInput,
    check_same_inputs,
    declared_inputs,
    parse_batches,
    parse_shapes,
)
from polaris_opt.bench.models import pair_models, parse_runtimes, read_model
from polaris_opt.bench.plan import plan_bench
from polaris_opt.bench.runner import MIN_TURNS, TURN_SECONDS, Settings, run_bench, turn_size
from polaris_opt.bench.stats import percentiles, summarize
from polaris_opt.errors import BadInput
from polaris_opt.report import load_bench_rows

RESNET, MOBILENET = MODELS / "resnet_s.onnx", MODELS / "mobilenetv2_s.onnx"
IMAGE = DeclaredInput("input", np.dtype(np.float32), ("batch", 3, 32, 32))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def token_model(table_rows: int = 10) -> onnx.ModelProto:
    """int64 tokens [batch, seq] → Gather from a [table_rows, 4] table → y [batch, seq, 4]."""
    table = np.arange(table_rows * 4, dtype=np.float32).reshape(table_rows, 4)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "tokens"], ["y"], axis=0)],
        "tokens",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# -------------------------------------------------------------------------------- statistics


def test_percentiles_interpolate_linearly_between_sorted_samples():
    samples = list(range(100, 0, -1))  # 1..100, unsorted
    assert percentiles(samples, (50, 90, 99)) == pytest.approx([50.5, 90.1, 99.01])
    assert percentiles([4.0], (50, 99)) == [4.0, 4.0]
    with pytest.raises(ValueError):
        percentiles([], (50,))


def test_summary_is_in_milliseconds_with_throughput_at_the_median():
    seconds = [0.001, 0.002, 0.003, 0.004, 0.010]
    latency = summarize(seconds, batch=8)
    assert (latency.runs, latency.p50_ms) == (5, pytest.approx(3.0))
    assert latency.p90_ms == pytest.approx(4.0 + 0.6 * 6.0)  # between the 4th and 5th sample
    assert latency.p99_ms == pytest.approx(4.0 + 0.96 * 6.0)
    assert latency.throughput == pytest.approx(8 / 0.003)
    assert latency.spread == pytest.approx(latency.p90_ms / 3.0)


# ------------------------------------------------------------------------------------ inputs


def test_declared_inputs_of_zoo_models_and_of_an_int64_token_model():
    assert declared_inputs(onnx.load(RESNET), RESNET) == (IMAGE,)
    tokens = declared_inputs(token_model(), Path("t.onnx"))
    assert tokens == (DeclaredInput("tokens", np.dtype(np.int64), ("batch", "seq")),)


def test_random_inputs_follow_the_declared_shapes_and_the_seed():
    feeds = random_feeds((IMAGE,), {}, batch=4, seed=0)
    assert feeds["input"].shape == (4, 3, 32, 32) and feeds["input"].dtype == np.float32
    assert abs(float(feeds["input"].mean())) < 0.1 and 0.9 < float(feeds["input"].std()) < 1.1
    np.testing.assert_array_equal(feeds["input"], random_feeds((IMAGE,), {}, 4, seed=0)["input"])
    assert not np.array_equal(feeds["input"], random_feeds((IMAGE,), {}, 4, seed=1)["input"])


def test_int64_token_inputs_take_dynamic_sizes_from_shape_and_stay_in_range():
    inputs = declared_inputs(token_model(), Path("t.onnx"))
    shapes = parse_shapes(["tokens=2x7"], inputs)
    assert random_batch(inputs, shapes) == 2
    feeds = random_feeds(inputs, shapes, batch=5, seed=3)  # --batch replaces the shape's first size
    assert feeds["tokens"].shape == (5, 7) and feeds["tokens"].dtype == np.int64
    assert set(np.unique(feeds["tokens"])) <= {0, 1}
    with pytest.raises(BadInput, match=r"dimension 1 \('seq'\) is dynamic; set it with --shape tokens=NxN"):
        random_feeds(inputs, {}, batch=1, seed=0)


def test_a_fixed_first_dimension_refuses_another_batch():
    fixed = DeclaredInput("x", np.dtype(np.float32), (1, 8))
    assert random_feeds((fixed,), {}, 1, 0)["x"].shape == (1, 8)
    with pytest.raises(BadInput, match="fixed first dimension 1, so it cannot take batch 4"):
        random_feeds((fixed,), {}, 4, 0)


def test_file_inputs_are_cut_or_tiled_to_the_batch_in_row_order(tmp_path):
    rows = np.arange(2 * 3 * 32 * 32, dtype=np.float32).reshape(2, 3, 32, 32)
    arrays = {"input": rows, "extra": np.zeros(3)}
    assert file_batch(arrays, (IMAGE,)) == 2
    tiled = file_feeds(arrays, (IMAGE,), 5, tmp_path / "x.npz")["input"]
    np.testing.assert_array_equal(tiled, rows[[0, 1, 0, 1, 0]])
    np.testing.assert_array_equal(file_feeds(arrays, (IMAGE,), 1, tmp_path)["input"], rows[:1])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 3, 32, 32), np.float32)}, "no array 'input' for the models' input (it holds x)"),
        ({"input": np.zeros((2, 3, 32, 32), np.float64)}, "'input' is float64, the models take float32"),
        ({"input": np.zeros((0, 3, 32, 32), np.float32)}, "'input' has no rows to run on"),
    ],
)
def test_file_inputs_refuse_missing_arrays_wrong_dtypes_and_empty_ones(arrays, message):
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        file_feeds(arrays, (IMAGE,), 1, Path("x.npz"))


def test_arrays_that_do_not_fit_a_model_are_refused():
    check_feeds_fit(RESNET, (IMAGE,), {"input": np.zeros((3, 3, 32, 32), np.float32)})
    with pytest.raises(
        BadInput, match=r"takes \[batch, 3, 32, 32\], but the inputs have shape \[3, 3, 16, 16\]"
    ):
        check_feeds_fit(RESNET, (IMAGE,), {"input": np.zeros((3, 3, 16, 16), np.float32)})


@pytest.mark.parametrize(
    "text, expected",
    [("1", [1]), ("1,8,32", [1, 8, 32]), (" 8 , 1 ", [8, 1])],
)
def test_batches_parse(text, expected):
    assert parse_batches(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("0", "positive whole"),
        ("x", "positive whole"),
        ("1,,2", "positive whole"),
        ("-1", "positive whole"),
        ("1.5", "positive whole"),
        ("8,1,8", "batch 8 is given twice"),
    ],
)
def test_bad_batches_are_refused(text, message):
    with pytest.raises(BadInput, match=message):
        parse_batches(text)


@pytest.mark.parametrize(
    "texts, message",
    [
        (["input:1x3x32x32"], "expected NAME=AxBxC"),
        (["input=1x3xax32"], "expected NAME=AxBxC"),
        (["input=0x3x32x32"], "at least 1"),
        (["image=1x3x32x32"], "the models have no input 'image'"),
        (["input=1x3x32"], r"input 'input' takes \[batch, 3, 32, 32\]"),
        (["input=1x3x16x16"], r"input 'input' takes \[batch, 3, 32, 32\]"),
        (["input=1x3x32x32", "input=2x3x32x32"], "given a shape twice"),
    ],
)
def test_bad_shapes_are_refused(texts, message):
    with pytest.raises(BadInput, match=message):
        parse_shapes(texts, (IMAGE,))


def test_models_must_take_the_same_inputs():
    same = (RESNET, (IMAGE,))
    check_same_inputs([same, (MOBILENET, (IMAGE,))])
    # A dynamic size against a static one agrees; the arrays are checked against both later.
    check_same_inputs([same, (MOBILENET, (DeclaredInput("input", IMAGE.dtype, (4, 3, 32, 32)),))])
    cases = [
        ((DeclaredInput("x", IMAGE.dtype, IMAGE.dims),), "inputs x differ from"),
        ((DeclaredInput("input", np.dtype(np.float16), IMAGE.dims),), "is float16, but"),
        ((DeclaredInput("input", IMAGE.dtype, ("batch", 3, 64, 64)),), r"has shape \[batch, 3, 64, 64\]"),
        ((DeclaredInput("input", IMAGE.dtype, ("batch", 3072)),), r"has shape \[batch, 3072\]"),
    ]
    for inputs, message in cases:
        with pytest.raises(BadInput, match=message):
            check_same_inputs([same, (MOBILENET, inputs)])


# ------------------------------------------------------------------------- models, runtimes


def test_runtimes_apply_to_all_pair_with_models_or_repeat_one_model():
    assert parse_runtimes("ort", 3) == ["ort"] * 3
    assert parse_runtimes("ort,polaris", 2) == ["ort", "polaris"]
    assert parse_runtimes("ort,polaris", 1) == ["ort", "polaris"]
    with pytest.raises(BadInput, match="2 runtimes for 3 models"):
        parse_runtimes("ort,polaris", 3)
    with pytest.raises(BadInput, match="unknown runtime 'tensorrt'; choose from ort, polaris"):
        parse_runtimes("ort,tensorrt", 2)
    model = read_model(RESNET)
    pairs = pair_models([model], ["ort", "polaris"])
    assert [(m.path, r) for m, r in pairs] == [(RESNET, "ort"), (RESNET, "polaris")]


def test_model_facts_and_files_that_are_not_models(tmp_path):
    model = read_model(RESNET)
    assert (model.file_bytes, model.inputs, model.polaris_ops) == (RESNET.stat().st_size, (IMAGE,), False)
    (tmp_path / "notes.onnx").write_text("not a model at all")
    for path, message in (
        (tmp_path / "absent.onnx", "no such file"),
        (tmp_path / "notes.onnx", "not an ONNX"),
    ):
        with pytest.raises(BadInput, match=message):
            read_model(path)


def test_external_data_counts_in_the_file_size(tmp_path):
    model = onnx.load(RESNET)
    path = tmp_path / "resnet_ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="resnet_ext.data", size_threshold=0)
    facts = read_model(path)
    assert facts.file_bytes == path.stat().st_size + (tmp_path / "resnet_ext.data").stat().st_size


# ----------------------------------------------------------------------------------- turns


def test_turns_last_about_turn_seconds_but_interleave_at_least_min_turns():
    runs = Settings(runs=200)
    assert turn_size(None, 0, runs) == 1  # nothing known yet: one run
    assert turn_size(TURN_SECONDS / 4, 0, runs) == 4
    assert turn_size(TURN_SECONDS / 1000, 0, runs) == 200 // MIN_TURNS
    assert turn_size(TURN_SECONDS / 1000, 195, runs) == 5  # what is left
    assert turn_size(TURN_SECONDS * 3, 0, runs) == 1
    seconds = Settings(runs=None, seconds=1.0)
    assert turn_size(TURN_SECONDS / 1000, 10_000, seconds) == 1000


# ---------------------------------------------------------------------------- the real runner


@pytest.fixture(scope="module")
def measured():
    """resnet_s against mobilenetv2_s at batch 1 and 2, 6 runs each, in real worker processes."""
    plan = plan_bench([RESNET, MOBILENET], batch="1,2")
    progress = []
    results = run_bench(plan.pairs, plan.feeds_by_batch, Settings(warmup=2, runs=6), progress.append)
    return results, progress


def test_each_contender_gets_its_runs_its_own_worker_and_its_progress(measured):
    results, progress = measured
    order = [(m.contender.model.path, m.contender.batch) for m in results]
    assert order == [(RESNET, 1), (MOBILENET, 1), (RESNET, 2), (MOBILENET, 2)]
    assert all(len(m.times) == 6 and min(m.times) > 0 for m in results)
    assert sum(progress) == 4 * (2 + 6)
    # A worker is a fresh interpreter with ONNX Runtime and a session: tens of MB.
    assert all(20 < m.peak_rss_mb < 2000 for m in results)
    assert all(m.overhead_s >= 0 and m.transit_s > 0 for m in results)


def test_rows_order_percentiles_and_compare_against_the_first_model(measured):
    results, _ = measured
    rows = bench_rows(results)
    for row, result in zip(rows, results, strict=True):
        assert row["runs"] == 6 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["p50_ms"] == pytest.approx(1e3 * float(np.median(result.times)))
        assert row["throughput"] == pytest.approx(row["batch"] * 1e3 / row["p50_ms"])
        assert row["spread"] == pytest.approx(row["p90_ms"] / row["p50_ms"])
        assert row["overhead_ms"] == pytest.approx(result.overhead_s * 1e3 / 6)
    first_1, second_1, first_2, second_2 = rows
    assert first_1["speedup"] == first_2["speedup"] == 1.0
    assert second_1["speedup"] == pytest.approx(first_1["p50_ms"] / second_1["p50_ms"])
    assert second_2["speedup"] == pytest.approx(first_2["p50_ms"] / second_2["p50_ms"])
    assert first_1["size_ratio"] == 1.0
    assert second_1["size_ratio"] == MOBILENET.stat().st_size / RESNET.stat().st_size
    assert second_1["file_bytes"] == MOBILENET.stat().st_size


def test_the_document_is_strict_json_that_the_report_reads(measured, tmp_path):
    results, _ = measured
    rows = bench_rows(results)
    rows[0]["p99_ms"] = float("inf")
    settings = Settings(warmup=2, runs=6)
    document = bench_document(rows, settings, runtime="ort", input="random", shapes=[], devices=[])
    assert set(document) == {"polaris_opt_bench", "machine", "settings", "results"}
    assert set(document["settings"]) == {"runtime", "threads", "warmup", "runs", "seconds", "input", "shapes"}
    path = tmp_path / "bench.json"
    write_document(path, document)
    saved = json.loads(path.read_text())
    assert saved["results"][0]["p99_ms"] is None and saved["results"][1] == json.loads(json.dumps(rows[1]))
    assert [row["model"] for row in load_bench_rows(path)] == [str(RESNET), str(MOBILENET)] * 2
    assert strict(float("nan")) is None and strict(1.5) == 1.5
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


def test_seconds_run_each_contender_until_it_has_that_much_measured_time():
    plan = plan_bench([MOBILENET, MOBILENET])
    results = run_bench(plan.pairs, plan.feeds_by_batch, Settings(warmup=1, runs=None, seconds=0.03))
    for result in results:
        assert 0.03 <= sum(result.times) < 0.03 + 2 * TURN_SECONDS


def test_a_model_that_fails_to_run_is_reported_as_bad_input(tmp_path):
    """x [batch, 4] → Reshape to [3]: ONNX Runtime refuses it at run time, in the worker."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.array([3], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = save(model, tmp_path / "bad.onnx")
    plan = plan_bench([path])
    with pytest.raises(BadInput, match=r"bad.onnx \(ort, batch 1\): .*reshape"):
        run_bench(plan.pairs, plan.feeds_by_batch, Settings(warmup=1, runs=2))
