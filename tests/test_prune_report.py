"""The pruning report: storage figures, per-layer output SQNR and totals, checked against NumPy."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from helpers import MODELS, ListSource
from onnx import helper, numpy_helper

from polaris_opt.pruning.api import prune
from polaris_opt.pruning.report import Removal, align, csr_bytes, matrix_rows

MLP = MODELS / "digits_mlp.onnx"


def calibration_batches(count: int = 3, batch: int = 16) -> ListSource:
    with np.load(MODELS / "digits_mlp.calib.npz") as archive:
        rows = archive["input"][: count * batch]
    return ListSource([{"input": rows[i : i + batch]} for i in range(0, len(rows), batch)])


def mlp_layers(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(node name, W [out, in], b) of each Gemm (transB=1) in graph order."""
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [
        (node.name, tensors[node.input[1]], tensors[node.input[2]])
        for node in model.graph.node
        if node.op_type == "Gemm"
    ]


def layer_outputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Gemm outputs of the digits MLP computed in NumPy (float64): Gemm, Relu, Gemm, Relu, Gemm."""
    outputs, h = {}, x.astype(np.float64)
    layers = mlp_layers(model)
    for index, (name, weight, bias) in enumerate(layers):
        outputs[name] = h @ weight.T.astype(np.float64) + bias
        h = np.maximum(outputs[name], 0) if index < len(layers) - 1 else outputs[name]
    return outputs


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return 10 * math.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))


def test_csr_bytes_match_the_arrays_csr_stores():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((7, 13)).astype(np.float32) * (rng.random((7, 13)) < 0.3)
    rows, cols = np.nonzero(matrix)
    data = matrix[rows, cols].astype(np.float32)
    indices = cols.astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=7))]).astype(np.int32)
    expected = data.nbytes + indices.nbytes + indptr.nbytes
    assert csr_bytes(int(np.count_nonzero(matrix)), matrix.shape[0]) == expected


@pytest.mark.parametrize(
    "op, attrs, shape, rows",
    [
        ("Conv", {}, [16, 3, 3, 3], 16),
        ("ConvTranspose", {}, [8, 4, 3, 3], 4),
        ("Gemm", {"transB": 1}, [10, 32], 10),
        ("Gemm", {}, [32, 10], 10),
        ("MatMul", {}, [64, 128], 128),
    ],
)
def test_matrix_rows_are_output_features(op, attrs, shape, rows):
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    assert matrix_rows(node, shape) == rows


def test_align_drops_removed_channels_and_heads():
    dense = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    # Channels on axis 1 (NCHW-like): channels 1 and 2 of 4 removed.
    kept = dense[:, [0, 3]]
    ref, got = align(dense, kept, Removal(units=4, removed=(1, 2)))
    assert np.array_equal(ref, kept) and got is kept
    # Heads on the last axis: 6 features are 3 heads of 2; head 1 removed.
    tokens = np.arange(12, dtype=np.float32).reshape(2, 6)
    ref, _ = align(tokens, tokens[:, [0, 1, 4, 5]], Removal(units=3, removed=(1,)))
    assert np.array_equal(ref, tokens[:, [0, 1, 4, 5]])
    same = np.ones((2, 3))
    assert align(same, same, None) == (same, same)
    assert align(dense, kept, None) is None  # shapes differ and nothing says how
    assert align(dense, dense[:, :3], Removal(units=4, removed=(1, 2))) is None  # counts disagree


def test_unstructured_rows_and_totals_match_numpy():
    source = calibration_batches()
    result = prune(MLP, calib=source, sparsity=0.6)
    report = result.report
    dense, pruned = onnx.load(MLP), result.model
    x = np.concatenate([batch["input"] for batch in source.batches()])
    ref, got = layer_outputs(dense, x), layer_outputs(pruned, x)
    rows = {row["layer"]: row for row in report["layers"]}
    nonzeros = 0
    for name, weight, _ in mlp_layers(pruned):
        row = rows[name]
        assert row["nonzeros_after"] == np.count_nonzero(weight)
        assert row["sparsity_after"] == pytest.approx(1 - np.count_nonzero(weight) / weight.size)
        assert row["bytes_before"] == row["bytes_after"] == weight.nbytes
        assert row["csr_bytes"] == 8 * np.count_nonzero(weight) + 4 * (weight.shape[0] + 1)
        assert row["sqnr_db"] == pytest.approx(sqnr(ref[name], got[name]), abs=1e-3)
        nonzeros += np.count_nonzero(weight)
    totals = report["totals"]
    assert totals["nonzeros_after"] == nonzeros
    assert totals["sparsity_after"] == pytest.approx(1 - nonzeros / totals["params_before"])
    last = mlp_layers(dense)[-1][0]  # the logits
    assert report["fidelity"]["sqnr_db"] == pytest.approx(sqnr(ref[last], got[last]), abs=1e-3)
    assert report["fidelity"]["data"] == "calibration data"
    assert totals["model_params_before"] == totals["model_params_after"] == 6570
    # Biases stay: the model's nonzeros drop by exactly what the layers lost.
    drop = totals["model_nonzeros_before"] - totals["model_nonzeros_after"]
    assert drop == totals["nonzeros_before"] - totals["nonzeros_after"]


def test_structured_rows_compare_the_channels_that_remain():
    source = calibration_batches()
    result = prune(MLP, calib=source, structured="channel", sparsity=0.5)
    report = result.report
    assert report["kind"] == "channel" and report["changed"]
    rows = {row["layer"]: row for row in report["layers"]}
    assert [row["layer"] for row in report["layers"]] == ["/fc1/Gemm", "/fc2/Gemm", "/fc3/Gemm"]
    assert rows["/fc1/Gemm"]["shape_before"] == [64, 64] and rows["/fc1/Gemm"]["shape_after"] == [32, 64]
    assert rows["/fc2/Gemm"]["shape_after"] == [16, 32] and rows["/fc2/Gemm"]["params_after"] == 512
    assert rows["/fc2/Gemm"]["bytes_after"] == 512 * 4 and rows["/fc2/Gemm"]["group"] == "/fc2/Gemm"
    # fc1's kept channels see the same input and weights: exactly the dense output.
    assert rows["/fc1/Gemm"]["sqnr_db"] == math.inf
    # fc2: the dense output without the channels its group removed, against the pruned output.
    x = np.concatenate([batch["input"] for batch in source.batches()])
    ref, got = layer_outputs(onnx.load(MLP), x), layer_outputs(result.model, x)
    removed = next(g["removed"] for g in report["groups"] if g["group"] == "/fc2/Gemm")
    kept = [c for c in range(32) if c not in removed]
    expected = sqnr(ref["/fc2/Gemm"][:, kept], got["/fc2/Gemm"])
    assert rows["/fc2/Gemm"]["sqnr_db"] == pytest.approx(expected, abs=1e-3)
    # fc3 keeps its 10 outputs (a graph output): compared whole.
    assert rows["/fc3/Gemm"]["sqnr_db"] == pytest.approx(sqnr(ref["/fc3/Gemm"], got["/fc3/Gemm"]), abs=1e-3)
    totals = report["totals"]
    params_after = sum(w.size + b.size for _, w, b in mlp_layers(result.model))
    assert totals["model_params_after"] == params_after
    assert totals["params_after"] == sum(w.size for _, w, _ in mlp_layers(result.model))
    assert totals["sparsity_after"] == pytest.approx(1 - totals["params_after"] / totals["params_before"])


def test_unchanged_model_report_says_so():
    result = prune(MLP, exclude=["/fc*"])
    report = result.report
    assert report["changed"] is False and report["layers"] == []
    assert report["fidelity"]["sqnr_db"] == math.inf
    assert [row["name"] for row in report["skipped"]] == ["/fc1/Gemm", "/fc2/Gemm", "/fc3/Gemm"]
