"""prune --correct: scale+bias, bias and BatchNorm re-fit after pruning, against NumPy and ONNX Runtime.

Pruning here zeroes weights directly (the smallest magnitudes of each layer), so these tests
do not depend on the prune pass (except the structured digits_cnn target at the end).
Calibration means and standard deviations are checked on the calibration data; the gain in
output SQNR and top-1 on other data.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
from helpers import MODELS, ListSource, op_counts, zoo_source
from onnx import helper, numpy_helper

from polaris_opt.capture import with_outputs
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph, to_model
from polaris_opt.fidelity import sqnr_db, top1_accuracy
from polaris_opt.numerics import make_session, run_model
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline
from polaris_opt.pruning import correction
from polaris_opt.pruning.correction import CorrectedLayer, correct_layers, correction_rounds

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ------------------------------------------------------------------------------------ helpers


def parse(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text; node i is named '<op>_<i>' so layers can be named in tests."""
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    for index, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}_{index}"
    onnx.checker.check_model(model, full_check=True)
    return model


def he(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def pruned_copy(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """`model` with the `sparsity` smallest-magnitude entries of every layer weight set to zero."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    weights = {t.name: t for t in pruned.graph.initializer}
    for node in pruned.graph.node:
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in weights:
            tensor = weights[node.input[1]]
            w = numpy_helper.to_array(tensor).copy()
            order = np.argsort(np.abs(w), axis=None, kind="stable")
            w.reshape(-1)[order[: round(sparsity * w.size)]] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    return pruned


def layer_names(model: onnx.ModelProto) -> list[CorrectedLayer]:
    return [CorrectedLayer(n.name) for n in model.graph.node if n.op_type in LAYER_OPS]


def correct(dense, pruned, layers, batches) -> tuple[onnx.ModelProto, list[dict]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(pruned)
    graph = to_graph(copy)
    rows = correct_layers(dense, graph, layers, ListSource(batches))
    out = to_model(graph, copy)
    onnx.checker.check_model(out, full_check=True)
    return out, rows


def tensors(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_model(with_outputs(model, names), feeds)


def channel_moments(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.moveaxis(values.astype(np.float64), axis, -1).reshape(-1, values.shape[axis])
    return rows.mean(axis=0), rows.var(axis=0)


def batches_of(x: np.ndarray, size: int, name: str = "x") -> list[dict[str, np.ndarray]]:
    return [{name: x[i : i + size]} for i in range(0, len(x), size)]


def assert_moments_match(got: np.ndarray, want: np.ndarray, axis: int) -> None:
    """Per-channel mean and standard deviation of `got` equal `want`'s."""
    got_mean, got_var = channel_moments(got, axis)
    want_mean, want_var = channel_moments(want, axis)
    np.testing.assert_allclose(got_mean, want_mean, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(got_var), np.sqrt(want_var), rtol=1e-4, atol=1e-6)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each layer node's weight (input 1), by node name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: values[n.input[1]] for n in model.graph.node if n.op_type in LAYER_OPS}


def mean_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the correction match means alone: every scale clipped to 1."""
    monkeypatch.setattr(correction, "SCALE_RANGE", (1.0, 1.0))


# ------------------------------------------------- scale+bias: Conv / ConvTranspose / Gemm / MatMul

CHAIN = """
  g (float[N,2,6,6] x) => (float[N,8] y)
    <float[4,2,3,3] w1, float[16,144] w2, float[16] b2, float[16,12] w3, float[12] b3, float[12,8] w4> {
    c = Conv<pads = [1, 1, 1, 1]>(x, w1)
    r = Relu(c)
    f = Flatten(r)
    h = Gemm<transB = 1>(f, w2, b2)
    hr = Relu(h)
    m = MatMul(hr, w3)
    a = Add(m, b3)
    ar = Relu(a)
    y = MatMul(ar, w4) }"""
# The layer outputs (the bias included) and their channel axes.
CHAIN_OUTPUTS = {"c": 1, "h": 1, "a": 1, "y": 1}


def chain_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return parse(
        CHAIN,
        w1=he(rng, 4, 2, 3, 3),
        w2=he(rng, 16, 144),
        b2=(0.1 * rng.standard_normal(16)).astype(np.float32),
        w3=he(rng, 16, 12),
        b3=(0.1 * rng.standard_normal(12)).astype(np.float32),
        w4=he(rng, 12, 8),
    )


def inputs(seed: int, rows: int, *shape: int, mean: float = 0.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, *shape)) + mean).astype(np.float32)


def test_chain_means_and_stds_match_the_dense_model_and_held_out_sqnr_improves():
    dense = chain_model()
    pruned = pruned_copy(dense, 0.5)
    calib = inputs(1, 64, 2, 6, 6)
    out, rows = correct(dense, pruned, layer_names(dense), batches_of(calib, 16))

    assert [r["refit"] for r in rows] == ["scale+bias"] * 4
    assert [r["output"] for r in rows] == list(CHAIN_OUTPUTS)
    assert [(r["scaled_channels"], r["clipped_channels"]) for r in rows] == [(4, 0), (16, 0), (12, 0), (8, 0)]
    # Conv gets a bias; the bias-less MatMul gets an Add that took over the output name 'y'.
    assert op_counts(out) == op_counts(dense) + Counter(Add=1)
    assert len(next(n for n in out.graph.node if n.op_type == "Conv").input) == 3
    assert [o.name for o in out.graph.output] == ["y"]

    names = list(CHAIN_OUTPUTS)
    want = tensors(dense, names, {"x": calib})
    got = tensors(out, names, {"x": calib})
    before = tensors(pruned, names, {"x": calib})
    for name in names:
        assert_moments_match(got[name], want[name], 1)
        want_mean, want_var = channel_moments(want[name], 1)
        before_mean, before_var = channel_moments(before[name], 1)
        assert np.max(np.abs(before_mean - want_mean)) > 1e-2  # was shifted
        assert np.max(np.abs(np.sqrt(before_var / want_var) - 1)) > 1e-2  # and shrunk or grown

    # The scaling keeps zeros at zero: every weight has the pruned one's sparsity pattern.
    for node, weight in weights(out).items():
        np.testing.assert_array_equal(weight == 0, weights(pruned)[node] == 0)
    # The first layer has nothing upstream: its scale is σ_dense/σ_pruned of its output, per
    # output channel (NumPy), applied to the pruned conv's filters.
    ratio = np.sqrt(channel_moments(want["c"], 1)[1] / channel_moments(before["c"], 1)[1])
    np.testing.assert_allclose(
        weights(out)["Conv_0"], weights(pruned)["Conv_0"] * ratio[:, None, None, None], rtol=1e-5
    )

    # ... and its row is the plain SQNR of pruned and corrected outputs against the dense one
    # over the calibration data.
    first = rows[0]
    assert first["sqnr_before_db"] == pytest.approx(sqnr_db(want["c"], before["c"]), abs=1e-3)
    assert first["sqnr_after_db"] == pytest.approx(sqnr_db(want["c"], got["c"]), abs=1e-3)
    # The last one: corrected output against dense, and its value before its own correction.
    assert rows[-1]["sqnr_after_db"] == pytest.approx(sqnr_db(want["y"], got["y"]), abs=1e-3)
    assert all(r["gain_db"] > 0 for r in rows)

    held_out = {"x": inputs(2, 128, 2, 6, 6)}
    reference = run_model(dense, held_out)["y"]
    sqnr_pruned = sqnr_db(reference, run_model(pruned, held_out)["y"])
    sqnr_corrected = sqnr_db(reference, run_model(out, held_out)["y"])
    assert sqnr_corrected > sqnr_pruned + 1.0, (sqnr_pruned, sqnr_corrected)


def test_layers_are_corrected_in_rounds_of_independent_layers():
    # Two convs read x side by side (round 0); the conv reading both sums comes after (round 1).
    rng = np.random.default_rng(3)
    dense = parse(
        """
      g (float[N,2,5,5] x) => (float[N,3,5,5] y) <float[3,2,1,1] u, float[3,2,1,1] v, float[3,3,1,1] w> {
        p = Conv(x, u)
        q = Conv(x, v)
        s = Add(p, q)
        y = Conv(s, w) }""",
        u=he(rng, 3, 2, 1, 1),
        v=he(rng, 3, 2, 1, 1),
        w=he(rng, 3, 3, 1, 1),
    )
    graph = to_graph(dense)
    graph.toposort()
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert correction_rounds(graph, convs) == [0, 0, 1]
    assert correction_rounds(graph, convs[2:]) == [0]

    calib = inputs(4, 32, 2, 5, 5, mean=1.0)
    # One capture pass per round, plus the dense model's and the final fidelity pass.
    passes = []

    @contextmanager
    def progress(description, total):
        passes.append((description, total))
        yield lambda n=1: None

    graph = to_graph(pruned_copy(dense, 0.5))
    correct_layers(dense, graph, layer_names(dense), ListSource(batches_of(calib, 8)), progress=progress)
    assert passes == [
        ("correction: dense layers", 4),
        ("correction: round 1/2", 4),
        ("correction: round 2/2", 4),
        ("correction: fidelity", 4),
    ]
    out = to_model(graph)
    want, got = tensors(dense, ["p", "q", "y"], {"x": calib}), tensors(out, ["p", "q", "y"], {"x": calib})
    # Means only: at 50 % one of these 2-weight filters lost both weights (no spread to match).
    for name in ("p", "q", "y"):
        np.testing.assert_allclose(
            channel_moments(got[name], 1)[0], channel_moments(want[name], 1)[0], atol=1e-4
        )


def test_gemm_beta_and_a_matmul_graph_output_with_several_readers():
    # A Gemm with beta = 0.5, and a MatMul whose output is both a graph output and read by Relu:
    # the inserted Add must feed both.
    rng = np.random.default_rng(5)
    dense = parse(
        """
      g (float[N,6] x) => (float[N,5] m, float[N,5] z) <float[6,5] w, float[5] c, float[5,5] v> {
        h = Gemm<beta = 0.5>(x, w, c)
        m = MatMul(h, v)
        z = Relu(m) }""",
        w=he(rng, 6, 5),
        c=rng.standard_normal(5).astype(np.float32),
        v=he(rng, 5, 5),
    )
    pruned = pruned_copy(dense, 0.6)
    calib = inputs(6, 48, 6, mean=2.0)
    out, rows = correct(dense, pruned, layer_names(dense), batches_of(calib, 12))
    assert [r["refit"] for r in rows] == ["scale+bias", "scale+bias"]
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "beta")) == 1.0
    want, got = tensors(dense, ["h", "m", "z"], {"x": calib}), tensors(out, ["h", "m", "z"], {"x": calib})
    for name in ("h", "m"):
        assert_moments_match(got[name], want[name], 1)
    np.testing.assert_array_equal(got["z"], np.maximum(got["m"], 0))


def test_output_channel_layouts_of_conv_transpose_groups_gemm_b_and_matmul_add():
    # ConvTranspose W is [C, O/G, k, k]: output channel o of group g is column o mod O/G of the
    # input rows of group g. Gemm without transB has B [K, N]; the MatMul's bias is its Add.
    rng = np.random.default_rng(27)
    dense = parse(
        """
      g (float[N,4,5,5] x) => (float[N,4] y)
        <float[4,3,3,3] wt, float[6] bt, float[6,5] wg, float[5] bg, float[5,4] wm, float[4] bm> {
        t = ConvTranspose<group = 2, strides = [2, 2]>(x, wt, bt)
        f = GlobalAveragePool(t)
        ff = Flatten(f)
        g = Gemm(ff, wg, bg)
        r = Relu(g)
        m = MatMul(r, wm)
        y = Add(m, bm) }""",
        wt=he(rng, 4, 3, 3, 3),
        bt=(0.1 * rng.standard_normal(6)).astype(np.float32),
        wg=(rng.standard_normal((6, 5)) * 2).astype(np.float32),
        bg=(0.1 * rng.standard_normal(5)).astype(np.float32),
        wm=he(rng, 5, 4),
        bm=(0.1 * rng.standard_normal(4)).astype(np.float32),
    )
    pruned = pruned_copy(dense, 0.5)
    calib = inputs(21, 48, 4, 5, 5)
    out, rows = correct(dense, pruned, layer_names(dense), batches_of(calib, 16))
    assert [(r["refit"], r["output"]) for r in rows] == [("scale+bias", n) for n in ("t", "g", "y")]
    assert [r["scaled_channels"] for r in rows] == [6, 5, 4]
    assert op_counts(out) == op_counts(dense)  # the MatMul's own Add holds its bias

    want, got = tensors(dense, ["t", "g", "y"], {"x": calib}), tensors(out, ["t", "g", "y"], {"x": calib})
    for name, axis in (("t", 1), ("g", 1), ("y", 1)):
        assert_moments_match(got[name], want[name], axis)
    # The first layer's scale, written out channel by channel (NumPy).
    ratio = np.sqrt(
        channel_moments(want["t"], 1)[1] / channel_moments(tensors(pruned, ["t"], {"x": calib})["t"], 1)[1]
    )
    expected = weights(pruned)["ConvTranspose_0"].copy()
    for channel in range(6):
        group, column = divmod(channel, 3)
        expected[2 * group : 2 * group + 2, column] *= ratio[channel]
    np.testing.assert_allclose(weights(out)["ConvTranspose_0"], expected, rtol=1e-5)
    for node, weight in weights(out).items():
        np.testing.assert_array_equal(weight == 0, weights(pruned)[node] == 0)


def test_guards_a_constant_channel_gets_its_mean_and_far_scales_are_clipped():
    # Four Gemm output channels, pruned by hand:
    #   0: every weight pruned: constant, so no scale (1) and the dense mean goes into the bias;
    #   1: keeps only a tiny weight: σ_dense/σ_pruned > 100, clipped to 4;
    #   2: ordinary 50 % pruning: scaled to σ_dense;
    #   3: x0 − x1 (nearly equal inputs) loses −x1: its spread grows ≈ 30×, scale clipped to 1/4.
    rng = np.random.default_rng(22)
    text = """
      g (float[N,6] x) => (float[N,4] h) <float[4,6] w, float[4] b> {
        h = Gemm<transB = 1>(x, w, b) }"""
    w = rng.standard_normal((4, 6)).astype(np.float32)
    w[1] = [1, 1, 1, 1, 1, 0.02]
    w[3] = [1, -1, 0, 0, 0, 0]
    b = np.array([0.5, -0.2, 0.1, 0.3], np.float32)
    dense = parse(text, w=w, b=b)
    small = w.copy()
    small[0] = 0.0
    small[1, :5] = 0.0
    small[2, np.argsort(np.abs(w[2]))[:3]] = 0.0
    small[3, 1] = 0.0
    pruned = parse(text, w=small, b=b)

    x = inputs(23, 64, 6)
    x[:, 1] = x[:, 0] + 0.03 * np.random.default_rng(24).standard_normal(64).astype(np.float32)
    out, rows = correct(dense, pruned, layer_names(dense), batches_of(x, 16))
    assert (rows[0]["refit"], rows[0]["scaled_channels"], rows[0]["clipped_channels"]) == ("scale+bias", 3, 2)

    new_w = weights(out)["Gemm_0"]
    np.testing.assert_array_equal(new_w[0], 0.0)
    np.testing.assert_array_equal(new_w[1], 4 * small[1])
    np.testing.assert_array_equal(new_w[3], 0.25 * small[3])
    np.testing.assert_array_equal(new_w == 0, small == 0)
    want, got = tensors(dense, ["h"], {"x": x})["h"], tensors(out, ["h"], {"x": x})["h"]
    before = tensors(pruned, ["h"], {"x": x})["h"]
    np.testing.assert_allclose(got.mean(axis=0), want.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(got[:, 0], want[:, 0].mean(), atol=1e-5)  # constant: the dense mean
    np.testing.assert_allclose(got[:, 2].std(), want[:, 2].std(), rtol=1e-4)
    np.testing.assert_allclose(
        got[:, [1, 3]].std(axis=0), [4, 0.25] * before[:, [1, 3]].std(axis=0), rtol=1e-4
    )


def test_a_shared_weight_is_not_scaled_and_gets_a_mean_only_refit():
    # One initializer read by two MatMuls: scaling it for one would change the other.
    rng = np.random.default_rng(25)
    text = """
      g (float[N,4] x) => (float[N,4] z) <float[4,4] w> {
        a = MatMul(x, w)
        r = Relu(a)
        z = MatMul(r, w) }"""
    dense = parse(text, w=he(rng, 4, 4))
    pruned = pruned_copy(dense, 0.5)
    calib = inputs(26, 64, 4)
    out, rows = correct(dense, pruned, layer_names(dense), batches_of(calib, 16))
    assert [(r["refit"], r["scaled_channels"]) for r in rows] == [("bias", 0), ("bias", 0)]
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert matmuls[0].input[1] == matmuls[1].input[1] == "w"
    np.testing.assert_array_equal(weights(out)["MatMul_0"], weights(pruned)["MatMul_0"])
    want, got = tensors(dense, ["a", "z"], {"x": calib}), tensors(out, ["a", "z"], {"x": calib})
    for name in ("a", "z"):
        np.testing.assert_allclose(got[name].mean(axis=0), want[name].mean(axis=0), atol=1e-4)


# ----------------------------------------------------------------------------- BatchNorm re-fit

CONV_BN = """
  g (float[N,3,6,6] x) => (float[N,5,6,6] y)
    <float[4,3,3,3] w1, float[4] s1, float[4] b1, float[4] m1, float[4] v1,
     float[5,4,3,3] w2, float[5] s2, float[5] b2, float[5] m2, float[5] v2> {
    c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
    n1 = BatchNormalization(c1, s1, b1, m1, v1)
    r1 = Relu(n1)
    c2 = Conv<pads = [1, 1, 1, 1]>(r1, w2)
    y = BatchNormalization(c2, s2, b2, m2, v2) }"""


def conv_bn_model(rng: np.random.Generator, stats: dict[str, np.ndarray]) -> onnx.ModelProto:
    params = {
        "w1": he(rng, 4, 3, 3, 3),
        "s1": rng.uniform(0.8, 1.2, 4).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(4)).astype(np.float32),
        "w2": he(rng, 5, 4, 3, 3),
        "s2": rng.uniform(0.8, 1.2, 5).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(5)).astype(np.float32),
    }
    return parse(CONV_BN, **params, **stats)


def initializer(model: onnx.ModelProto, node_name: str, index: int) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[index]))


def test_batchnorm_fitted_to_the_data_gets_the_pruned_outputs_mean_and_variance():
    # A BN whose running statistics are the dense conv output's on the calibration data (as a
    # trained BN's are): after the re-fit they are the pruned conv output's.
    calib = inputs(7, 32, 3, 6, 6)
    stats = {"m1": np.zeros(4, np.float32), "v1": np.ones(4, np.float32)}
    stats |= {"m2": np.zeros(5, np.float32), "v2": np.ones(5, np.float32)}
    # Fit each BN in turn: the second conv's output depends on the first BN's statistics.
    for conv, mean, var in (("c1", "m1", "v1"), ("c2", "m2", "v2")):
        model = conv_bn_model(np.random.default_rng(8), stats)
        moments = channel_moments(tensors(model, [conv], {"x": calib})[conv], 1)
        stats |= {mean: moments[0].astype(np.float32), var: moments[1].astype(np.float32)}
    dense = conv_bn_model(np.random.default_rng(8), stats)

    pruned = pruned_copy(dense, 0.5)
    out, rows = correct(dense, pruned, layer_names(dense), batches_of(calib, 8))
    assert [(r["refit"], r["output"]) for r in rows] == [("batchnorm", "n1"), ("batchnorm", "y")]
    assert op_counts(out) == op_counts(dense)
    assert all(len(n.input) == 2 for n in out.graph.node if n.op_type == "Conv")  # biases untouched

    got = tensors(out, ["c1", "c2"], {"x": calib})
    for conv, bn in (("c1", "BatchNormalization_1"), ("c2", "BatchNormalization_4")):
        mean, var = channel_moments(got[conv], 1)
        np.testing.assert_allclose(initializer(out, bn, 3), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(initializer(out, bn, 4), var, rtol=1e-3, atol=1e-4)


def test_batchnorm_with_arbitrary_statistics_keeps_the_dense_output_distribution():
    # Random-init models' BN statistics do not describe the data: the re-fit must still give the
    # BN output the per-channel mean and variance it has on the dense model.
    rng = np.random.default_rng(9)
    stats = {
        "m1": (0.1 * rng.standard_normal(4)).astype(np.float32),
        "v1": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "m2": (0.1 * rng.standard_normal(5)).astype(np.float32),
        "v2": rng.uniform(0.5, 1.5, 5).astype(np.float32),
    }
    dense = conv_bn_model(rng, stats)
    pruned = pruned_copy(dense, 0.6)
    calib = inputs(10, 48, 3, 6, 6)
    out, rows = correct(dense, pruned, layer_names(dense), batches_of(calib, 16))
    assert [r["refit"] for r in rows] == ["batchnorm", "batchnorm"]
    want, got = tensors(dense, ["n1", "y"], {"x": calib}), tensors(out, ["n1", "y"], {"x": calib})
    for name in ("n1", "y"):
        want_mean, want_var = channel_moments(want[name], 1)
        got_mean, got_var = channel_moments(got[name], 1)
        np.testing.assert_allclose(got_mean, want_mean, atol=1e-4)
        np.testing.assert_allclose(got_var, want_var, rtol=1e-4)
    assert rows[0]["sqnr_after_db"] == pytest.approx(sqnr_db(want["n1"], got["n1"]), abs=1e-3)

    held_out = {"x": inputs(11, 64, 3, 6, 6)}
    reference = run_model(dense, held_out)["y"]
    assert sqnr_db(reference, run_model(out, held_out)["y"]) > sqnr_db(
        reference, run_model(pruned, held_out)["y"]
    )


# ------------------------------------------------------------------------------- digits


def top1(model: onnx.ModelProto, key: str) -> float:
    with np.load(MODELS / "digits_test.npz") as test:
        x, labels = test[key], test["y"]
    return top1_accuracy(make_session(model), batches_of(x, 150, "input"), labels)


def digits_case(name: str, key: str, cleanup: bool) -> tuple[float, float, list[dict]]:
    dense = onnx.load(MODELS / f"{name}.onnx")
    if cleanup:
        dense = run_pipeline(dense, Pipeline.parse("cleanup"), ctx=PassContext()).model
    pruned = pruned_copy(dense, 0.7)
    source = zoo_source(name, 256, 64)
    out, rows = correct(dense, pruned, layer_names(dense), list(source.batches()))
    return top1(pruned, key), top1(out, key), rows


# Measured top-1 on the 450 test digits (dense: digits_mlp 0.9778, digits_cnn 0.9867) with 70 %
# of each layer's weights pruned by magnitude, pruned / means only / means and spreads:
# digits_mlp 0.6822 / 0.8600 / 0.9356; digits_cnn, BN folded: 0.7044 / 0.8267 / 0.8889;
# digits_cnn, BN kept and re-fit (the Gemm scaled): 0.7622 / 0.8667 / 0.8933.
@pytest.mark.parametrize(
    ("name", "key", "cleanup", "refit", "bar"),
    [
        ("digits_mlp", "x_mlp", True, {"scale+bias"}, 0.93),
        ("digits_cnn", "x_cnn", True, {"scale+bias"}, 0.88),
        ("digits_cnn", "x_cnn", False, {"batchnorm", "scale+bias"}, 0.885),
    ],
)
def test_digits_top1_at_70_percent_with_correction(name, key, cleanup, refit, bar, monkeypatch):
    without, corrected, rows = digits_case(name, key, cleanup)
    assert {r["refit"] for r in rows} == refit
    assert corrected >= without and corrected >= bar, (without, corrected)
    assert all(r["sqnr_after_db"] >= r["sqnr_before_db"] for r in rows)
    # Matching the spread as well as the mean is what lifts these trained models.
    mean_only(monkeypatch)
    _, means_corrected, rows = digits_case(name, key, cleanup)
    assert "scale+bias" not in {r["refit"] for r in rows}
    assert corrected > means_corrected, (means_corrected, corrected)


# digits_cnn with 25 % of its channels removed (prune-structured, 256 calibration rows), top-1
# on the test digits, dense 0.9867: l2 importance pruned 0.9311, means only 0.9644 (a 2.22-point
# drop), means and spreads 0.9711 (1.56); taylor 0.9156, 0.9711, 0.9756 (1.11).
@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_digits_cnn_at_25_percent_channels_loses_at_most_two_points(importance, monkeypatch):
    dense = onnx.load(MODELS / "digits_cnn.onnx")
    ctx = PassContext(calib=zoo_source("digits_cnn", 256, 64))

    def pruned(correct: bool) -> onnx.ModelProto:
        options = f"kind=channel,sparsity=0.25,importance={importance},correct={str(correct).lower()}"
        return run_pipeline(dense, Pipeline.parse(f"cleanup,prune-structured{{{options}}}"), ctx=ctx).model

    without, corrected = top1(pruned(False), "x_cnn"), top1(pruned(True), "x_cnn")
    mean_only(monkeypatch)
    means_corrected = top1(pruned(True), "x_cnn")
    assert top1(dense, "x_cnn") - corrected <= 0.02
    assert corrected > without and corrected >= means_corrected, (without, means_corrected, corrected)


# ------------------------------------------------------------------------------- structured


def test_structured_kept_channels_are_compared_with_their_dense_channels():
    rng = np.random.default_rng(12)
    text = """
      g (float[N,6] x) => (float[N,4] y) <float[{c},6] w1, float[{c}] b1, float[4,{c}] w2, float[4] b2> {{
        h = Gemm<transB = 1>(x, w1, b1)
        r = Relu(h)
        y = Gemm<transB = 1>(r, w2, b2) }}"""
    w1, b1 = he(rng, 8, 6), (0.1 * rng.standard_normal(8)).astype(np.float32)
    w2, b2 = he(rng, 4, 8), (0.1 * rng.standard_normal(4)).astype(np.float32)
    dense = parse(text.format(c=8), w1=w1, b1=b1, w2=w2, b2=b2)
    kept = np.array([0, 2, 5])
    small_w1 = w1[kept].copy()
    small_w1[np.abs(small_w1) < np.median(np.abs(small_w1))] = 0.0  # also sparse inside
    pruned = parse(text.format(c=3), w1=small_w1, b1=b1[kept], w2=w2[:, kept].copy(), b2=b2)

    calib = inputs(13, 64, 6, mean=1.0)
    layers = [CorrectedLayer("Gemm_0", kept=kept), CorrectedLayer("Gemm_2")]
    out, rows = correct(dense, pruned, layers, batches_of(calib, 16))
    assert [r["refit"] for r in rows] == ["scale+bias", "scale+bias"]
    want, got = tensors(dense, ["h", "y"], {"x": calib}), tensors(out, ["h", "y"], {"x": calib})
    assert_moments_match(got["h"], want["h"][:, kept], 1)
    assert_moments_match(got["y"], want["y"], 1)
    assert rows[0]["sqnr_after_db"] == pytest.approx(sqnr_db(want["h"][:, kept], got["h"]), abs=1e-3)

    # Without the mapping the channel counts differ: the layer is skipped with the reason.
    _, rows = correct(dense, pruned, [CorrectedLayer("Gemm_0")], batches_of(calib, 16))
    assert rows[0]["refit"] == "none" and "no kept-channel mapping" in rows[0]["reason"]
    _, rows = correct(
        dense, pruned, [CorrectedLayer("Gemm_0", kept=np.array([0, 9, 1]))], batches_of(calib, 16)
    )
    assert rows[0]["refit"] == "none" and "does not fit" in rows[0]["reason"]


# ------------------------------------------------------------- unreachable layers, bad input


def with_if_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x → Gemm → If(cond, then: MatMul(h, v), else: h) → y."""
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "v"], ["t"], name="Inner_MatMul")],
        "then",
        [],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["e"], name="Inner_Identity")],
        "else",
        [],
        [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="Outer_Gemm", transB=1),
        helper.make_node(
            "If", ["cond"], ["y"], name="If_0", then_branch=then_branch, else_branch=else_branch
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "with_if",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(he(rng, 4, 4), "w"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b"),
            numpy_helper.from_array(he(rng, 4, 4), "v"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_layer_inside_an_if_is_skipped_with_a_reason():
    dense = with_if_model(np.random.default_rng(14))
    pruned = pruned_copy(dense, 0.5)
    calib = inputs(15, 32, 4)
    batches = [{"x": b["x"], "cond": np.array(True)} for b in batches_of(calib, 8)]
    layers = [CorrectedLayer("Outer_Gemm"), CorrectedLayer("Inner_MatMul")]
    out, rows = correct(dense, pruned, layers, batches)
    assert rows[0]["refit"] == "scale+bias" and rows[0]["reason"] is None
    assert rows[1] == {
        "layer": "Inner_MatMul",
        "output": None,
        "refit": "none",
        "sqnr_before_db": None,
        "sqnr_after_db": None,
        "gain_db": None,
        "scaled_channels": None,
        "clipped_channels": None,
        "reason": "inside an If/Loop/Scan body: calibration data cannot reach its output",
    }
    want, got = (
        tensors(dense, ["h"], batches[0] | {"x": calib}),
        tensors(out, ["h"], batches[0] | {"x": calib}),
    )
    np.testing.assert_allclose(got["h"].mean(axis=0), want["h"].mean(axis=0), atol=1e-4)


def test_layers_that_cannot_be_corrected_say_why():
    dense = chain_model()
    pruned = pruned_copy(dense, 0.5)
    calib = batches_of(inputs(16, 16, 2, 6, 6), 8)
    layers = [CorrectedLayer("Relu_1"), CorrectedLayer("Conv_0"), CorrectedLayer("Conv_0")]
    out, rows = correct(dense, pruned, layers, calib)
    assert [r["refit"] for r in rows] == ["none", "scale+bias", "none"]
    assert rows[0]["reason"] == "Relu is not a Conv/ConvTranspose/Gemm/MatMul layer"
    assert rows[2]["reason"] == "listed twice: corrected once"
    # Only the conv changed: its weight was replaced by the scaled one, and it has a new bias.
    assert len(out.graph.initializer) == len(pruned.graph.initializer) + 1
    np.testing.assert_array_equal(weights(out)["Gemm_3"], weights(pruned)["Gemm_3"])


def test_bad_input():
    dense = chain_model()
    pruned = pruned_copy(dense, 0.5)
    with pytest.raises(BadInput, match="yielded no batches"):
        correct(dense, pruned, layer_names(dense), [])
    with pytest.raises(ValueError, match="no node named 'Missing'"):
        correct(dense, pruned, [CorrectedLayer("Missing")], batches_of(inputs(0, 8, 2, 6, 6), 8))
    # A dense model without the layer's output tensor: nothing to compare with.
    renamed = onnx.ModelProto()
    renamed.CopyFrom(dense)
    for node in renamed.graph.node:
        node.input[:] = ["c_dense" if t == "c" else t for t in node.input]
        node.output[:] = ["c_dense" if t == "c" else t for t in node.output]
    _, rows = correct(renamed, pruned, [CorrectedLayer("Conv_0")], batches_of(inputs(0, 8, 2, 6, 6), 8))
    assert rows[0]["refit"] == "none" and "no float32 tensor 'c' in the dense model" in rows[0]["reason"]
