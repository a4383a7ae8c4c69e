"""`polaris-opt prune` end to end through the console script: results, JSON, bad input."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_cli_compile import MODELS, one_line_error, polaris

from polaris_opt.cli import main
from polaris_opt.numerics import run_model
from polaris_opt.report.files import strict

MLP = MODELS / "digits_mlp.onnx"
MLP_CALIB = MODELS / "digits_mlp.calib.npz"
CNN = MODELS / "digits_cnn.onnx"
CNN_CALIB = MODELS / "digits_cnn.calib.npz"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def layer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weighted = ("Conv", "Gemm", "MatMul")
    return {n.name: tensors[n.input[1]] for n in model.graph.node if n.op_type in weighted}


def test_json_document_agrees_with_the_saved_file(tmp_path):
    out, report_file = tmp_path / "mlp.sparse.onnx", tmp_path / "report.json"
    args = [
        "--sparsity",
        "0.9",
        "--calib",
        MLP_CALIB,
        "--batch-size",
        "32",
        "--json",
        "--report",
        report_file,
    ]
    result = polaris("prune", MLP, *args, "-o", out)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    # The shared report keeps the command's result as is (strict JSON: no infinities) under "result".
    report = json.loads(report_file.read_text())
    assert report["polaris_opt_report"] == 1 and report["command"] == "prune"
    assert report["result"] == strict(document)
    for key in ("input", "output", "pipeline", "kind", "changed", "layers", "skipped", "totals", "fidelity"):
        assert key in document
    assert document["pipeline"] == "cleanup,prune{sparsity=0.9,method=magnitude}"
    assert document["output_bytes"] == out.stat().st_size and document["input_bytes"] == MLP.stat().st_size

    # Sparsity counted from the saved file, layer by layer and in total.
    saved = onnx.load(out)
    weights = layer_weights(saved)
    rows = {row["layer"]: row for row in document["layers"]}
    assert set(rows) == set(weights)
    for name, weight in weights.items():
        assert rows[name]["nonzeros_after"] == np.count_nonzero(weight)
        assert rows[name]["sparsity_after"] == pytest.approx(np.mean(weight == 0))
    zeros = sum(int(np.sum(w == 0)) for w in weights.values())
    total = sum(w.size for w in weights.values())
    assert document["totals"]["sparsity_after"] == pytest.approx(zeros / total)

    # Model-output SQNR recomputed with NumPy from ONNX Runtime outputs on the same 8 batches of 32.
    with np.load(MLP_CALIB) as archive:
        feeds = {"input": archive["input"][: 8 * 32]}
    ref = run_model(onnx.load(MLP), feeds)["logits"].astype(np.float64)
    got = run_model(saved, feeds)["logits"].astype(np.float64)
    expected = 10 * math.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))
    assert document["fidelity"]["sqnr_db"] == pytest.approx(expected, abs=1e-3)
    assert document["fidelity"]["data"] == "calibration data"


def test_structured_channels_with_correction_and_eval_on_digits_cnn(tmp_path):
    out = tmp_path / "cnn.ch25.onnx"
    args = ["--structured", "channel", "--sparsity", "0.25", "--correct", "--calib", CNN_CALIB]
    eval_data = MODELS / "digits_cnn.eval.npz"
    result = polaris("prune", CNN, *args, "--eval", eval_data, "--no-cache", "--json", "-o", out)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "channel" and document["groups"]
    # Top-1 before and after, recomputed with ONNX Runtime on the evaluation set.
    with np.load(eval_data) as archive:
        inputs, labels = {"input": archive["input"]}, archive["labels"]
    before = np.mean(run_model(onnx.load(CNN), inputs)["logits"].argmax(axis=1) == labels)
    after = np.mean(run_model(onnx.load(out), inputs)["logits"].argmax(axis=1) == labels)
    assert document["accuracy"]["top1_before"] == pytest.approx(before)
    assert document["accuracy"]["top1_after"] == pytest.approx(after)
    # The file is physically smaller: fewer parameters, as the report says.
    dense_params = sum(w.size for w in layer_weights(onnx.load(CNN)).values())
    pruned_params = sum(w.size for w in layer_weights(onnx.load(out)).values())
    assert pruned_params < dense_params
    assert document["totals"]["params_after"] == pruned_params


def test_table_output_names_the_layers_and_the_pipeline(tmp_path):
    out = tmp_path / "mlp24.onnx"
    result = polaris("prune", MLP, "--pattern", "2:4", "-o", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "digits_mlp.onnx → mlp24.onnx: 3 layers pruned to 50.0% (magnitude, 2:4)"
    for text in ("/fc1/Gemm", "0% → 50.0%", "fidelity on random inputs", "as CSR the pruned weights"):
        assert text in result.stdout
    assert lines[-1] == "cleanup,prune{sparsity=0.5,method=magnitude,pattern=2:4}"


def test_structured_with_nothing_safe_writes_the_input_unchanged(tmp_path):
    out = tmp_path / "same.onnx"
    result = polaris("prune", MLP, "--structured", "channel", "--exclude", "/fc*", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "no safe channel group: model unchanged"
    assert onnx.load(out).graph == onnx.load(MLP).graph


def test_no_cleanup_runs_the_pass_alone(tmp_path):
    out = tmp_path / "raw.onnx"
    result = polaris("prune", CNN, "--no-cleanup", "--sparsity", "0.5", "--json", "-o", out)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["pipeline"] == "prune{sparsity=0.5,method=magnitude}"
    # Without clean-up the BatchNormalizations stay.
    assert any(node.op_type == "BatchNormalization" for node in onnx.load(out).graph.node)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "--sparsity 1.5 is outside [0, 1): give the fraction of weights to remove"),
        (["--sparsity", "1.0"], "--sparsity 1 is outside [0, 1)"),
        (["--sparsity", "-0.1"], "--sparsity -0.1 is outside [0, 1)"),
        (["--method", "wanda"], "--method wanda needs calibration data: give --calib DATA (a .npz, a folder"),
        (["--method", "sparsegpt"], "--method sparsegpt needs calibration data"),
        (["--correct"], "--correct needs calibration data"),
        (["--structured", "channel", "--importance", "taylor"], "--importance taylor needs calibration data"),
        (["--pattern", "2:2"], "--pattern '2:2' is not valid; use 'unstructured', 'N:M'"),
        (["--pattern", "diagonal"], "--pattern 'diagonal' is not valid"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "--sparsity 0.7 conflicts with --pattern 2:4"),
        (
            ["--structured", "channel", "--pattern", "2:4"],
            "--structured channel does not combine with --pattern",
        ),
        (
            ["--structured", "filter", "--method", "wanda"],
            "--structured filter does not combine with --method",
        ),
        (["--structured", "row"], "--structured must be one of channel, filter, head"),
        (["--report", "r.txt"], "--report r.txt: give a .html or .json file name"),
        (["--calib", "missing.npz"], "missing.npz"),
        (["--eval", "missing.npz"], "--eval missing.npz: not a readable .npz"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, args, message):
    # In-process (the same `main` the console script runs): these fail before any model work.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.onnx"
    before = digest(MLP)
    assert main(["prune", str(MLP), *map(str, args), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("polaris-opt: error: ") and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists() and digest(MLP) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_refuses_to_overwrite_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(MLP.read_bytes())
    result = polaris("prune", model, "--sparsity", "0.5", "-o", model)
    assert result.returncode == 2 and "refusing to overwrite the input model" in one_line_error(result)
    assert digest(model) == digest(MLP)


def test_the_recorded_pipeline_replays_to_the_same_bytes(tmp_path):
    out, replay = tmp_path / "pruned.onnx", tmp_path / "replay.onnx"
    result = polaris("prune", CNN, "--sparsity", "0.7", "--pattern", "block:2x2", "--json", "-o", out)
    assert result.returncode == 0, result.stderr
    pipeline = json.loads(result.stdout)["pipeline"]
    assert pipeline == "cleanup,prune{sparsity=0.7,method=magnitude,pattern=block:2x2}"
    assert polaris("compile", CNN, "--pipeline", pipeline, "-o", replay, "-q").returncode == 0
    assert digest(out) == digest(replay)


def test_one_shot_sparsegpt_takes_the_dense_statistics_and_says_so_in_the_pipeline(tmp_path):
    runs = {}
    for flag in ([], ["--one-shot"]):
        out = tmp_path / f"mlp{len(flag)}.onnx"
        args = ["--method", "sparsegpt", "--calib", MLP_CALIB, *flag, "--json", "-o", out]
        result = polaris("prune", MLP, *args)
        assert result.returncode == 0, result.stderr
        runs[bool(flag)] = (json.loads(result.stdout)["pipeline"], layer_weights(onnx.load(out)))
    assert runs[True][0] == "cleanup,prune{sparsity=0.5,method=sparsegpt,sequential=false}"
    assert runs[False][0] == "cleanup,prune{sparsity=0.5,method=sparsegpt}"
    # The first layer reads the graph input either way; the later ones see different inputs.
    first, *later = runs[True][1]
    np.testing.assert_array_equal(runs[True][1][first], runs[False][1][first])
    assert all(not np.array_equal(runs[True][1][n], runs[False][1][n]) for n in later)
