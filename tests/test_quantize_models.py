"""quantize on the model zoo: accuracy of the trained digits models, what ONNX Runtime fuses, and
output SQNR against onnxruntime.quantization.quantize_static given the same calibration data.

Calibration data: the first rows of models/<name>.calib.npz (the digits training split, noise
for the random-weight models); fidelity is measured on other rows, or on the digits test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_quantize import cleaned, fused_ops, quantized

from polaris_opt.fidelity import sqnr_db
from polaris_opt.numerics import make_session, run_model

MODELS = Path(__file__).resolve().parent.parent / "models"
CALIBRATION_ROWS = 32


def calibration(name: str, start: int = 0, rows: int = CALIBRATION_ROWS, batch: int = 16) -> list[dict]:
    with np.load(MODELS / f"{name}.calib.npz") as archive:
        arrays = {key: archive[key][start : start + rows] for key in archive.files}
    return [{key: value[i : i + batch] for key, value in arrays.items()} for i in range(0, rows, batch)]


def zoo(name: str) -> onnx.ModelProto:
    return onnx.load(MODELS / f"{name}.onnx")


def output_sqnr(reference: onnx.ModelProto, model: onnx.ModelProto, feeds: dict) -> float:
    name = reference.graph.output[0].name
    return sqnr_db(run_model(reference, feeds)[name], run_model(model, feeds)[name])


def ort_quantize_static(model: onnx.ModelProto, batches: list[dict], tmp_path: Path) -> onnx.ModelProto:
    """onnxruntime's own QDQ quantizer: per-channel int8 weights, uint8 activations, MinMax."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    onnx.save(model, tmp_path / "float.onnx")
    quantize_static(
        str(tmp_path / "float.onnx"),
        str(tmp_path / "ort.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(tmp_path / "ort.onnx")


@pytest.mark.parametrize(
    ("name", "key", "float_top1"), [("digits_mlp", "x_mlp", 0.9778), ("digits_cnn", "x_cnn", 0.9867)]
)
def test_digits_top1_stays_within_half_a_point(name, key, float_top1):
    out, _ = quantized(zoo(name), calibration(name, rows=128))
    with np.load(MODELS / "digits_test.npz") as test:
        x, labels = test[key], test["y"]
    accuracy = {}
    for label, model in (("float", zoo(name)), ("int8", out)):
        logits = make_session(model).run(None, {"input": x})[0]
        accuracy[label] = float(np.mean(logits.argmax(axis=1) == labels))
    assert accuracy["float"] == pytest.approx(float_top1, abs=1e-4)
    assert accuracy["float"] - accuracy["int8"] <= 0.005


def test_resnet_every_conv_becomes_qlinearconv_and_sqnr_beats_onnxruntime(tmp_path):
    model = zoo("resnet_s")
    batches = calibration("resnet_s")
    out, result = quantized(model, batches)
    ops = fused_ops(out, tmp_path)
    assert ops["QLinearConv"] == 15 and ops["QLinearAdd"] == 6 and ops["QGemm"] == 1
    assert "Conv" not in ops and "Relu" not in ops and "DequantizeLinear" not in ops
    assert result.details["float_ops"] == {}
    feeds = calibration("resnet_s", start=CALIBRATION_ROWS)[0]
    ours = output_sqnr(model, out, feeds)
    theirs = output_sqnr(model, ort_quantize_static(cleaned(model), batches, tmp_path), feeds)
    assert ours >= theirs > 30


def test_digits_cnn_sqnr_beats_onnxruntime(tmp_path):
    model = zoo("digits_cnn")
    batches = calibration("digits_cnn", rows=128)
    out, _ = quantized(model, batches)
    assert fused_ops(out, tmp_path)["QLinearConv"] == 2
    feeds = calibration("digits_cnn", start=128, rows=128)[0]
    theirs = output_sqnr(model, ort_quantize_static(cleaned(model), batches, tmp_path), feeds)
    assert output_sqnr(model, out, feeds) >= theirs


def test_mobilenet_clip_0_6_is_absorbed_into_the_convs(tmp_path):
    model = zoo("mobilenetv2_s")
    out, result = quantized(model, calibration("mobilenetv2_s"))
    assert "Clip" not in {node.op_type for node in out.graph.node}
    assert sum("Clip" in row["reason"] for row in result.details["layers"]) == 15
    ops = fused_ops(out, tmp_path)
    assert ops["QLinearConv"] == 22 and "Conv" not in ops
    assert output_sqnr(model, out, calibration("mobilenetv2_s", start=CALIBRATION_ROWS)[0]) > 25


def test_transformer_matmuls_are_quantized_and_its_sqnr_beats_onnxruntime(tmp_path):
    model = zoo("transformer_s")
    batches = calibration("transformer_s")
    out, result = quantized(model, batches)
    ops = fused_ops(out, tmp_path)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 16 and "MatMul" not in ops
    assert result.details["float_ops"]["LayerNormalization"] == 5
    feeds = calibration("transformer_s", start=CALIBRATION_ROWS)[0]
    ours = output_sqnr(model, out, feeds)
    theirs = output_sqnr(model, ort_quantize_static(cleaned(model), batches, tmp_path), feeds)
    assert ours >= theirs and ours > 30
