"""prune-structured: every propagation rule removes channels without changing what survives.

The exact-equivalence test: the channels to remove have all-zero producer rows and biases (so
filter importance picks exactly them) and all-zero consumer input slices (so whatever the ops
in between make of a dead channel, no output sees it). The pruned model must then give the
dense model's outputs on ONNX Runtime: a wrong slice anywhere (a BatchNorm parameter, a
broadcast constant, a consumer column) shifts a surviving channel and shows.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import MODELS, ListSource, run_pass_with_stats, zoo_source
from onnx import numpy_helper

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph, to_model
from polaris_opt.numerics import compare_outputs, make_session, run_model
from polaris_opt.passes.prune_structured import ChannelImportance, PruneStructured, StructuredKind
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)
DEAD = [1, 4, 6, 7]  # of 8 channels: what sparsity 0.5 removes when their filters are zero
FILTER = PruneStructured(kind=StructuredKind.FILTER, sparsity=0.5)


def run_checked(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs from an unoptimized ONNX Runtime session: its kernels check every weight shape
    against its input (the optimized CPU Conv accepts a weight with the wrong input channels)."""
    return run_model(make_session(model, optimize=False), feeds)


def assert_equivalent(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """The pruned model gives the dense model's outputs, under the same names."""
    expected, got = run_checked(dense, feeds), run_checked(pruned, feeds)
    assert list(got) == list(expected)
    mismatches = compare_outputs(expected, got)
    assert not mismatches, "\n".join(str(m) for m in mismatches)


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def build(text: str, header: str = HEADER, **initializers) -> onnx.ModelProto:
    """A model from ONNX text; float initializers as float32, integer ones as int64."""
    model = onnx.parser.parse_model(header + text)
    for name, value in initializers.items():
        value = np.asarray(value)
        value = value.astype(np.int64 if value.dtype.kind in "iu" else np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def producer(out: int, inp: int, dead=DEAD, kernel=(3, 3)) -> dict[str, np.ndarray]:
    """Conv weight `wp` and bias `bp` whose `dead` output channels are all zero."""
    weight, bias = floats(out, inp, *kernel), floats(out)
    weight[dead] = 0
    bias[dead] = 0
    return {"wp": weight, "bp": bias}


def consumer(out: int, inp: int, dead=DEAD, kernel=(3, 3)) -> np.ndarray:
    """Conv weight whose input slices of the `dead` channels are all zero."""
    weight = floats(out, inp, *kernel)
    weight[:, dead] = 0
    return weight


def prune(model: onnx.ModelProto, p: PruneStructured = FILTER, ctx: PassContext | None = None):
    """(pruned model, details) after checking the result with onnx.checker, shapes included."""
    source = onnx.ModelProto()
    source.CopyFrom(model)
    graph = to_graph(source)
    result = p.run(graph, ctx or PassContext())
    out = to_model(graph, source)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


# ------------------------------------------------------------------- one rule at a time

CONV_PAIR = """
  g (float[2,3,8,8] x) => (float[N,C,H,W] y) {{
    [p] a = Conv<pads = [1, 1, 1, 1]>(x, wp, bp)
    {middle}
    [c] y = Conv<pads = [1, 1, 1, 1]>(m, wc) }}"""

SCALAR = np.float32
RULES = {
    "relu": ("m = Relu(a)", {}),
    "clip": ("m = Clip(a, lo, hi)", {"lo": SCALAR(0), "hi": SCALAR(0.5)}),
    "unary ops": (
        """r1 = Sigmoid(a)
        r2 = Tanh(r1)
        r3 = LeakyRelu<alpha = 0.1>(r2)
        r4 = HardSigmoid(r3)
        r5 = HardSwish(r4)
        r6 = Identity(r5)
        r7 = Cast<to = 1>(r6)
        r8 = Elu(r7)
        m = Dropout(r8)""",
        {},
    ),
    "gelu from erf": (
        """d = Div(a, root2)
        e = Erf(d)
        f = Add(e, one)
        h = Mul(a, f)
        m = Mul(h, half)""",
        {"root2": SCALAR(np.sqrt(2)), "one": SCALAR(1), "half": SCALAR(0.5)},
    ),
    "batchnorm": (
        "m = BatchNormalization<epsilon = 0.001>(a, s, b, mu, v)",
        {"s": floats(8) + 2, "b": floats(8), "mu": floats(8), "v": np.abs(floats(8)) + 0.5},
    ),
    "instancenorm": ("m = InstanceNormalization(a, s, b)", {"s": floats(8), "b": floats(8)}),
    "maxpool": ("m = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(a)", {}),
    "averagepool": ("m = AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(a)", {}),
    "globalaveragepool": ("m = GlobalAveragePool(a)", {}),
    "globalmaxpool": ("m = GlobalMaxPool(a)", {}),
    "pad spatial": ('m = Pad<mode = "reflect">(a, pads)', {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1])}),
    "resize by scales": ('m = Resize<mode = "nearest">(a, , scales)', {"scales": np.array([1, 1, 2, 2.0])}),
    "resize to sizes": ('m = Resize<mode = "linear">(a, , , sizes)', {"sizes": np.array([2, 8, 12, 16])}),
    "broadcast constants": (
        """c1 = Add(a, per_channel)
        c2 = Mul(c1, scalar)
        c3 = Sub(full_rank, c2)
        c4 = Div(c3, positive)
        c5 = Max(c4, per_channel)
        c6 = Min(c5, spatial)
        m = PRelu(c6, slope)""",
        {
            "per_channel": floats(8, 1, 1),
            "scalar": floats(1),
            "full_rank": floats(1, 8, 1, 1),
            "positive": np.abs(floats(8, 1, 1)) + 0.5,
            "spatial": floats(8, 8),  # broadcasts along the channels: stays as it is
            "slope": floats(8, 1, 1),
        },
    ),
    "variadic sum and mean": (
        "c = Sum(a, a, per_channel)\n m = Mean(c, a)",
        {"per_channel": floats(8, 1, 1)},
    ),
    "softmax over width": ("m = Softmax<axis = -1>(a)", {}),
    "slice of height": ("m = Slice(a, starts, ends, axes)", {"starts": [1], "ends": [7], "axes": [2]}),
    "split and concat along height": (
        "t1, t2 = Split<axis = 2>(a, split)\n m = Concat<axis = 2>(t2, t1)",
        {"split": np.array([3, 5])},
    ),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_removes_dead_channels_exactly(rule):
    middle, extra = RULES[rule]
    model = build(CONV_PAIR.format(middle=middle), **producer(8, 3), wc=consumer(4, 8), **extra)
    out, result = prune(model)
    (row,) = result.details["groups"]
    assert row["removed"] == DEAD and row["channels_after"] == 4
    assert row["group"] == "p" and row["producers"] == ["p"] and row["consumers"] == ["c"]
    kept = weights(out)
    assert kept["wp"].shape == (4, 3, 3, 3) and kept["bp"].shape == (4,) and kept["wc"].shape == (4, 4, 3, 3)
    assert_equivalent(model, out, {"x": floats(2, 3, 8, 8)})


def test_batchnorm_parameters_are_sliced_to_the_kept_channels():
    middle, extra = RULES["batchnorm"]
    model = build(CONV_PAIR.format(middle=middle), **producer(8, 3), wc=consumer(4, 8), **extra)
    kept = weights(prune(model)[0])
    survivors = [c for c in range(8) if c not in DEAD]
    for name in ("s", "b", "mu", "v"):
        np.testing.assert_array_equal(kept[name], extra[name][survivors])


def test_resize_sizes_entry_follows_the_channel_count():
    middle, extra = RULES["resize to sizes"]
    model = build(CONV_PAIR.format(middle=middle), **producer(8, 3), wc=consumer(4, 8), **extra)
    np.testing.assert_array_equal(weights(prune(model)[0])["sizes"], [2, 4, 12, 16])


def test_residual_add_removes_the_same_channels_from_both_branches():
    model = build(
        """
      g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        a1 = Conv<pads = [1, 1, 1, 1]>(x, wp, bp)
        r = Relu(a1)
        a2 = Conv<pads = [1, 1, 1, 1]>(r, w2, b2)
        a3 = Conv(x, w3)
        s = Add(a2, a3)
        t = Relu(s)
        y = Conv<pads = [1, 1, 1, 1]>(t, wc) }""",
        **producer(8, 3),
        w2=producer(8, 8)["wp"] * np.isin(np.arange(8), DEAD, invert=True)[None, :, None, None],
        b2=producer(8, 8)["bp"],
        w3=producer(8, 3, kernel=(1, 1))["wp"],
        wc=consumer(4, 8),
    )
    out, result = prune(model)
    rows = {row["group"]: row for row in result.details["groups"]}
    residual = next(row for row in rows.values() if len(row["producers"]) == 2)
    assert residual["removed"] == DEAD and len(residual["consumers"]) == 1
    kept = weights(out)
    assert kept["w2"].shape[0] == kept["w3"].shape[0] == 4 and kept["wc"].shape == (4, 4, 3, 3)
    assert_equivalent(model, out, {"x": floats(2, 3, 8, 8)})


def test_concat_along_channels_maps_offsets_to_each_producer():
    p1, p2 = producer(4, 3, dead=[0, 3]), producer(4, 3, dead=[1, 2])
    model = build(
        """
      g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        a1 = Conv<pads = [1, 1, 1, 1]>(x, wp1, bp1)
        a2 = Conv<pads = [1, 1, 1, 1]>(x, wp2, bp2)
        m = Concat<axis = 1>(a1, a2)
        y = Conv<pads = [1, 1, 1, 1]>(m, wc) }""",
        wp1=p1["wp"],
        bp1=p1["bp"],
        wp2=p2["wp"],
        bp2=p2["bp"],
        wc=consumer(4, 8, dead=[0, 3, 5, 6]),
    )
    out, result = prune(model)
    (row,) = result.details["groups"]
    assert row["removed"] == [0, 3, 5, 6] and len(row["producers"]) == 2
    kept = weights(out)
    assert kept["wp1"].shape[0] == kept["wp2"].shape[0] == 2
    assert_equivalent(model, out, {"x": floats(2, 3, 8, 8)})


def test_depthwise_conv_loses_rows_and_groups_with_its_input():
    model = build(
        """
      g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        a = Conv<pads = [1, 1, 1, 1]>(x, wp, bp)
        r = Relu(a)
        d = Conv<group = 8, pads = [1, 1, 1, 1]>(r, wd, bd)
        m = Relu(d)
        y = Conv(m, wc) }""",
        **producer(8, 3),
        wd=floats(8, 1, 3, 3),
        bd=floats(8),
        wc=consumer(4, 8, kernel=(1, 1)),
    )
    out, result = prune(model)
    assert result.details["groups"][0]["removed"] == DEAD
    depthwise = next(n for n in out.graph.node if "wd" in n.input)
    assert onnx.helper.get_attribute_value(depthwise.attribute[0]) == 4
    assert weights(out)["wd"].shape == (4, 1, 3, 3) and weights(out)["bd"].shape == (4,)
    assert_equivalent(model, out, {"x": floats(2, 3, 8, 8)})


@pytest.mark.parametrize("reader", ["Gemm<transB = 1>(f, wf, bf)", "MatMul(f, wft)"])
def test_flatten_turns_a_channel_into_a_block_of_gemm_rows(reader):
    fc = floats(10, 8, 4, 4)
    fc[:, DEAD] = 0  # each dead channel is a block of 16 features
    model = build(
        f"""
      g (float[2,3,4,4] x) => (float[2,10] y) {{
        a = Conv<pads = [1, 1, 1, 1]>(x, wp, bp)
        r = Relu(a)
        f = Flatten(r)
        y = {reader} }}""",
        **producer(8, 3),
        **(
            {"wf": fc.reshape(10, 128), "bf": floats(10)}
            if "Gemm" in reader
            else {"wft": fc.reshape(10, 128).T}
        ),
    )
    out, result = prune(model)
    assert result.details["groups"][0]["removed"] == DEAD
    expected = fc[:, [0, 2, 3, 5]].reshape(10, 64)
    kept = weights(out)
    if "Gemm" in reader:
        np.testing.assert_array_equal(kept["wf"], expected)
    else:
        np.testing.assert_array_equal(kept["wft"], expected.T)
    assert_equivalent(model, out, {"x": floats(2, 3, 4, 4)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_to_gemm_with_per_feature_bias(trans_b):
    w1, b1, w2 = floats(8, 6), floats(1, 8), floats(5, 8)
    w1[DEAD], b1[:, DEAD], w2[:, DEAD] = 0, 0, 0
    model = build(
        f"""
      g (float[3,6] x) => (float[3,5] y) {{
        a = Gemm<transB = {trans_b}, alpha = 0.5>(x, w1, b1)
        m = Relu(a)
        y = Gemm<transB = {trans_b}>(m, w2) }}""",
        w1=w1 if trans_b else w1.T,
        b1=b1,
        w2=w2 if trans_b else w2.T,
    )
    out, result = prune(model)
    assert result.details["groups"][0]["removed"] == DEAD
    assert weights(out)["b1"].shape == (1, 4)
    assert_equivalent(model, out, {"x": floats(3, 6)})


def test_matmul_mlp_with_bias_add_and_gelu():
    w1, b1, w2 = floats(6, 8), floats(8), floats(8, 5)
    w1[:, DEAD], b1[DEAD], w2[DEAD] = 0, 0, 0
    model = build(
        """
      g (float[2,3,6] x) => (float[2,3,5] y) {
        h = MatMul(x, w1)
        a = Add(h, b1)
        d = Div(a, root2)
        e = Erf(d)
        f = Add(e, one)
        p = Mul(a, f)
        m = Mul(p, half)
        y = MatMul(m, w2) }""",
        w1=w1,
        b1=b1,
        w2=w2,
        root2=SCALAR(np.sqrt(2)),
        one=SCALAR(1),
        half=SCALAR(0.5),
    )
    out, result = prune(model)
    assert result.details["groups"][0]["removed"] == DEAD
    assert {k: v.shape for k, v in weights(out).items() if k in ("w1", "b1", "w2")} == {
        "w1": (6, 4),
        "b1": (4,),
        "w2": (4, 5),
    }
    assert_equivalent(model, out, {"x": floats(2, 3, 6)})


def test_conv_transpose_as_producer_and_consumer():
    wp, bp, wc = floats(3, 8, 2, 2), floats(8), floats(8, 4, 2, 2)
    wp[:, DEAD], bp[DEAD], wc[DEAD] = 0, 0, 0
    model = build(
        """
      g (float[2,3,4,4] x) => (float[2,4,16,16] y) {
        a = ConvTranspose<strides = [2, 2]>(x, wp, bp)
        m = Relu(a)
        y = ConvTranspose<strides = [2, 2]>(m, wc) }""",
        wp=wp,
        bp=bp,
        wc=wc,
    )
    out, result = prune(model)
    assert result.details["groups"][0]["removed"] == DEAD
    assert weights(out)["wp"].shape == (3, 4, 2, 2) and weights(out)["wc"].shape == (4, 4, 2, 2)
    assert_equivalent(model, out, {"x": floats(2, 3, 4, 4)})


def test_squeeze_excitation_scale_couples_its_producer():
    # x·sigmoid(W2·relu(W1·gap(x))): the scale's producer W2 makes the same channels as x's.
    w2, b2, w1 = floats(8, 2, 1, 1), floats(8), floats(2, 8, 1, 1)
    w2[DEAD], b2[DEAD] = 0, 0
    w1[1], w2[:, 1] = 0, 0  # the squeeze group's channel 1 is dead too
    model = build(
        """
      g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        a = Conv<pads = [1, 1, 1, 1]>(x, wp, bp)
        p = GlobalAveragePool(a)
        q = Conv(p, w1)
        r = Relu(q)
        s = Conv(r, w2, b2)
        t = Sigmoid(s)
        m = Mul(a, t)
        y = Conv<pads = [1, 1, 1, 1]>(m, wc) }""",
        **producer(8, 3),
        w1=w1,
        w2=w2,
        b2=b2,
        wc=consumer(4, 8),
    )
    out, result = prune(model)
    rows = {len(row["producers"]): row for row in result.details["groups"]}
    assert rows[2]["removed"] == DEAD and rows[1]["removed"] == [1]
    assert weights(out)["w2"].shape == (4, 1, 1, 1)
    assert_equivalent(model, out, {"x": floats(2, 3, 8, 8)})


# ---------------------------------------------------------------------- unsafe groups

UNSAFE = {
    "graph output": ("m = Relu(a)", 8, "'a' is a graph output", {}),
    "reshape": ("m = Reshape(a, shape)", 8, "Reshape", {"shape": np.array([2, 8, 8, 8])}),
    "transpose": ("m = Transpose<perm = [0, 1, 3, 2]>(a)", 8, "Transpose", {}),
    "softmax over channels": ("m = Softmax<axis = 1>(a)", 8, "along the channel axis", {}),
    "slice of channels": (
        "m = Slice(a, st, en, ax)",
        4,
        "along the channel axis",
        {"st": [0], "en": [4], "ax": [1]},
    ),
    "split of channels": (
        "t1, t2 = Split<axis = 1>(a, sp)\n m = Concat<axis = 1>(t2, t1)",
        8,
        "along the channel axis",
        {"sp": np.array([3, 5])},
    ),
    "pad of channels": (
        "m = Pad(a, pads)",
        10,
        "pads the channel axis",
        {"pads": np.array([0, 1, 0, 0, 0, 1, 0, 0])},
    ),
    "concat with a constant": ("m = Concat<axis = 1>(a, k)", 9, "joins constant", {"k": floats(2, 1, 8, 8)}),
    "grouped conv": (
        "m = Conv<group = 2, pads = [1, 1, 1, 1]>(a, wg)",
        8,
        "grouped",
        {"wg": floats(8, 4, 3, 3)},
    ),
    "graph input": ("m = Add(a, x2)", 8, "'x2' is a graph input", {}),
    "computed weight": ("m = Conv<pads = [1, 1, 1, 1]>(a, wx)", 8, "no constant float weight", {}),
    "if body": (
        """m = If(flag) <
          then_branch = t () => (float[2,8,8,8] o1) { o1 = Relu(a) },
          else_branch = e () => (float[2,8,8,8] o2) { o2 = Sigmoid(a) } >""",
        8,
        "inside an If/Loop/Scan body",
        {},
    ),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_an_unsafe_group_is_skipped_and_the_model_is_unchanged(case):
    middle, width, reason, extra = UNSAFE[case]
    outputs = "float[N,C,H,W] y" + (", float[2,8,8,8] a" if case == "graph output" else "")
    inputs = "float[2,3,8,8] x" + {
        "graph input": ", float[2,8,8,8] x2",
        "computed weight": ", float[8,8,3,3] wx",
        "if body": ", bool flag",
    }.get(case, "")
    text = (
        CONV_PAIR.format(middle=middle)
        .replace("float[2,3,8,8] x", inputs)
        .replace("float[N,C,H,W] y", outputs)
    )
    model = build(text, **producer(8, 3), wc=consumer(4, width, dead=[]), **extra)
    out, result = prune(model)
    assert not result.modified and result.details["groups"] == []
    reasons = {row["name"]: row["reason"] for row in result.details["skipped"]}
    assert reason in reasons["p"] and "graph output" in reasons["c"]
    assert out.SerializeToString() == round_trip(model).SerializeToString()


def test_an_op_of_another_domain_makes_the_group_unsafe():
    model = build(
        CONV_PAIR.format(middle="m = my.ops.Scale(a)"),
        header='<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>',
        **producer(8, 3),
        wc=consumer(4, 8),
    )
    out, result = prune(model)
    assert not result.modified and "my.ops.Scale" in result.details["skipped"][0]["reason"]


def round_trip(model: onnx.ModelProto) -> onnx.ModelProto:
    """The import/export round trip alone, to compare an untouched model byte for byte."""
    source = onnx.ModelProto()
    source.CopyFrom(model)
    return to_model(to_graph(source), source)


# ------------------------------------------------------------------- options and choices


def relu_pair(dead=DEAD) -> onnx.ModelProto:
    return build(
        CONV_PAIR.format(middle="m = Relu(a)"), **producer(8, 3, dead=dead), wc=consumer(4, 8, dead=dead)
    )


def test_row_counts_parameters_of_what_the_group_touches():
    out, result = prune(relu_pair())
    (row,) = result.details["groups"]
    # wp 8·27 + bp 8 + wc 4·8·9 before; half of every channel axis after.
    assert (row["params_before"], row["params_after"]) == (216 + 8 + 288, 108 + 4 + 144)
    assert result.stats["params_before"] - result.stats["params_after"] == 256
    assert params(out) == 256


def test_exclude_protects_a_group_by_node_or_weight_name():
    for pattern in ("wc", "q*; p"):
        out, result = prune(relu_pair(), PruneStructured(kind=StructuredKind.FILTER, exclude=pattern))
        assert not result.modified and result.details["skipped"][0]["reason"] == "excluded"


def test_sparsity_zero_changes_nothing():
    model = relu_pair()
    out, result = prune(model, PruneStructured(sparsity=0.0))
    assert not result.modified and result.details["groups"][0]["removed"] == []
    assert out.SerializeToString() == round_trip(model).SerializeToString()


def test_high_sparsity_keeps_one_channel_per_tensor():
    out, result = prune(relu_pair(), PruneStructured(sparsity=0.99))
    assert result.details["groups"][0]["channels_after"] == 1 and weights(out)["wp"].shape[0] == 1


def test_concat_input_keeps_at_least_one_channel():
    p1, p2 = producer(1, 3, dead=[0]), producer(3, 3, dead=[])
    model = build(
        """
      g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        a1 = Conv<pads = [1, 1, 1, 1]>(x, wp1, bp1)
        a2 = Conv<pads = [1, 1, 1, 1]>(x, wp2, bp2)
        m = Concat<axis = 1>(a1, a2)
        y = Conv<pads = [1, 1, 1, 1]>(m, wc) }""",
        wp1=p1["wp"],
        bp1=p1["bp"],
        wp2=p2["wp"],
        bp2=p2["bp"],
        wc=consumer(4, 4, dead=[]),
    )
    out, result = prune(model)
    assert 0 not in result.details["groups"][0]["removed"]  # the weakest, but a1's only channel
    assert weights(out)["wp1"].shape[0] == 1 and weights(out)["wp2"].shape[0] == 1


def test_l1_and_l2_rank_channels_differently():
    # Channel 0's row is four ones (l1 4, l2 2), channel 1's a single 3 (l1 3, l2 3).
    w1 = np.array([[1, 1, 1, 1], [3, 0, 0, 0]], np.float32)
    model = build(
        """
      g (float[3,4] x) => (float[3,2] y) {
        a = Gemm<transB = 1>(x, w1)
        m = Relu(a)
        y = Gemm<transB = 1>(m, w2) }""",
        w1=w1,
        w2=floats(2, 2),
    )
    for norm, removed in ((ChannelImportance.L1, [1]), (ChannelImportance.L2, [0])):
        result = prune(model, PruneStructured(kind=StructuredKind.FILTER, importance=norm))[1]
        assert result.details["groups"][0]["removed"] == removed


def test_channel_kind_weighs_the_consumer_slices_too():
    w1 = np.array([[1.0, 0], [0, 1.1]], np.float32)  # producer rows alone: channel 0 is weaker
    w2 = np.array([[10.0, 0.1]], np.float32)  # but the consumer reads channel 0 far more
    model = build(
        """
      g (float[3,2] x) => (float[3,1] y) {
        a = Gemm<transB = 1>(x, w1)
        y = Gemm<transB = 1>(a, w2) }""",
        w1=w1,
        w2=w2,
    )
    filter_kind = PruneStructured(kind=StructuredKind.FILTER)
    assert prune(model, filter_kind)[1].details["groups"][0]["removed"] == [0]
    assert prune(model, PruneStructured())[1].details["groups"][0]["removed"] == [1]


def test_taylor_importance_removes_the_least_output_energy():
    # Channel energies E[a²]·‖W2[c]‖² differ from the weight norms: inputs scaled per feature.
    w1, w2 = np.eye(4, dtype=np.float32), np.array([[1.0, 1, 1, 1]], np.float32) * [[1, 2, 3, 4]]
    x = floats(64, 4) * np.array([8.0, 0.1, 1, 1], np.float32)
    model = build(
        """
      g (float[N,4] x) => (float[N,1] y) {
        a = Gemm<transB = 1>(x, w1)
        y = Gemm<transB = 1>(a, w2) }""",
        w1=w1,
        w2=w2.astype(np.float32),
    )
    energy = (x.astype(np.float64) ** 2).mean(0) * w2[0] ** 2
    expected = sorted(np.argsort(energy, kind="stable")[:2].tolist())
    ctx = PassContext(calib=ListSource([{"x": x[:32]}, {"x": x[32:]}]))
    result = prune(model, PruneStructured(importance=ChannelImportance.TAYLOR), ctx)[1]
    assert result.details["groups"][0]["removed"] == expected == [1, 2]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_zero_to_one_is_bad_input(sparsity):
    with pytest.raises(BadInput, match="sparsity"):
        prune(relu_pair(), PruneStructured(sparsity=sparsity))


@pytest.mark.parametrize(
    "p", [PruneStructured(importance=ChannelImportance.TAYLOR), PruneStructured(correct=True)]
)
def test_data_driven_options_without_calibration_are_bad_input(p):
    with pytest.raises(BadInput, match="--calib"):
        prune(relu_pair(), p)


def test_calibration_without_batches_is_bad_input():
    with pytest.raises(BadInput, match="no batches"):
        prune(
            relu_pair(),
            PruneStructured(importance=ChannelImportance.TAYLOR),
            PassContext(calib=ListSource([])),
        )


# ------------------------------------------------------------------------------ the zoo


def cleaned(name: str) -> onnx.ModelProto:
    return run_pipeline(onnx.load(MODELS / f"{name}.onnx"), Pipeline.parse("cleanup")).model


@pytest.mark.parametrize("name", ["resnet_s", "mobilenetv2_s", "digits_cnn"])
def test_zoo_models_at_half_the_channels_run_smaller_and_check_clean(name):
    dense = cleaned(name)
    pruned = run_pipeline(dense, Pipeline.parse("prune-structured{sparsity=0.5},infer-shapes")).model
    onnx.checker.check_model(pruned, full_check=True)
    assert params(pruned) < params(dense)
    if name == "resnet_s":
        assert params(pruned) <= params(dense) / 2
    with np.load(MODELS / f"{name}.input.npz") as archive:
        feeds = dict(archive)
    got, expected = run_checked(pruned, feeds), run_checked(dense, feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert all(np.isfinite(v).all() for v in got.values())


def test_zoo_transformer_prunes_its_mlp_hidden_channels_only():
    dense = cleaned("transformer_s")
    out, result = prune(dense, PruneStructured(sparsity=0.5))
    pruned = {row["group"] for row in result.details["groups"]}
    assert pruned == {"/layers/0/linear1/MatMul", "/layers/1/linear1/MatMul"}
    assert all(row["channels_after"] == 64 for row in result.details["groups"])
    with np.load(MODELS / "transformer_s.input.npz") as archive:
        assert run_checked(out, dict(archive))["hidden"].shape == (2, 16, 64)


def test_pass_runs_from_pipeline_text_and_reports_stats():
    model = relu_pair()
    out, stats = run_pass_with_stats(FILTER, model)
    assert stats["groups"] == 1 and (stats["channels_before"], stats["channels_after"]) == (8, 4)
    assert Pipeline.parse("prune-structured{kind=filter,importance=l1}").text() == (
        "prune-structured{kind=filter,importance=l1}"
    )
    assert_equivalent(model, out, {"x": floats(2, 3, 8, 8)})


def test_correct_refits_the_layers_that_lost_inputs():
    dense = cleaned("digits_cnn")
    ctx = PassContext(calib=zoo_source("digits_cnn", 64))
    out, result = prune(dense, PruneStructured(sparsity=0.25, correct=True), ctx)
    rows = {row["layer"]: row for row in result.details["correction"]}
    assert set(rows) == {"/conv2/Conv", "/fc/Gemm"}
    for row in rows.values():
        assert row["refit"] != "none" and row["sqnr_after_db"] > row["sqnr_before_db"]


def test_a_layer_reading_and_writing_one_group_loses_rows_and_columns():
    # s = a + conv(a): the conv's input channels and its output channels are the same ones.
    inner = producer(8, 8)
    model = build(
        """
      g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        [p] a = Conv<pads = [1, 1, 1, 1]>(x, wp, bp)
        [r] b = Conv<pads = [1, 1, 1, 1]>(a, wr, br)
        s = Add(a, b)
        m = Relu(s)
        [c] y = Conv<pads = [1, 1, 1, 1]>(m, wc) }""",
        **producer(8, 3),
        wr=inner["wp"],
        br=inner["bp"],
        wc=consumer(4, 8),
    )
    out, result = prune(model)
    (row,) = result.details["groups"]
    assert (row["producers"], row["consumers"], row["removed"]) == (["p", "r"], ["r", "c"], DEAD)
    assert weights(out)["wr"].shape == (4, 4, 3, 3)
    assert_equivalent(model, out, {"x": floats(2, 3, 8, 8)})


def test_kind_head_removes_attention_heads_through_the_pass():
    dense = cleaned("transformer_s")
    out, result = prune(dense, PruneStructured(kind=StructuredKind.HEAD, sparsity=0.5))
    rows = result.details["groups"]
    assert [(row["heads_before"], row["heads_after"]) for row in rows] == [(4, 2), (4, 2)]
    assert result.stats["params_after"] < result.stats["params_before"] and params(out) < params(dense)
    with np.load(MODELS / "transformer_s.input.npz") as archive:
        assert run_checked(out, dict(archive))["hidden"].shape == (2, 16, 64)


def test_kind_head_with_correct_refits_the_output_projections():
    ctx = PassContext(calib=zoo_source("transformer_s", 32))
    p = PruneStructured(kind=StructuredKind.HEAD, sparsity=0.5, correct=True)
    result = prune(cleaned("transformer_s"), p, ctx)[1]
    corrected = [row["layer"] for row in result.details["correction"]]
    assert corrected == [f"/layers/{i}/self_attn/out_proj/MatMul" for i in (0, 1)]
