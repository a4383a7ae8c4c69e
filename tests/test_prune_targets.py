"""Prunable weights: the matrix view of each layer kind, the write-back, and which weights are found."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from polaris_opt.export import to_graph
from polaris_opt.pruning.targets import find_targets

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)


def graph_of(text: str, **initializers: np.ndarray):
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return to_graph(model)


VIEWS = {
    # body, input dims, output dims, weight shape, the matrix view [output features, reduction] in NumPy
    "MatMul": ("[n] y = MatMul(x, w)", [2, 6], [2, 4], (6, 4), lambda w: w.T),
    "Gemm": ("[n] y = Gemm(x, w)", [2, 6], [2, 4], (6, 4), lambda w: w.T),
    "Gemm transB=1": ("[n] y = Gemm<transB=1>(x, w)", [2, 6], [2, 4], (4, 6), lambda w: w),
    "Conv": ("[n] y = Conv(x, w)", [1, 3, 5, 5], [1, 4, 4, 4], (4, 3, 2, 2), lambda w: w.reshape(4, 12)),
    "ConvTranspose": (
        "[n] y = ConvTranspose(x, w)",
        [1, 3, 5, 5],
        [1, 4, 6, 6],
        (3, 4, 2, 2),
        lambda w: w.transpose(1, 0, 2, 3).reshape(4, 12),
    ),
}


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_matrix_view_and_write_back_follow_each_layout_and_keep_the_dtype(kind, dtype):
    body, x_dims, y_dims, shape, view = VIEWS[kind]
    t = "float16" if dtype == np.float16 else "float"
    w = RNG.standard_normal(shape).astype(dtype)
    graph = graph_of(f"g ({t}{x_dims} x) => ({t}{y_dims} y) <{t}{list(shape)} w> {{ {body} }}", w=w)
    (target,), skipped = find_targets(graph)
    assert skipped == []
    matrix = target.matrix()
    np.testing.assert_array_equal(matrix, view(w))
    matrix[0, :] = 0  # a copy: the weight is not touched until set_matrix
    np.testing.assert_array_equal(target.weight.values, w)
    target.set_matrix(matrix)
    assert target.weight.values.dtype == dtype and target.weight.values.shape == shape
    np.testing.assert_array_equal(target.matrix(), matrix)


SHARED = """g (float[2,8] x) => (float[2,8] y) <float[8,8] w, float[8,8] v> {
  [a] h = MatMul(x, w)
  [b] k = MatMul(h, w)
  [c] y = MatMul(k, v) }"""


def test_a_shared_weight_is_one_target_with_every_reader():
    graph = graph_of(SHARED, w=np.ones((8, 8), np.float32), v=np.ones((8, 8), np.float32))
    targets, _ = find_targets(graph)
    assert [(t.name, [n.name for n in t.nodes]) for t in targets] == [("w", ["a", "b"]), ("v", ["c"])]


def test_excluding_one_reader_of_a_shared_weight_excludes_the_weight():
    graph = graph_of(SHARED, w=np.ones((8, 8), np.float32), v=np.ones((8, 8), np.float32))
    targets, skipped = find_targets(graph, exclude=["b"])
    assert [t.name for t in targets] == ["v"]
    assert skipped == [
        {"name": "b", "reason": "excluded"},
        {"name": "a", "reason": "weight 'w' is shared with an excluded node"},
    ]


def test_exclude_patterns_match_node_and_weight_names_and_skip_first_last_drops_the_ends():
    graph = graph_of(SHARED, w=np.ones((8, 8), np.float32), v=np.ones((8, 8), np.float32))
    targets, skipped = find_targets(graph, exclude=["v*"])
    assert [t.name for t in targets] == ["w"] and skipped == [{"name": "c", "reason": "excluded"}]
    targets, skipped = find_targets(graph, skip_first_last=True)
    assert targets == []
    assert [row["name"] for row in skipped] == ["a", "c"]


def test_activation_products_are_not_targets_and_integer_weights_are_skipped_with_a_reason():
    graph = graph_of(
        """g (float[2,8] x, int32[2,8] i) => (float[2,2] y, int32[2,8] j) <int32[8,8] q> {
             t = Transpose(x)
             [scores] y = MatMul(x, t)
             [int] j = MatMul(i, q) }""",
        q=np.ones((8, 8), np.int32),
    )
    targets, skipped = find_targets(graph)
    assert targets == []
    assert skipped == [
        {"name": "int", "reason": "weight is not a float tensor this pass can view as a matrix"}
    ]
