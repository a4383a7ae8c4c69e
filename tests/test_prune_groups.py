"""Channel dependency groups, channel importance and channel selection, each checked alone.

Groups are checked for what they couple (members, producers, consumers, channel numbering);
importance against NumPy references of the formulas in polaris_opt.pruning.importance; the
rewrite for constants shared with nodes outside it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import ListSource
from onnx import numpy_helper
from test_prune_structured import assert_equivalent

from polaris_opt.export import to_graph, to_model
from polaris_opt.pruning.channels import channels_to_remove, kept_positions, remove_channels
from polaris_opt.pruning.group_search import find_groups
from polaris_opt.pruning.groups import Group
from polaris_opt.pruning.importance import norm_importance, taylor_importance
from polaris_opt.surgery import Names

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(1)


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def build(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def groups_of(model: onnx.ModelProto) -> dict[str, Group]:
    return {group.name: group for group in find_groups(to_graph(model))}


def names(group: Group, role: str) -> list[str]:
    return [node.name for node in group.nodes(role)]


RESIDUAL = """
  g (float[1,3,8,8] x) => (float[1,5] y) {
    [stem] a = Conv<pads = [1, 1, 1, 1]>(x, w0)
    [act] r = Relu(a)
    [body] b = Conv<pads = [1, 1, 1, 1]>(r, w1, b1)
    [sum] s = Add(b, r)
    [pool] p = GlobalAveragePool(s)
    [flat] f = Flatten(p)
    [head] y = Gemm<transB = 1>(f, wf) }"""


def residual() -> onnx.ModelProto:
    return build(RESIDUAL, w0=floats(4, 3, 3, 3), w1=floats(4, 4, 3, 3), b1=floats(4), wf=floats(5, 4))


def test_a_residual_layer_is_producer_and_consumer_of_one_group():
    groups = groups_of(residual())
    assert set(groups) == {"stem", "head"}
    stem = groups["stem"]
    assert stem.safe and stem.channel_count == 4
    assert names(stem, "producer") == ["stem", "body"] and names(stem, "consumer") == ["body", "head"]
    assert set(stem.members) == {"a", "r", "b", "s", "p", "f"}
    assert groups["head"].reasons == ["'y' is a graph output"]


def test_flatten_repeats_each_channel_over_its_spatial_block():
    model = build(
        """
      g (float[1,3,4,4] x) => (float[1,5] y) {
        [conv] a = Conv(x, w0)
        [pool] p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(a)
        [flat] f = Flatten(p)
        [fc] y = Gemm<transB = 1>(f, wf) }""",
        w0=floats(6, 3, 1, 1),
        wf=floats(5, 24),
    )
    group = groups_of(model)["conv"]
    np.testing.assert_array_equal(group.members["f"].channels, np.repeat(np.arange(6), 4))
    np.testing.assert_array_equal(group.members["p"].channels, np.arange(6))


def test_concat_numbers_channels_by_their_place_in_the_output():
    model = build(
        """
      g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
        [c1] a1 = Conv(x, w1)
        [c2] a2 = Conv(x, w2)
        [cat] m = Concat<axis = 1>(a2, a1)
        [out] y = Conv(m, wc) }""",
        w1=floats(3, 3, 1, 1),
        w2=floats(5, 3, 1, 1),
        wc=floats(2, 8, 1, 1),
    )
    (group, _) = find_groups(to_graph(model))
    assert group.channel_count == 8 and names(group, "producer") == ["c1", "c2"]
    # c1 seeds the group, so its channels come first; the Concat puts c2's first in m.
    np.testing.assert_array_equal(group.members["a1"].channels, [0, 1, 2])
    np.testing.assert_array_equal(group.members["a2"].channels, [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(group.members["m"].channels, [3, 4, 5, 6, 7, 0, 1, 2])


def test_every_unsafe_reader_is_named():
    model = build(
        """
      g (float[1,3,4,4] x) => (float[1,4,4,4] y, float[1,4,4,4] t) {
        [conv] a = Conv(x, w0)
        y = Transpose<perm = [0, 1, 3, 2]>(a)
        t = Transpose<perm = [0, 1, 3, 2]>(a) }""",
        w0=floats(4, 3, 1, 1),
    )
    (group,) = find_groups(to_graph(model))
    assert not group.safe
    assert group.reasons == [
        "Transpose 'y' is not known to keep channels apart",
        "Transpose 't' is not known to keep channels apart",
    ]


# ----------------------------------------------------------------------------- importance


def test_norm_importance_matches_numpy_for_every_layer_of_the_group():
    model = build(
        """
      g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
        [conv] a = Conv(x, w0)
        [bn] n = BatchNormalization<epsilon = 0.01>(a, s, b, m, v)
        [dw] d = Conv<group = 4, pads = [1, 1, 1, 1]>(n, wd)
        [out] y = Conv(d, wc) }""",
        w0=floats(4, 3, 1, 1),
        s=floats(4),
        b=floats(4),
        m=floats(4),
        v=np.abs(floats(4)) + 0.1,
        wd=floats(4, 1, 3, 3),
        wc=floats(2, 4, 1, 1),
    )
    graph = to_graph(model)
    group = find_groups(graph)[0]
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}

    def normalized(values):
        return values / values.mean()

    producer = np.sqrt((init["w0"].reshape(4, -1) ** 2).sum(1))
    np.testing.assert_allclose(norm_importance(group, "filter", "l2"), normalized(producer))
    producer_l1 = np.abs(init["w0"].reshape(4, -1)).sum(1)
    depthwise_l1 = np.abs(init["wd"].reshape(4, -1)).sum(1)
    consumer_l1 = np.abs(init["wc"][:, :, 0, 0]).sum(0)
    bn_scale = np.abs(init["s"] / np.sqrt(init["v"] + 0.01))
    expected = sum(normalized(x) for x in (producer_l1, depthwise_l1, consumer_l1, bn_scale))
    np.testing.assert_allclose(norm_importance(group, "channel", "l1"), expected)


def test_taylor_importance_matches_numpy_on_a_conv_consumer():
    model = build(
        """
      g (float[N,3,5,5] x) => (float[N,2,3,3] y) {
        [conv] a = Conv(x, w0)
        [act] r = Relu(a)
        [out] y = Conv(r, wc) }""",
        w0=floats(4, 3, 1, 1),
        wc=floats(2, 4, 3, 3),
    )
    batches = [{"x": floats(3, 3, 5, 5)}, {"x": floats(5, 3, 5, 5)}]
    group = find_groups(to_graph(model))[0]
    (scores,) = taylor_importance([group], model, ListSource(batches))
    w0 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)[:, :, 0, 0]
    wc = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    r = np.concatenate([np.maximum(np.einsum("oc,nchw->nohw", w0, b["x"]), 0) for b in batches])
    mean_square = (r**2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(scores, (wc**2).sum(axis=(0, 2, 3)) * mean_square, rtol=1e-5)


# ------------------------------------------------------------------------------ selection


@pytest.mark.parametrize(("sparsity", "count"), [(0.5, 2), (0.3, 1), (0.7, 3), (0.99, 3), (0.0, 0)])
def test_selection_removes_the_rounded_share_and_keeps_one(sparsity, count):
    group = groups_of(residual())["stem"]
    removed = channels_to_remove(group, np.array([4.0, 1.0, 3.0, 2.0]), sparsity)
    assert removed.tolist() == sorted([1, 3, 2, 0][:count])


def test_equal_scores_go_by_channel_index():
    group = groups_of(residual())["stem"]
    assert channels_to_remove(group, np.ones(4), 0.5).tolist() == [0, 1]


def test_kept_positions_of_a_flattened_member_keep_whole_blocks():
    group = groups_of(residual())["stem"]
    assert kept_positions(group.members["f"], np.array([1, 2])).tolist() == [0, 3]


def test_a_weight_shared_with_a_layer_outside_the_group_is_copied():
    w0 = floats(4, 3, 1, 1)
    w0[[0, 2]] = 0
    model = build(
        """
      g (float[1,3,4,4] x) => (float[1,2,4,4] y, float[1,4,4,4] z) {
        [conv] a = Conv(x, w0)
        [out] y = Conv(a, wc)
        [side] z = Conv(x, w0) }""",
        w0=w0,
        wc=floats(2, 4, 1, 1) * np.array([0, 1, 0, 1], np.float32)[None, :, None, None],
    )
    graph = to_graph(model)
    group = next(g for g in find_groups(graph) if g.safe)
    removed = channels_to_remove(group, norm_importance(group, "filter", "l2"), 0.5)
    assert removed.tolist() == [0, 2]
    assert remove_channels(group, removed, Names(graph)) == (12 + 8, 6 + 4)
    out = to_model(graph, model)
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert shapes == {"w0": (4, 3, 1, 1), "w0.pruned": (2, 3, 1, 1), "wc": (2, 2, 1, 1)}
    assert_equivalent(model, out, {"x": floats(1, 3, 4, 4)})
