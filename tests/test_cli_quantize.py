"""`polaris-opt quantize` end to end through the console script: results, replay, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from test_cli_compile import MODELS, one_line_error, polaris

from polaris_opt.fidelity import top1_accuracy
from polaris_opt.numerics import make_session

CNN = MODELS / "digits_cnn.onnx"
CNN_CALIB = MODELS / "digits_cnn.calib.npz"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digits_accuracy(path) -> float:
    with np.load(MODELS / "digits_test.npz") as test:
        return top1_accuracy(make_session(str(path)), [{"input": test["x_cnn"]}], test["y"])


def test_int8_keeps_digits_accuracy_and_reports_fidelity(tmp_path):
    out = tmp_path / "cnn.int8.onnx"
    result = polaris("quantize", CNN, "--int8", "--calib", CNN_CALIB, "--no-cache", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pipeline"].startswith("cleanup,calibrate{method=minmax},quantize{")
    assert report["fidelity"]["sqnr_db"] > 20
    assert any(layer["precision"] == "int8" for layer in report["layers"])
    assert report["output_bytes"] == out.stat().st_size
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert digits_accuracy(CNN) - digits_accuracy(out) <= 0.005


def test_saved_recipe_replays_to_the_same_bytes(tmp_path):
    out, recipe, replay = tmp_path / "q.onnx", tmp_path / "q.yaml", tmp_path / "replay.onnx"
    args = ["--int8", "--calib", CNN_CALIB, "--method", "entropy", "--no-cache", "-q"]
    assert polaris("quantize", CNN, *args, "-o", out, "--save-recipe", recipe).returncode == 0
    result = polaris("compile", CNN, "--recipe", recipe, "--no-cache", "-o", replay, "-q")
    assert result.returncode == 0, result.stderr
    assert digest(out) == digest(replay)


def test_random_calibration_warns(tmp_path):
    result = polaris("quantize", CNN, "--int8", "--calib", "random", "--no-cache", "-o", tmp_path / "r.onnx")
    assert result.returncode == 0, result.stderr
    assert "not trustworthy" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give exactly one of --int8, --fp16 or --int4"),
        (["--int8", "--fp16"], "give exactly one of --int8, --fp16 or --int4"),
        (["--fp16", "--dynamic"], "--dynamic goes with --int8"),
        (["--int8"], "--int8 needs calibration data"),
        (["--int8", "--calib", CNN_CALIB, "--method", "gptq"], "--method for --int8 must be one of"),
        (["--int4", "--method", "entropy"], "--method for --int4 must be one of"),
        (["--int4", "--method", "gptq"], "--int4 --method gptq needs calibration data"),
        (["--int8", "--calib", CNN_CALIB, "--activations", "int16"], "--activations must be uint8 or int8"),
        (["--int8", "--calib", CNN_CALIB, "--max-top1-drop", "1"], "--max-top1-drop needs labelled data"),
        (["--fp16", "--target-sqnr", "30"], "--target-sqnr and --max-top1-drop apply to --int8"),
        (["--int8", "--calib", CNN_CALIB, "--exclude", "a,b"], "--exclude 'a,b'"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "out.onnx"
    before = digest(CNN)
    result = polaris("quantize", CNN, *args, "--no-cache", "-o", out)
    assert result.returncode == 2, result.stderr
    assert message in one_line_error(result)
    assert not out.exists() and digest(CNN) == before


def test_missing_calibration_file_is_bad_input(tmp_path):
    result = polaris("quantize", CNN, "--int8", "--calib", tmp_path / "none.npz", "-o", tmp_path / "o.onnx")
    assert result.returncode == 2
    assert "none.npz" in one_line_error(result)


def test_refuses_to_overwrite_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(CNN.read_bytes())
    result = polaris("quantize", model, "--fp16", "-o", model)
    assert result.returncode == 2
    assert digest(model) == digest(CNN)


def test_an_unreachable_target_writes_the_best_model_and_exits_1(tmp_path):
    out = tmp_path / "best.onnx"
    args = ["--int8", "--calib", CNN_CALIB, "--target-sqnr", "200", "--no-cache", "-o", out]
    result = polaris("quantize", CNN, *args)
    assert result.returncode == 1, result.stderr
    assert "target not reached" in result.stderr and "was not reached" in result.stderr
    assert out.exists() and onnx.load(out).graph.node
