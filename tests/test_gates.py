"""Quality gates: `--check` parsing and evaluation (polaris_opt.gates), the data gates measure on
and the measurement itself with its output cache (polaris_opt.gate_fidelity, output_cache)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from polaris_opt import gate_fidelity
from polaris_opt.errors import BadInput
from polaris_opt.gate_fidelity import (
    ModelFile,
    accuracy,
    choose_data,
    compare,
    label_name,
    load_eval_data,
    measure,
)
from polaris_opt.gates import METRICS, evaluate, failed, format_value, measurements, parse_check, parse_checks
from polaris_opt.numerics import run_model
from polaris_opt.output_cache import load_outputs, outputs_key, save_outputs

MODELS = Path(__file__).resolve().parent.parent / "models"

# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text, metric, op, threshold, canonical",
    [
        ("sqnr>=30", "sqnr", ">=", 30.0, "sqnr>=30"),
        ("  top1_drop <= 0.5 ", "top1_drop", "<=", 0.5, "top1_drop<=0.5"),
        ("size_ratio<0.3", "size_ratio", "<", 0.3, "size_ratio<0.3"),
        ("cosine > 0.999", "cosine", ">", 0.999, "cosine>0.999"),
        ("max_abs_err==0", "max_abs_err", "==", 0.0, "max_abs_err==0"),
        ("SQNR>=-3.5e1", "sqnr", ">=", -35.0, "sqnr>=-3.5e1"),
        ("top1>=97", "top1", ">=", 97.0, "top1>=97"),
        ("top1_agreement>=99.5", "top1_agreement", ">=", 99.5, "top1_agreement>=99.5"),
    ],
)
def test_checks_parse_with_or_without_spaces(text, metric, op, threshold, canonical):
    check = parse_check(text)
    assert (check.metric.name, check.op, check.threshold, check.text) == (metric, op, threshold, canonical)


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "expected METRIC OP NUMBER"),
        ("sqnr", "expected METRIC OP NUMBER"),
        ("sqnr 30", "expected METRIC OP NUMBER"),
        ("sqnr=30", "expected METRIC OP NUMBER"),
        ("sqnr=>30", "expected METRIC OP NUMBER"),
        (">=30", "expected METRIC OP NUMBER"),
        ("sqnr >= 30 40", "expected METRIC OP NUMBER"),
        ("snr>=30", "unknown metric 'snr'; metrics: sqnr, cosine, top1_agreement, top1, top1_drop"),
        ("sqnr>=thirty", "'thirty' is not a number"),
        ("sqnr>=30dB", "'30dB' is not a number"),
        ("sqnr>=>30", "'>30' is not a number"),
        ("sqnr>=nan", "must be a finite number"),
        ("size_ratio<=inf", "must be a finite number"),
    ],
)
def test_each_bad_check_is_one_line_of_bad_input(text, says):
    with pytest.raises(BadInput) as error:
        parse_check(text)
    message = str(error.value)
    assert message.startswith(f"--check '{text}': ") and says in message and "\n" not in message


def test_parse_checks_keeps_the_order_and_stops_at_the_first_bad_one():
    assert [c.text for c in parse_checks(["sqnr>=30", "size_ratio<=0.3"])] == ["sqnr>=30", "size_ratio<=0.3"]
    assert parse_checks(None) == []
    with pytest.raises(BadInput, match="'bogus>=1'"):
        parse_checks(["sqnr>=30", "bogus>=1", "also bad"])


def test_label_metrics_are_marked():
    assert {m.name for m in METRICS.values() if m.needs_labels} == {"top1", "top1_drop"}


def test_a_fraction_given_to_a_percent_metric_is_warned_about():
    assert "for 99 % write 'top1_agreement>=99'" in parse_check("top1_agreement>=0.99").warning()
    assert parse_check("top1_agreement>=99").warning() is None
    assert parse_check("cosine>=0.99").warning() is None  # cosine is a fraction


# ---------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    "text, value, passed",
    [
        ("sqnr>=30", 30.0, True),
        ("sqnr>30", 30.0, False),
        ("sqnr>=30", 29.99, False),
        ("sqnr>=30", math.inf, True),  # identical outputs
        ("top1_drop<=0.5", 0.5, True),
        ("top1_drop<0.5", 0.5, False),
        ("top1_drop<=0.5", -1.0, True),  # the optimized model got better
        ("max_abs_err==0", 0.0, True),
        ("max_abs_err==0", 1e-9, False),
        ("cosine>=0.99", None, False),  # not measured: a gate that cannot tell fails
        ("cosine>=0.99", math.nan, False),
    ],
)
def test_gate_verdicts(text, value, passed):
    (gate,) = evaluate([parse_check(text)], {parse_check(text).metric.name: value})
    assert gate.passed is passed


def test_measurements_turn_fractions_into_percent_and_points():
    fidelity = {
        "sqnr_db": 31.5,
        "cosine": 0.999,
        "top1_agreement": 0.985,
        "top1_accuracy": 0.95,
        "top1_accuracy_reference": 0.97,
        "max_abs_error": 0.25,
    }
    measured = measurements(fidelity, size_ratio=0.3)
    assert measured["sqnr"] == 31.5 and measured["cosine"] == 0.999 and measured["max_abs_err"] == 0.25
    assert measured["top1_agreement"] == pytest.approx(98.5)
    assert measured["top1"] == pytest.approx(95.0)
    assert measured["top1_drop"] == pytest.approx(2.0)
    assert measured["size_ratio"] == 0.3
    without_labels = measurements({**fidelity, "top1_accuracy": None}, size_ratio=0.3)
    assert without_labels["top1"] is None and without_labels["top1_drop"] is None
    assert measurements(None, 0.5) == {**dict.fromkeys(measured), "size_ratio": 0.5}


def test_gate_rows_have_the_contract_keys_and_strict_values():
    checks = parse_checks(["sqnr>=30", "size_ratio<=0.3", "cosine>=0.9"])
    gates = evaluate(checks, {"sqnr": math.inf, "size_ratio": 0.31, "cosine": None})
    rows = [gate.as_dict() for gate in gates]
    assert rows == [
        {"check": "sqnr>=30", "metric": "sqnr", "value": None, "passed": True},
        {"check": "size_ratio<=0.3", "metric": "size_ratio", "value": 0.31, "passed": False},
        {"check": "cosine>=0.9", "metric": "cosine", "value": None, "passed": False},
    ]
    assert [gate.check.text for gate in failed(gates)] == ["size_ratio<=0.3", "cosine>=0.9"]


@pytest.mark.parametrize(
    "metric, value, shown",
    [
        ("sqnr", 31.24, "31.2 dB"),
        ("sqnr", math.inf, "∞ dB (exact)"),
        ("cosine", 0.99912345, "0.999123"),
        ("top1_agreement", 99.5, "99.50 %"),
        ("top1_drop", 0.25, "0.25 points"),
        ("size_ratio", 0.30249, "0.3025"),
        ("max_abs_err", None, "not measured"),
    ],
)
def test_values_are_shown_with_their_units(metric, value, shown):
    assert format_value(METRICS[metric], value) == shown


# ------------------------------------------------------------------------------ the --eval data


@pytest.fixture(scope="module")
def mlp() -> onnx.ModelProto:
    return onnx.load(MODELS / "digits_mlp.onnx")


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "names, expected",
    [
        (["input", "labels"], "labels"),
        (["input", "y"], "y"),
        (["input", "labels", "y"], "labels"),
        (["input", "targets"], "targets"),  # the one array not named after an input
        (["input", "targets", "weights"], None),  # two candidates: cannot tell
        (["input"], None),
        (["y"], None),  # an input may be called y
    ],
)
def test_which_array_holds_the_labels(names, expected):
    inputs = ["y"] if names == ["y"] else ["input"]
    assert label_name(dict.fromkeys(names), inputs) == expected


def test_eval_data_with_labels(mlp):
    data = load_eval_data(MODELS / "digits_mlp.eval.npz", mlp)
    assert data.labels.shape == (450,) and data.source.num_samples == 450 and data.trustworthy
    assert data.what == "--eval digits_mlp.eval.npz (450 samples, labels 'labels')"
    batch = next(data.source.batches())
    assert batch["input"].shape == (gate_fidelity.EVAL_BATCH, 64)


def test_eval_labels_may_be_a_column_and_extra_arrays_are_ignored_with_a_warning(mlp, tmp_path):
    x = np.zeros((5, 64), np.float32)
    path = write_npz(
        tmp_path / "e.npz", input=x, y=np.arange(5).reshape(5, 1), note=np.ones(3), ids=np.ones(2)
    )
    data = load_eval_data(path, mlp)
    assert data.labels.tolist() == [0, 1, 2, 3, 4]
    assert data.warnings == [f"--eval {path}: ignoring ids, note (neither a model input nor labels)"]


def test_eval_data_without_labels_measures_agreement_only(mlp, tmp_path):
    path = write_npz(tmp_path / "e.npz", input=np.zeros((3, 64), np.float32))
    assert load_eval_data(path, mlp).labels is None


@pytest.mark.parametrize(
    "arrays, says",
    [
        ({"x": np.zeros((4, 64), np.float32)}, "no array for the model's input 'input' (it holds x)"),
        ({"input": np.zeros((4, 64), np.float64)}, "input 'input' expects float32 [batch, 64], got float64"),
        ({"input": np.zeros((4, 32), np.float32)}, "got float32 (4, 32)"),
        ({"input": np.zeros((4, 64), np.float32), "labels": np.zeros(4)}, "one integer class per sample"),
        ({"input": np.zeros((4, 64), np.float32), "labels": np.zeros((4, 10), int)}, "got int64 (4, 10)"),
        ({"input": np.zeros((4, 64), np.float32), "labels": np.zeros(5, int)}, "5 labels in 'labels' for 4"),
        (
            {"input": np.where(np.arange(256).reshape(4, 64) == 133, np.nan, 0).astype(np.float32)},
            "sample 2 ",
        ),
    ],
)
def test_bad_eval_data_is_refused(mlp, tmp_path, arrays, says):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInput) as error:
        load_eval_data(path, mlp)
    assert str(error.value).startswith(f"--eval {path}") and says in str(error.value)


def test_an_eval_file_that_is_no_npz_is_refused(mlp, tmp_path):
    text = tmp_path / "e.npz"
    text.write_text("labels,input\n")
    single = tmp_path / "one.npy"
    np.save(single, np.zeros(3))
    for path in (text, single, tmp_path / "missing.npz"):
        with pytest.raises(BadInput, match="not a readable .npz"):
            load_eval_data(path, mlp)


def test_data_falls_back_from_eval_to_calibration_to_samples_to_random(mlp, tmp_path):
    from polaris_opt.calib_data import open_calibration

    eval_data = load_eval_data(MODELS / "digits_mlp.eval.npz", mlp)
    calib = open_calibration(str(MODELS / "digits_mlp.calib.npz"), mlp)
    feeds = {"input": np.ones((2, 64), np.float32)}
    assert choose_data(eval_data, calib, feeds, mlp, seed=0) is eval_data
    assert choose_data(None, calib, feeds, mlp, seed=0).what.startswith(
        "the calibration data (digits_mlp.calib"
    )
    assert choose_data(None, None, feeds, mlp, seed=0).what == "the --input samples (2 samples)"
    random = choose_data(None, None, None, mlp, seed=3)
    assert random.what == "random inputs (seed 3, 64 samples)" and not random.trustworthy
    again = next(choose_data(None, None, None, mlp, seed=3).source.batches())["input"]
    assert np.array_equal(next(random.source.batches())["input"], again)  # seeded


# ----------------------------------------------------------------------------------- measuring


def test_compare_pools_every_output_and_catches_a_missing_one():
    ref = {"a": np.array([[1.0, 2.0], [3.0, 1.0]]), "b": np.array([1.0, 1.0])}
    figures, problem = compare(ref, {name: value.copy() for name, value in ref.items()})
    assert problem is None and figures["sqnr_db"] == math.inf and figures["top1_agreement"] == 1.0
    got = {"a": np.array([[1.0, 2.0], [1.0, 3.0]]), "b": np.array([1.0, 1.0])}
    figures, _ = compare(ref, got)
    noise, signal = 8.0, 1 + 4 + 9 + 1 + 1 + 1
    assert figures["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise))
    assert figures["top1_agreement"] == 0.5 and figures["max_abs_error"] == 2.0
    figures, problem = compare(ref, {"a": ref["a"]})
    assert figures["sqnr_db"] is None and "output 'b' is missing" in problem
    figures, problem = compare(ref, {"a": ref["a"][:1], "b": ref["b"]})
    assert figures["cosine"] is None and "(1, 2) in the output model, (2, 2) in the input model" in problem


def test_accuracy_of_logits_against_labels():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    assert accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert accuracy(logits, np.array([1, 0])) is None  # rows and labels disagree


def halved(model_path: Path, folder: Path) -> Path:
    """digits_mlp with its last layer's weights halved: a model that disagrees measurably."""
    model = onnx.load(model_path)
    last = model.graph.initializer[-2]
    weights = onnx.numpy_helper.to_array(last) * 0.5
    last.CopyFrom(onnx.numpy_helper.from_array(weights.astype(np.float32), last.name))
    path = folder / "halved.onnx"
    onnx.save(model, path)
    return path


def test_measure_against_a_numpy_reference_then_from_the_cache(tmp_path, monkeypatch, mlp):
    reference = ModelFile(MODELS / "digits_mlp.onnx", polaris=False)
    candidate = ModelFile(halved(MODELS / "digits_mlp.onnx", tmp_path), polaris=False)
    data = load_eval_data(MODELS / "digits_mlp.eval.npz", mlp)
    first = measure(reference, candidate, data, cache_dir=tmp_path / "cache")
    assert first["cached"] == {"reference": False, "output": False} and first["samples"] == 450
    with np.load(MODELS / "digits_mlp.eval.npz") as archive:
        x, labels = archive["input"], archive["labels"]
    ref = run_model(onnx.load(reference.path), {"input": x})["logits"].astype(np.float64)
    got = run_model(onnx.load(candidate.path), {"input": x})["logits"].astype(np.float64)
    expected_sqnr = 10 * math.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))
    assert first["sqnr_db"] == pytest.approx(expected_sqnr, rel=1e-6)
    assert first["top1_accuracy_reference"] == pytest.approx(np.mean(ref.argmax(1) == labels))
    assert first["top1_accuracy"] == pytest.approx(np.mean(got.argmax(1) == labels))
    assert first["top1_accuracy_reference"] == pytest.approx(0.9778, abs=1e-4)  # models/README.md

    def must_not_run(*args, **kwargs):
        raise AssertionError("a model ran although its outputs were cached")

    monkeypatch.setattr(gate_fidelity, "open_runner", must_not_run)
    second = measure(reference, candidate, data, cache_dir=tmp_path / "cache")
    assert second["cached"] == {"reference": True, "output": True}
    assert {k: v for k, v in second.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"
    }


def test_the_cache_key_follows_model_bytes_and_data(tmp_path, mlp):
    model = ModelFile(MODELS / "digits_mlp.onnx", polaris=False)
    data = load_eval_data(MODELS / "digits_mlp.eval.npz", mlp)
    key = outputs_key(model.digest(), data.source.fingerprint(), "onnxruntime x", threads=1)
    other_data = load_eval_data(write_npz(tmp_path / "e.npz", input=np.zeros((3, 64), np.float32)), mlp)
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(model.path.read_bytes())
    assert outputs_key(ModelFile(copy, False).digest(), data.source.fingerprint(), "onnxruntime x", 1) == key
    assert outputs_key(model.digest(), other_data.source.fingerprint(), "onnxruntime x", 1) != key
    assert outputs_key(model.digest(), data.source.fingerprint(), "onnxruntime y", 1) != key
    assert outputs_key(model.digest(), data.source.fingerprint(), "onnxruntime x", 2) != key
    assert outputs_key(model.digest(), None, "onnxruntime x", 1) is None  # unhashable data: no cache


def test_cached_outputs_round_trip_any_name_and_a_damaged_file_is_ignored(tmp_path):
    outputs = {"/head/Gemm_output_0": np.arange(6, dtype=np.float32).reshape(3, 2), "ids:0": np.array([1, 2])}
    save_outputs(tmp_path, "k" * 32, outputs)
    loaded = load_outputs(tmp_path, "k" * 32)
    assert list(loaded) == list(outputs)
    assert all(np.array_equal(loaded[name], outputs[name]) for name in outputs)
    assert load_outputs(tmp_path, "z" * 32) is None and load_outputs(None, "k" * 32) is None
    (tmp_path / f"outputs-{'k' * 32}.npz").write_bytes(b"truncated")
    assert load_outputs(tmp_path, "k" * 32) is None
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_a_model_file_counts_its_external_data(tmp_path):
    model = onnx.load(MODELS / "digits_mlp.onnx")
    onnx.save(
        model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    file = ModelFile(tmp_path / "m.onnx", polaris=False)
    assert file.files == [tmp_path / "m.onnx", tmp_path / "m.onnx.data"]
    assert file.stored_bytes() == sum(p.stat().st_size for p in file.files)
    before = file.digest()
    data = (tmp_path / "m.onnx.data").read_bytes()
    (tmp_path / "m.onnx.data").write_bytes(data[:-4] + b"\0\0\0\1")
    assert ModelFile(tmp_path / "m.onnx", polaris=False).digest() != before  # the weights are the model
