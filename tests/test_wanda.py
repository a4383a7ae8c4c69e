"""Wanda scores: |W_ij|·‖X_j‖₂ against NumPy, per conv group, and what they buy over magnitude."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import ListSource
from onnx import numpy_helper

from polaris_opt.export import to_graph
from polaris_opt.pruning.activations import layer_statistics
from polaris_opt.pruning.patterns import Pattern, select
from polaris_opt.pruning.targets import find_targets
from polaris_opt.pruning.wanda import wanda_scores

RNG = np.random.default_rng(0)


def test_scores_are_weight_magnitude_times_input_norm():
    matrix = RNG.standard_normal((5, 7)).astype(np.float32)
    x = RNG.standard_normal((40, 7))
    scores = wanda_scores(matrix, (x**2).sum(axis=0)[None])
    expected = np.abs(matrix.astype(np.float64)) * np.linalg.norm(x, axis=0)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_each_conv_group_is_scored_with_its_own_norms():
    matrix = RNG.standard_normal((6, 4))  # 3 groups of 2 output channels
    sq_norms = RNG.uniform(0, 5, (3, 4))
    scores = wanda_scores(matrix, sq_norms)
    assert scores.dtype == np.float64
    for row in range(6):
        np.testing.assert_allclose(scores[row], np.abs(matrix[row]) * np.sqrt(sq_norms[row // 2]), rtol=1e-15)


def test_float16_weights_get_float32_scores():
    matrix = RNG.standard_normal((3, 4)).astype(np.float16)
    scores = wanda_scores(matrix, np.ones((1, 4)) * 4)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.abs(matrix.astype(np.float32)) * 2, rtol=1e-7)


def test_wanda_keeps_small_weights_on_large_inputs_and_loses_less_than_magnitude():
    weight = RNG.standard_normal((16, 8)).astype(np.float32)  # MatMul weight [K inputs, N outputs]
    scale = np.ones(16, np.float32)
    scale[:4] = 30.0  # four inputs much larger than the rest
    weight[:4] = 0.2 * np.sign(weight[:4])  # ...times weights below the median |w|: magnitude prunes them
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N,16] x) => (float[N,8] y) <float[16,8] w> '
        "{ y = MatMul(x, w) }"
    )
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    x = RNG.standard_normal((64, 16)).astype(np.float32) * scale
    targets, _ = find_targets(to_graph(model))
    stats = layer_statistics(model, targets, ListSource([{"x": x[:32]}, {"x": x[32:]}]), diagonal_only=True)
    matrix = targets[0].matrix()  # [8 outputs, 16 inputs]
    np.testing.assert_allclose(stats["w"].sq_norms[0], (x.astype(np.float64) ** 2).sum(axis=0), rtol=1e-6)

    by_wanda = select(wanda_scores(matrix, stats["w"].sq_norms), Pattern("unstructured"), 0.5, per_row=True)
    by_magnitude = select(np.abs(matrix), Pattern("unstructured"), 0.5)
    assert by_wanda[:, :4].all() and not by_magnitude[:, :4].any()

    def output_error(keep):
        return np.linalg.norm(x @ (matrix * ~keep).T)

    assert output_error(by_wanda) < 0.5 * output_error(by_magnitude)


@pytest.mark.parametrize(
    ("matrix_shape", "sq_norms", "message"),
    [
        ((4, 6), np.ones((1, 5)), "does not fit"),
        ((4,), np.ones((1, 4)), "does not fit"),
        ((5, 6), np.ones((2, 6)), "cannot be split"),
        ((4, 6), -np.ones((1, 6)), "not negative"),
        ((4, 6), np.full((1, 6), np.nan), "finite"),
    ],
)
def test_bad_arguments_are_refused(matrix_shape, sq_norms, message):
    with pytest.raises(ValueError, match=message):
        wanda_scores(np.ones(matrix_shape, np.float32), sq_norms)
