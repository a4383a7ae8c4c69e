"""Sensitivity analysis: the ranking, single-layer SQNR against an independent ONNX Runtime
measurement, the second-order proxy against NumPy, the per-tensor rows, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ListSource, zoo_source
from onnx import numpy_helper

from polaris_opt.analysis import analyze
from polaris_opt.capture import with_outputs
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.fidelity import sqnr_db
from polaris_opt.numerics import run_model
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline
from polaris_opt.quant_params import fake_quantize_weight

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def digits_cnn():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    source = zoo_source("digits_cnn", 96)
    return model, source, analyze(model, source)


def test_layers_are_ranked_worst_first(digits_cnn):
    _, _, report = digits_cnn
    assert {layer.name for layer in report.layers} == {"/conv1/Conv", "/conv2/Conv", "/fc/Gemm"}
    assert [layer.rank for layer in report.layers] == [1, 2, 3]
    sqnrs = [layer.sqnr_db for layer in report.layers]
    assert sqnrs == sorted(sqnrs)
    assert report.ranked_names() == [layer.name for layer in report.layers]
    assert all(0.999 < layer.cosine <= 1.0 for layer in report.layers)


def test_one_layer_alone_loses_less_than_the_whole_model(digits_cnn):
    _, _, report = digits_cnn
    full = report.full_model["sqnr_db"]
    assert 30.0 < full < 60.0
    assert all(layer.sqnr_db >= full for layer in report.layers)


def test_single_layer_sqnr_matches_an_independent_measurement(digits_cnn):
    # The Gemm writes the logits directly (no activation after it): quantize{include=/fc/Gemm}
    # through pipeline text, run in ONNX Runtime, compared with the FP32 model.
    model, source, report = digits_cnn
    ctx = PassContext(calib=source)
    text = "cleanup,calibrate{method=minmax},quantize{include=/fc/Gemm}"
    single = run_pipeline(model, Pipeline.parse(text), ctx=ctx).model
    x = np.concatenate([batch["input"] for batch in source.batches()])
    expected = sqnr_db(run_model(model, {"input": x})["logits"], run_model(single, {"input": x})["logits"])
    got = next(layer for layer in report.layers if layer.name == "/fc/Gemm").sqnr_db
    assert got == pytest.approx(expected, abs=1e-6)


def test_proxy_matches_numpy_for_one_layer(digits_cnn):
    model, source, report = digits_cnn
    cleaned = run_pipeline(model, Pipeline.parse("cleanup")).model
    gemm = next(node for node in cleaned.graph.node if node.name == "/fc/Gemm")
    weight = next(numpy_helper.to_array(t) for t in cleaned.graph.initializer if t.name == gemm.input[1])
    exposed = with_outputs(cleaned, [gemm.input[0]])
    energy = sum(
        np.sum(np.square(run_model(exposed, batch)[gemm.input[0]], dtype=np.float64))
        for batch in source.batches()
    )
    delta = weight.astype(np.float64) - fake_quantize_weight(weight, 0)  # transB = 1: rows are outputs
    expected = energy * np.sum(delta**2) / weight.size
    got = next(layer for layer in report.layers if layer.name == "/fc/Gemm").proxy
    assert got == pytest.approx(expected, rel=1e-9)


def test_per_tensor_rows_follow_the_error_through_the_model(digits_cnn):
    _, _, report = digits_cnn
    names = [row.tensor for row in report.tensors]
    assert names == [
        "input",
        "/relu1/Relu_output_0",
        "/relu2/Relu_output_0",
        "/pool/MaxPool_output_0",
        "/Flatten_output_0",
        "logits",
    ]
    by_name = {row.tensor: row for row in report.tensors}
    # The logits row is the model output: the same figure as the full-model SQNR.
    assert by_name["logits"].sqnr_db == pytest.approx(report.full_model["sqnr_db"], abs=0.01)
    # Quantizing the input is a rounding of a few steps in 256: well above the layers' error.
    assert by_name["input"].sqnr_db > by_name["/relu2/Relu_output_0"].sqnr_db > 20.0
    data = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert len(data["layers"]) == 3 and len(data["tensors"]) == 6


def test_resnet_is_ranked_in_seconds():
    model = onnx.load(MODELS / "resnet_s.onnx")
    report = analyze(model, zoo_source("resnet_s", 32), threads=2)
    assert len(report.layers) == 16  # 15 Conv + the Gemm head
    full = report.full_model["sqnr_db"]
    assert all(layer.sqnr_db >= full for layer in report.layers)
    assert all(math.isfinite(layer.proxy) and layer.proxy > 0 for layer in report.layers)
    assert len(report.tensors) > 20 and report.settings["samples"] == 32


def test_activation_times_activation_matmul_has_no_proxy():
    # transformer_s: attention's Q·Kᵀ and P·V have no weight; they are still ranked.
    model = onnx.load(MODELS / "transformer_s.onnx")
    report = analyze(model, zoo_source("transformer_s", 8, batch=8), per_channel=False, activations="int8")
    no_weight = [layer for layer in report.layers if math.isnan(layer.proxy)]
    assert len(no_weight) == 4 and all(layer.op == "MatMul" for layer in no_weight)
    rows = report.as_dict()["layers"]
    assert sum(row["proxy"] is None for row in rows) == 4
    assert report.settings["per_channel"] is False and report.settings["activations"] == "int8"


def test_layer_names_the_pipeline_text_cannot_hold_are_analyzed():
    model = onnx.load(MODELS / "digits_mlp.onnx")
    model.graph.node[0].name = "fc 1,{first}"
    report = analyze(model, zoo_source("digits_mlp", 64))
    assert "fc 1,{first}" in report.ranked_names()


def test_no_calibration_batches_is_bad_input():
    model = onnx.load(MODELS / "digits_mlp.onnx")
    with pytest.raises(BadInput, match="no batches"):
        analyze(model, ListSource([]))
