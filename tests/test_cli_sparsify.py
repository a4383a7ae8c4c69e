"""`polaris-opt sparsify`: the saved model, the --json document, the table, and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import MODELS, op_counts, run_pass

from polaris_opt.cli import main
from polaris_opt.compiler import run_pipeline
from polaris_opt.numerics import compare_outputs, run_model
from polaris_opt.ops import DOMAIN
from polaris_opt.ops.lowering import lower
from polaris_opt.passes.prune import Prune
from polaris_opt.pipeline import Pipeline


@pytest.fixture(scope="module")
def pruned_cnn(tmp_path_factory):
    """digits_cnn cleaned and pruned to 90 %, saved: what `polaris-opt prune` would hand us."""
    cleaned = run_pipeline(onnx.load(MODELS / "digits_cnn.onnx"), Pipeline.parse("cleanup")).model
    path = tmp_path_factory.mktemp("models") / "cnn90.onnx"
    onnx.save(run_pass(Prune(sparsity=0.9), cleaned), path)
    return path


def digits_inputs() -> dict[str, np.ndarray]:
    with np.load(MODELS / "digits_test.npz") as test:
        return {"input": test["x_cnn"][:64]}


def sparsify(capsys, *args) -> tuple[int, str, str]:
    code = main(["sparsify", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_document_agrees_with_the_saved_model(pruned_cnn, tmp_path, capsys):
    out = tmp_path / "cnn.polaris.onnx"
    code, stdout, stderr = sparsify(capsys, pruned_cnn, "-o", out, "--int8", "--json")
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["pipeline"] == "cleanup,merge-sibling-matmuls{min-sparsity=0.5},sparsify{values=int8}"
    assert document["output_bytes"] == out.stat().st_size < document["input_bytes"]
    saved = onnx.load(out)
    by_name = {node.name: node for node in saved.graph.node if node.domain == DOMAIN}
    assert {row["layer"] for row in document["layers"]} == set(by_name)
    for row in document["layers"]:
        node = by_name[row["layer"]]
        assert node.op_type == row["as"] and row["values"] == "int8"
        fmt = next(a.s.decode() for a in node.attribute if a.name == "format")
        assert row["format"].split()[0] == fmt and row["bytes_after"] < row["bytes_before"]
    totals = document["totals"]
    assert totals["sparse"] == 3 and totals["bytes_after"] < totals["bytes_before"] / 8
    assert totals["bytes_after"] == sum(row["bytes_after"] for row in document["layers"])
    # Lowered back to standard ONNX, the int8 model stays close to the pruned one.
    feeds = digits_inputs()
    expected = run_model(onnx.load(pruned_cnn), feeds)["logits"]
    got = run_model(lower(saved), feeds)["logits"]
    assert np.mean(expected.argmax(1) == got.argmax(1)) >= 0.95


def test_table_names_each_layer_and_its_format(pruned_cnn, tmp_path, capsys):
    code, stdout, _ = sparsify(capsys, pruned_cnn, "-o", tmp_path / "out.onnx", "--profile", "polaris")
    assert code == 0
    # Rich folds long cells at 80 columns: look for short pieces.
    for text in ("/conv1/Conv", "/conv2/Conv", "/fc/Gemm", "SparseConv", "fp32", "profile polaris"):
        assert text in stdout
    assert "cleanup,merge-sibling-matmuls{min-sparsity=0.5},sparsify{profile=polaris}" in stdout


def test_onnxruntime_target_writes_a_smaller_model_stock_ort_runs(pruned_cnn, tmp_path, capsys):
    out = tmp_path / "cnn.coo.onnx"
    code, stdout, _ = sparsify(capsys, pruned_cnn, "-o", out, "--target", "onnxruntime", "--json")
    assert code == 0
    document = json.loads(stdout)
    assert document["output_bytes"] < 0.5 * document["input_bytes"]
    saved = onnx.load(out)
    assert "Constant" in op_counts(saved) and not any(node.domain == DOMAIN for node in saved.graph.node)
    feeds = digits_inputs()
    assert not compare_outputs(run_model(onnx.load(pruned_cnn), feeds), run_model(saved, feeds))


def test_exclude_and_min_sparsity_reach_the_pass(pruned_cnn, tmp_path, capsys):
    args = [
        "--exclude",
        "/fc/*",
        "--exclude",
        "/conv1/Conv",
        "--min-sparsity",
        "0.8",
        "--json",
        "--no-cleanup",
    ]
    code, stdout, _ = sparsify(capsys, pruned_cnn, "-o", tmp_path / "out.onnx", *args)
    assert code == 0
    document = json.loads(stdout)
    assert document["pipeline"] == (
        "merge-sibling-matmuls{min-sparsity=0.8,exclude=/fc/*;/conv1/Conv},"
        "sparsify{min-sparsity=0.8,exclude=/fc/*;/conv1/Conv}"
    )
    assert [row["layer"] for row in document["layers"]] == ["/conv2/Conv"]
    assert {row["name"] for row in document["skipped"]} == {"/fc/Gemm", "/conv1/Conv"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-sparsity", "1.5"], "min-sparsity 1.5 is outside [0, 1]"),
        (["--min-sparsity", "-0.2"], "min-sparsity -0.2 is outside [0, 1]"),
        (["--format", "coo"], "expected one of auto, csr, bsr, sell, got 'coo'"),
        (["--int8", "--fp16"], "at most one of --int8 and --fp16"),
        (["--profile", "gfx803"], "unknown device profile 'gfx803'"),
        (["--target", "onnxruntime", "--int8"], "values=int8 needs target=polaris"),
        (["--target", "tensorrt"], "expected one of polaris, onnxruntime"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(pruned_cnn, tmp_path, capsys, args, message):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = sparsify(capsys, pruned_cnn, "-o", out, *args)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_model_is_bad_input(tmp_path, capsys):
    code, _, stderr = sparsify(capsys, tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx")
    assert code == 2 and "no such file" in stderr and not (tmp_path / "out.onnx").exists()
