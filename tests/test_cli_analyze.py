"""`polaris-opt analyze` through the real console script: --json rows, the ranked table, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CLI = Path(sys.executable).parent / "polaris-opt"
CNN, CNN_CALIB = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.calib.npz"


def polaris(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


def test_json_has_ranked_layers_and_tensor_rows():
    result = polaris("analyze", CNN, "--calib", CNN_CALIB, "--limit", "64", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"] == {
        "method": "minmax",
        "per_channel": True,
        "activations": "uint8",
        "batches": 4,
        "samples": 64,
    }
    layers = report["layers"]
    assert [row["rank"] for row in layers] == [1, 2, 3]
    assert {row["name"] for row in layers} == {"/conv1/Conv", "/conv2/Conv", "/fc/Gemm"}
    assert [row["sqnr_db"] for row in layers] == sorted(row["sqnr_db"] for row in layers)
    assert all(row["sqnr_db"] >= report["full_model"]["sqnr_db"] and row["proxy"] > 0 for row in layers)
    assert report["tensors"][-1]["tensor"] == "logits"
    assert report["tensors"][-1]["sqnr_db"] == pytest.approx(report["full_model"]["sqnr_db"], abs=0.01)


def test_options_reach_the_analysis():
    result = polaris(
        "--json",
        "analyze",
        MODELS / "digits_mlp.onnx",
        "--calib",
        MODELS / "digits_mlp.calib.npz",
        "--method",
        "percentile",
        "--per-tensor",
        "--activations",
        "int8",
        "--batch-size",
        "20",
        "--limit",
        "50",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"] == {
        "method": "percentile",
        "per_channel": False,
        "activations": "int8",
        "batches": 3,
        "samples": 50,
    }


def test_table_is_ranked_and_cut_at_top():
    result = polaris(
        "analyze", MODELS / "resnet_s.onnx", "--calib", MODELS / "resnet_s.calib.npz", "--top", "3"
    )
    assert result.returncode == 0, result.stderr
    assert "most sensitive first" in result.stdout and "… and 13 less sensitive" in result.stdout
    ranks = [
        line.split("│")[1].strip()
        for line in result.stdout.splitlines()
        if "/Conv " in line or "/Gemm " in line
    ]
    assert ranks == ["1", "2", "3"]
    assert "all layers INT8: SQNR" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "analyze needs calibration data: give --calib"),
        (
            ("--calib", CNN_CALIB, "--method", "kl"),
            "--method must be one of minmax, percentile, entropy, mse",
        ),
        (("--calib", CNN_CALIB, "--activations", "int4"), "--activations must be uint8 or int8"),
        (("--calib", MODELS / "missing.npz"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = polaris("analyze", CNN, *args)
    assert result.returncode == 2
    assert message in one_line_error(result)


def test_analyze_help_does_not_import_onnxruntime():
    probe = (
        "import sys\n"
        "from polaris_opt.cli import main\n"
        "main(['analyze', '--help'])\n"
        "print('HEAVY', [m for m in ('onnxruntime', 'pyopencl') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "--calib" in out and "HEAVY []" in out
