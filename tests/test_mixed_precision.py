"""Mixed precision: a target between all-INT8 and FP32 is met by the fewest sensitive layers in
float, the returned pipeline replays to the same bytes, an unreachable target is flagged, and
bad targets are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ListSource, zoo_source

from polaris_opt.analysis import analyze
from polaris_opt.calib_data import CalibrationSource
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.fidelity import sqnr_db, top1_accuracy
from polaris_opt.mixed_precision import search
from polaris_opt.numerics import make_session, run_model
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline
from polaris_opt.quantization import Mode, QuantizeOptions

MODELS = Path(__file__).resolve().parent.parent / "models"


def replay(model: onnx.ModelProto, text: str, source: CalibrationSource) -> onnx.ModelProto:
    return run_pipeline(model, Pipeline.parse(text), ctx=PassContext(calib=source)).model


def calibration_sqnr(model: onnx.ModelProto, candidate: onnx.ModelProto, source: ListSource) -> float:
    x = np.concatenate([batch["input"] for batch in source.batches()])
    return sqnr_db(run_model(model, {"input": x})["logits"], run_model(candidate, {"input": x})["logits"])


def test_a_target_between_int8_and_fp32_is_reached_and_replays_byte_for_byte():
    model = onnx.load(MODELS / "resnet_s.onnx")
    source = zoo_source("resnet_s", 64)
    sensitivity = analyze(model, source)
    target = sensitivity.full_model["sqnr_db"] + 4.0  # all-INT8 misses it, FP32 (≈135 dB) meets it
    result = search(model, source, target_sqnr=target, sensitivity=sensitivity)

    assert result.reached and result.achieved["sqnr_db"] >= target
    assert 0 < len(result.layers_float) < len(sensitivity.layers)
    assert result.layers_float == sensitivity.ranked_names()[: len(result.layers_float)]
    # The figure is what ONNX Runtime measures on the calibration data.
    assert calibration_sqnr(model, result.model, source) == pytest.approx(
        result.achieved["sqnr_db"], abs=1e-6
    )
    # Bisection: the chosen count holds and one layer fewer did not.
    tried = {step["layers_float"]: step["holds"] for step in result.steps}
    assert tried[len(result.layers_float)] and not tried[len(result.layers_float) - 1]
    assert len(result.steps) <= 2 + int(np.ceil(np.log2(len(sensitivity.layers))))

    precision = {row["name"]: row["precision"] for row in result.layers}
    assert all(precision[name] == "float" for name in result.layers_float)
    assert sum(value == "int8" for value in precision.values()) > 0

    again = replay(model, result.pipeline_text, source)
    assert again.SerializeToString() == result.model.SerializeToString()


def test_a_target_int8_already_meets_keeps_every_layer_int8():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    source = zoo_source("digits_cnn", 64)
    result = search(model, source, options=QuantizeOptions(method="minmax"), target_sqnr=20.0)
    assert result.reached and result.layers_float == [] and len(result.steps) == 1
    assert (
        result.pipeline_text
        == "cleanup,calibrate{method=minmax},quantize{per-channel=true,activations=uint8}"
    )


def test_an_unreachable_target_returns_the_best_candidate_flagged():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    source = zoo_source("digits_cnn", 64)
    result = search(model, source, target_sqnr=200.0)  # beyond even FP32 after BN folding
    assert not result.reached
    assert [step["layers_float"] for step in result.steps] == [0, 3]
    assert len(result.layers_float) == 3 and result.achieved["sqnr_db"] > 100.0
    assert "target 200 dB" in result.describe_shortfall()
    summary = json.loads(json.dumps(result.summary(), allow_nan=False))
    assert summary["reached"] is False and summary["pipeline"] == result.pipeline_text


def test_top1_drop_target_on_labelled_data():
    model = onnx.load(MODELS / "digits_mlp.onnx")
    with np.load(MODELS / "digits_test.npz") as archive:
        inputs, labels = {"input": archive["x_mlp"]}, archive["y"]
    source = zoo_source("digits_mlp", 128)
    # Per-tensor weights and int8 activations lose one test digit of 450 (0.22 points) in all-INT8.
    options = QuantizeOptions(per_channel=False, activations="int8")
    result = search(model, source, options=options, max_top1_drop=0.0, eval_data=(inputs, labels))
    assert result.steps[0]["layers_float"] == 0 and result.steps[0]["top1_drop"] == pytest.approx(100 / 450)
    assert result.reached and result.achieved["top1_drop"] <= 0.0 and len(result.layers_float) >= 1
    fp32 = top1_accuracy(make_session(model), [inputs], labels)
    assert result.achieved["top1_fp32"] == pytest.approx(fp32)
    assert result.achieved["top1"] == pytest.approx(
        top1_accuracy(make_session(result.model), [inputs], labels)
    )
    assert replay(model, result.pipeline_text, source).SerializeToString() == result.model.SerializeToString()


def test_pipeline_text_keeps_float_layers_out_of_bias_correction_too():
    options = QuantizeOptions(
        method="entropy", per_channel=False, activations="int8", bias_correction=True, exclude=("Softmax",)
    )
    text = options.pipeline_text(["/a/Conv", "/b/Gemm"])
    assert text == (
        "cleanup,calibrate{method=entropy},"
        "correct-bias{per-channel=false,exclude=Softmax;/a/Conv;/b/Gemm},"
        "quantize{per-channel=false,activations=int8,exclude=Softmax;/a/Conv;/b/Gemm}"
    )
    assert Pipeline.parse(text).text() == text
    percentile = replace(options, method="percentile", percentile=99.9, bias_correction=False)
    assert percentile.pipeline_text() == (
        "cleanup,calibrate{method=percentile,percentile=99.9},"
        "quantize{per-channel=false,activations=int8,exclude=Softmax}"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs a target"),
        ({"max_top1_drop": 1.0}, "needs labelled data"),
        ({"target_sqnr": float("inf")}, "finite"),
        (
            {"max_top1_drop": -1.0, "eval_data": ({"input": np.zeros((1, 64), np.float32)}, np.zeros(1))},
            "0 or more",
        ),
        ({"target_sqnr": 30.0, "options": QuantizeOptions(exclude=("a,b",))}, "may not"),
        ({"target_sqnr": 30.0, "options": QuantizeOptions(mode=Mode.INT4)}, "starts from INT8"),
    ],
)
def test_bad_targets_and_options_are_bad_input(kwargs, message):
    model = onnx.load(MODELS / "digits_mlp.onnx")
    with pytest.raises(BadInput, match=message):
        search(model, zoo_source("digits_mlp", 32), **kwargs)
