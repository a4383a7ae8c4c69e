"""`polaris_opt.quantize`, the Python API: modes, calibration readers, reports and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import polaris_opt
from polaris_opt.errors import BadInput
from polaris_opt.numerics import run_model
from polaris_opt.quantization import QuantizeOptions, load_eval_data

MODELS = Path(__file__).resolve().parent.parent / "models"


def calib(name: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{name}.calib.npz") as archive:
        return {key: archive[key] for key in archive.files}


def test_int8_from_a_dict_of_arrays_reports_layers_and_fidelity():
    result = polaris_opt.quantize(str(MODELS / "digits_mlp.onnx"), calib("digits_mlp"), mode="int8")
    assert isinstance(result.model, onnx.ModelProto)
    report = result.report
    assert report["pipeline"] == result.pipeline
    assert report["fidelity"]["data"] == "the first 8 batches of the calibration data"  # 16 batches given
    assert report["fidelity"]["sqnr_db"] > 20
    assert [layer["op"] for layer in report["layers"] if layer["precision"] == "int8"] == ["Gemm"] * 3
    assert report["output_bytes"] < 0.5 * report["input_bytes"]  # a tiny model: names and scales weigh


def test_an_onnxruntime_calibration_data_reader_works_unchanged():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            data = calib("digits_mlp")["input"]
            self.batches = iter([{"input": data[i : i + 32]} for i in range(0, len(data), 32)])

        def get_next(self):
            return next(self.batches, None)

    from_reader = polaris_opt.quantize(str(MODELS / "digits_mlp.onnx"), Reader(), mode="int8")
    from_arrays = polaris_opt.quantize(
        str(MODELS / "digits_mlp.onnx"), calib("digits_mlp"), mode="int8", batch_size=32
    )
    feeds = {"input": calib("digits_mlp")["input"][:8]}
    np.testing.assert_array_equal(
        run_model(from_reader.model, feeds)["logits"], run_model(from_arrays.model, feeds)["logits"]
    )


def test_dynamic_and_fp16_need_no_calibration_and_say_where_fidelity_came_from():
    for mode in ("int8-dynamic", "fp16"):
        result = polaris_opt.quantize(str(MODELS / "transformer_s.onnx"), mode=mode)
        assert result.report["fidelity"]["data"] == "random inputs"
        assert result.report["fidelity"]["sqnr_db"] > 20, mode


def test_eval_data_reports_the_top1_drop():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    with np.load(MODELS / "digits_test.npz") as test:
        eval_data = ({"input": test["x_cnn"]}, test["y"])
    result = polaris_opt.quantize(model, calib("digits_cnn"), mode="int8", eval_data=eval_data)
    accuracy = result.report["accuracy"]
    assert accuracy["top1_before"] == pytest.approx(0.9867, abs=1e-3)
    assert accuracy["top1_drop"] <= 0.5


def test_options_become_the_pipeline_text():
    options = QuantizeOptions(method="percentile", percentile=99.9, per_channel=False, exclude=("fc",))
    assert options.pipeline_text() == (
        "cleanup,calibrate{method=percentile,percentile=99.9},"
        "quantize{per-channel=false,activations=uint8,exclude=fc}"
    )
    assert QuantizeOptions(mode=polaris_opt.quantization.Mode.INT4).pipeline_text() == (
        "cleanup,quantize-int4{block-size=32,symmetric=true,method=rtn}"
    )


def test_unknown_option_names_are_a_type_error():
    with pytest.raises(TypeError, match="unknown options"):
        polaris_opt.quantize(str(MODELS / "digits_mlp.onnx"), mode="fp16", colour="blue")


def test_eval_files_are_checked(tmp_path):
    model = onnx.load(MODELS / "digits_mlp.onnx")
    np.savez(tmp_path / "no_labels.npz", input=np.zeros((4, 64), np.float32))
    with pytest.raises(BadInput, match="needs a 'labels' array"):
        load_eval_data(tmp_path / "no_labels.npz", model)
    np.savez(tmp_path / "short.npz", input=np.zeros((4, 64), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(BadInput, match="input 'input' has 4 rows for 3 labels"):
        load_eval_data(tmp_path / "short.npz", model)
