"""Layer input statistics: Conv im2col against ONNX Runtime's Conv, XᵀX against X computed
directly in float64 (also on every resnet_s layer, since chunks are multiplied in float32),
shared weights, X_refᵀX against a reference model and the least-squares fit to it, streaming
memory, progress, and what is left out."""

from __future__ import annotations

import tracemalloc
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
from helpers import MODELS, ListSource, zoo_source
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.calib_data import CalibrationSource
from polaris_opt.capture import with_outputs
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.hessian import collect_hessians
from polaris_opt.numerics import run_model
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline
from polaris_opt.pruning.activations import ConvGeometry, LayerStats, fit_to_reference, layer_statistics
from polaris_opt.pruning.targets import find_targets

RNG = np.random.default_rng(0)
# Each chunk's XᵀX is a float32 product added to a float64 sum: the result must stay this close
# to XᵀX computed in float64, relative to the whole matrix (Frobenius norm).
GRAM_RTOL = 1e-5


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def one_node_model(node: onnx.NodeProto, inputs: dict[str, list], weights: dict[str, np.ndarray]):
    """A model of `node` alone: float inputs of the given shapes, `weights` as initializers."""
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None) for out in node.output],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def model_from_text(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>' + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def statistics(model: onnx.ModelProto, batches: list[dict], **options):
    targets, _ = find_targets(to_graph(model))
    return targets, layer_statistics(model, targets, ListSource(batches), **options)


def gram_error(found: np.ndarray, expected: np.ndarray) -> float:
    """‖found - expected‖ / ‖expected‖ (Frobenius)."""
    return float(np.linalg.norm(found - expected) / np.linalg.norm(expected))


# ---------------------------------------------------------------------------- Conv im2col

CONVS = {
    "plain": (dict(), 4, 3, (3, 3), (9, 9)),
    "pads": (dict(pads=[1, 2, 0, 1]), 4, 3, (3, 3), (9, 8)),
    "strides": (dict(strides=[2, 3], pads=[1, 1, 1, 1]), 4, 3, (3, 3), (10, 11)),
    "dilations": (dict(dilations=[2, 1], pads=[2, 1, 2, 1]), 4, 3, (3, 3), (9, 9)),
    "groups": (dict(group=2, pads=[1, 1, 1, 1]), 6, 4, (3, 3), (7, 7)),
    "depthwise": (dict(group=5, pads=[1, 1, 1, 1], strides=[2, 2]), 5, 5, (3, 3), (8, 8)),
    "same_upper": (dict(auto_pad="SAME_UPPER", strides=[2, 2]), 4, 3, (4, 3), (9, 8)),
    "same_lower": (dict(auto_pad="SAME_LOWER", strides=[2, 1]), 4, 3, (2, 3), (9, 8)),
    "valid": (dict(auto_pad="VALID", strides=[2, 2]), 4, 3, (3, 2), (9, 8)),
    "1d": (dict(pads=[1, 2], strides=[2], dilations=[2]), 4, 3, (3,), (17,)),
    "pointwise": (dict(), 8, 6, (1, 1), (5, 5)),
}


@pytest.mark.parametrize("case", CONVS)
def test_im2col_times_the_matrix_view_is_onnx_runtime_conv(case):
    attrs, out_channels, in_channels, kernel, spatial = CONVS[case]
    group = attrs.get("group", 1)
    weight = floats(out_channels, in_channels // group, *kernel)
    x = floats(2, in_channels, *spatial)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    model = one_node_model(node, {"x": list(x.shape)}, {"w": weight})
    expected = run_model(model, {"x": x})["y"]

    geometry = ConvGeometry.of(to_graph(model).nodes[0], weight.shape)
    columns = geometry.im2col(x)  # [rows, group, K]
    matrix = weight.reshape(group, out_channels // group, -1)  # group g's rows of the matrix view
    rows = np.concatenate([columns[:, g] @ matrix[g].T for g in range(group)], axis=1)
    got = np.moveaxis(rows.reshape(x.shape[0], *expected.shape[2:], out_channels), -1, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_statistics_are_the_im2col_gram_matrix_per_group():
    weight = floats(6, 2, 3, 3)
    model = model_from_text(
        """g (float[N,4,7,7] x) => (float[N,6,7,7] y) <float[6,2,3,3] w> {
            y = Conv<group=2, pads=[1,1,1,1]>(x, w) }""",
        w=weight,
    )
    batches = [{"x": floats(3, 4, 7, 7)}, {"x": floats(2, 4, 7, 7)}]
    targets, stats = statistics(model, batches)
    geometry = ConvGeometry.of(targets[0].node, weight.shape)
    columns = np.concatenate([geometry.im2col(b["x"]) for b in batches]).astype(np.float64)
    found = stats["w"]
    assert found.hessian.shape == (2, 18, 18) and found.rows == 5 * 49
    for g in range(2):
        assert gram_error(found.hessian[g], columns[:, g].T @ columns[:, g]) < GRAM_RTOL
        np.testing.assert_allclose(found.sq_norms[g], (columns[:, g] ** 2).sum(axis=0), rtol=1e-10)


# -------------------------------------------------------------------------- MatMul / Gemm


def test_matmul_hessians_equal_xtx_of_the_layer_inputs():
    w1, w2 = floats(8, 5), floats(5, 3)
    model = model_from_text(
        """g (float[N,4,8] x) => (float[N,4,3] y) <float[8,5] w1, float[5,3] w2> {
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2) }""",
        w1=w1,
        w2=w2,
    )
    batches = [{"x": floats(3, 4, 8)} for _ in range(3)]
    _, stats = statistics(model, batches)
    x = np.concatenate([b["x"].reshape(-1, 8) for b in batches]).astype(np.float64)
    hidden = np.maximum(np.concatenate([b["x"] @ w1 for b in batches]).reshape(-1, 5), 0).astype(np.float64)
    for name, inputs in (("w1", x), ("w2", hidden)):
        assert stats[name].rows == 36
        np.testing.assert_allclose(stats[name].hessian[0], inputs.T @ inputs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats[name].sq_norms[0], np.diag(inputs.T @ inputs), rtol=1e-5)
    # The same numbers as the shared GPTQ Hessians (polaris_opt.hessian).
    shared = collect_hessians(model, batches, ["x", "r"])
    assert gram_error(stats["w1"].hessian[0], shared["x"][0]) < GRAM_RTOL
    assert gram_error(stats["w2"].hessian[0], shared["r"][0]) < GRAM_RTOL


def test_gemm_transposed_input_and_weight():
    weight = floats(3, 6)  # transB=1: the matrix view is the weight itself, K = 6
    model = model_from_text(
        """g (float[6,N] a) => (float[N,3] y) <float[3,6] w> {
            y = Gemm<transA=1, transB=1>(a, w) }""",
        w=weight,
    )
    a = floats(6, 10)
    _, stats = statistics(model, [{"a": a}])
    x = a.T.astype(np.float64)  # transA=1: every column of A is one row of X
    assert gram_error(stats["w"].hessian[0], x.T @ x) < GRAM_RTOL
    assert stats["w"].rows == 10


def test_a_shared_weight_sums_what_each_reader_sees():
    model = model_from_text(
        """g (float[N,5] a, float[N,5] b) => (float[N,4] y, float[N,4] z) <float[5,4] w> {
            y = MatMul(a, w)
            z = MatMul(b, w) }""",
        w=floats(5, 4),
    )
    batch = {"a": floats(7, 5), "b": floats(3, 5) * 10}
    targets, stats = statistics(model, [batch])
    assert len(targets) == 1 and len(targets[0].nodes) == 2
    a, b = batch["a"].astype(np.float64), batch["b"].astype(np.float64)
    assert gram_error(stats["w"].hessian[0], a.T @ a + b.T @ b) < GRAM_RTOL
    assert stats["w"].rows == 10


def test_zoo_cnn_statistics_cover_every_layer_with_the_right_row_counts():
    dense = onnx.load(MODELS / "digits_cnn.onnx")
    model = run_pipeline(dense, Pipeline.parse("cleanup"), ctx=PassContext()).model
    targets, _ = find_targets(to_graph(model))
    stats = layer_statistics(model, targets, zoo_source("digits_cnn", 64))
    assert set(stats) == {t.name for t in targets}
    for target in targets:
        found = stats[target.name]
        k = target.matrix().shape[1]
        assert found.hessian.shape == (1, k, k) and np.all(np.isfinite(found.hessian))
        # Σx² is summed in float64, the diagonal of XᵀX comes from float32 products.
        np.testing.assert_allclose(np.diagonal(found.hessian[0]), found.sq_norms[0], rtol=1e-5)
        if target.op == "Conv":  # one row per output pixel of every sample
            assert found.rows % 64 == 0 and found.rows > 64
        else:
            assert found.rows == 64


def test_float32_chunk_products_stay_within_1e_5_of_float64_on_every_resnet_layer():
    model = run_pipeline(
        onnx.load(MODELS / "resnet_s.onnx"), Pipeline.parse("cleanup"), ctx=PassContext()
    ).model
    targets, _ = find_targets(to_graph(model))
    source = zoo_source("resnet_s", 32, 16)
    stats = layer_statistics(model, targets, source)
    assert set(stats) == {t.name for t in targets} and len(targets) == 16
    inputs = {t.name: t.layer_input().name for t in targets}
    captured = [
        {**b, **run_model(with_outputs(model, sorted(set(inputs.values()))), b)} for b in source.batches()
    ]
    for target in targets:
        values = [c[inputs[target.name]] for c in captured]
        if target.op == "Conv":
            geometry = ConvGeometry.of(target.node, target.weight.values.shape)
            x = np.concatenate([geometry.im2col(v) for v in values])[:, 0].astype(np.float64)
        else:
            x = np.concatenate(values).astype(np.float64)
        assert gram_error(stats[target.name].hessian[0], x.T @ x) < GRAM_RTOL, target.name


# -------------------------------------------------------------------------- memory, progress


class GeneratedSource(CalibrationSource):
    """`count` batches made on demand, so the data itself never sits in memory at once."""

    def __init__(self, count: int, shape: tuple[int, ...]):
        self.count, self.shape = count, shape

    def batches(self):
        rng = np.random.default_rng(1)
        return ({"x": rng.standard_normal(self.shape).astype(np.float32)} for _ in range(self.count))

    @property
    def num_batches(self) -> int:
        return self.count


def peak_bytes(model, source, **options) -> int:
    targets, _ = find_targets(to_graph(model))
    tracemalloc.start()
    try:
        layer_statistics(model, targets, source, **options)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


MLP = """g (float[N,256] x) => (float[N,2] y) <float[256,256] w1, float[256,2] w2> {
    h = MatMul(x, w1)
    y = MatMul(h, w2) }"""


def test_memory_does_not_grow_with_the_number_of_batches():
    model = model_from_text(MLP, w1=floats(256, 256), w2=floats(256, 2))
    few = peak_bytes(model, GeneratedSource(3, (256, 256)))
    many = peak_bytes(model, GeneratedSource(30, (256, 256)))
    # Keeping batches would add 30 × (input + hidden) = 15 MB; the statistics themselves are 1 MB.
    assert many < few * 1.3 + 200_000, (few, many)


def test_diagonal_only_never_allocates_k_by_k():
    k = 4096  # K×K float64 would be 134 MB
    model = model_from_text(
        f"""g (float[N,{k}] x) => (float[N,2] y) <float[{k},2] w> {{ y = MatMul(x, w) }}""", w=floats(k, 2)
    )
    batches = GeneratedSource(2, (16, k))
    peak = peak_bytes(model, batches, diagonal_only=True)
    assert peak < 8_000_000, peak
    targets, _ = find_targets(to_graph(model))
    found = layer_statistics(model, targets, batches, diagonal_only=True)["w"]
    assert found.hessian is None and found.rows == 32
    x = np.concatenate([b["x"] for b in batches.batches()]).astype(np.float64)
    np.testing.assert_allclose(found.sq_norms[0], (x**2).sum(axis=0), rtol=1e-10)


def test_a_progress_bar_advances_once_per_batch():
    seen = []

    @contextmanager
    def progress(description, total):
        seen.append([description, total, 0])
        yield lambda n=1: seen[-1].__setitem__(2, seen[-1][2] + n)

    model = model_from_text(MLP, w1=floats(256, 256), w2=floats(256, 2))
    targets, _ = find_targets(to_graph(model))
    layer_statistics(model, targets, GeneratedSource(5, (4, 256)), progress=progress)
    assert seen == [["collecting layer statistics", 5, 5]]


# ------------------------------------------------------------- reference model (sequential pruning)

TWO_CONVS = """g (float[N,4,6,6] x) => (float[N,6,6,6] y) <float[8,4,3,3] w1, float[6,4,3,3] w2> {
    h = Conv<pads=[1,1,1,1]>(x, w1)
    r = Relu(h)
    y = Conv<group=2, pads=[1,1,1,1]>(r, w2) }"""


def test_cross_statistics_pair_each_row_with_the_same_row_in_the_reference_model():
    w1, w2 = floats(8, 4, 3, 3), floats(6, 4, 3, 3)
    model = model_from_text(TWO_CONVS, w1=np.where(np.abs(w1) > 0.5, w1, 0), w2=w2)  # w1 "pruned"
    reference = model_from_text(TWO_CONVS, w1=w1, w2=w2)
    batches = [{"x": floats(3, 4, 6, 6)}, {"x": floats(2, 4, 6, 6)}]
    targets, _ = find_targets(to_graph(model))
    stats = layer_statistics(model, targets, ListSource(batches), reference=reference)

    # The first conv reads the graph input, the same in both models: X_refᵀX is XᵀX.
    np.testing.assert_array_equal(stats["w1"].cross, stats["w1"].hessian)
    geometry = ConvGeometry.of(targets[1].node, w2.shape)

    def columns(m):
        return np.concatenate([geometry.im2col(run_model(with_outputs(m, ["r"]), b)["r"]) for b in batches])

    x, x_reference = columns(model).astype(np.float64), columns(reference).astype(np.float64)
    assert stats["w2"].cross.shape == (2, 36, 36) and stats["w2"].rows == 5 * 36
    for g in range(2):
        assert gram_error(stats["w2"].hessian[g], x[:, g].T @ x[:, g]) < GRAM_RTOL
        assert gram_error(stats["w2"].cross[g], x_reference[:, g].T @ x[:, g]) < GRAM_RTOL
    assert gram_error(stats["w2"].cross[0], stats["w2"].hessian[0]) > 0.01  # the inputs do differ


def test_a_reference_needs_the_full_matrix_and_finite_activations():
    model = model_from_text(MLP, w1=floats(256, 256), w2=floats(256, 2))
    broken = model_from_text(MLP, w1=np.full((256, 256), np.inf, np.float32), w2=floats(256, 2))
    targets, _ = find_targets(to_graph(model))
    source = ListSource([{"x": floats(4, 256)}])
    with pytest.raises(ValueError, match="diagonal_only=False"):
        layer_statistics(model, targets, source, reference=model, diagonal_only=True)
    with pytest.raises(BadInput, match="'h' \\(input of node .*NaN or Inf"):
        layer_statistics(model, targets, source, reference=broken)


def layer_stats(x: np.ndarray, x_reference: np.ndarray) -> LayerStats:
    """The statistics of rows x [rows, groups, K], with x_reference the same rows in a reference model."""
    hessian = np.einsum("rgk,rgl->gkl", x, x)
    cross = np.einsum("rgk,rgl->gkl", x_reference, x)
    return LayerStats(hessian, np.einsum("rgk,rgk->gk", x, x), x.shape[0], cross)


def test_fit_to_reference_is_the_damped_least_squares_map_to_the_reference_outputs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 2, 5))
    x_reference = x + 0.3 * rng.standard_normal((40, 2, 5))
    matrix = rng.standard_normal((6, 5))  # two groups of three output rows
    got = fit_to_reference(matrix, layer_stats(x, x_reference), damp=0.05)
    for g in range(2):
        w = matrix[3 * g : 3 * g + 3]
        lam = 0.05 * np.mean(np.sum(x[:, g] ** 2, axis=0))
        # argmin ‖X_ref·Wᵀ - X·W*ᵀ‖² + λ‖W* - W‖², as the stacked least-squares problem it is.
        lhs = np.vstack([x[:, g], np.sqrt(lam) * np.eye(5)])
        rhs = np.vstack([x_reference[:, g] @ w.T, np.sqrt(lam) * w.T])
        expected = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
        np.testing.assert_allclose(got[3 * g : 3 * g + 3], expected, rtol=1e-9, atol=1e-12)


def test_fit_to_reference_keeps_weights_whose_inputs_did_not_change_or_are_dead():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((30, 1, 4))
    matrix = rng.standard_normal((3, 4)).astype(np.float32)
    same = fit_to_reference(matrix, layer_stats(x, x), damp=0.01)
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, matrix)
    x[:, 0, 2] = 0  # input 2 is dead in this model, alive in the reference
    moved = fit_to_reference(matrix, layer_stats(x, x + rng.standard_normal(x.shape)), damp=0.01)
    np.testing.assert_array_equal(moved[:, 2], matrix[:, 2])
    assert not np.allclose(moved, matrix)


# ------------------------------------------------------------------------------ left out


def test_conv_transpose_and_incompatible_shared_views_are_left_out():
    model = model_from_text(
        """g (float[N,3,5,5] x, float[N,4] a, float[N,4] b) => (float[N,2,7,7] y, float[N,4] p, float[N,4] q)
           <float[3,2,3,3] wt, float[4,4] w> {
            y = ConvTranspose(x, wt)
            p = MatMul(a, w)
            q = Gemm<transB=1>(b, w) }""",
        wt=floats(3, 2, 3, 3),
        w=floats(4, 4),
    )
    targets, stats = statistics(model, [{"x": floats(1, 3, 5, 5), "a": floats(2, 4), "b": floats(2, 4)}])
    assert {t.name for t in targets} == {"wt", "w"}
    assert stats == {}  # ConvTranspose, and one weight read as W by one node and Wᵀ by another


def test_a_source_without_batches_gives_no_statistics():
    model = model_from_text(MLP, w1=floats(256, 256), w2=floats(256, 2))
    assert statistics(model, [])[1] == {}


def test_non_finite_activations_are_bad_input():
    model = model_from_text(MLP, w1=floats(256, 256), w2=floats(256, 2))
    x = floats(4, 256)
    x[1, 3] = np.inf
    with pytest.raises(BadInput, match="'x' \\(input of node .*NaN or Inf"):
        statistics(model, [{"x": x}])
