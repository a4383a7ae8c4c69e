"""fold-constants: structure (op counts), numerics against the input on ORT, onnx.checker."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from export_like import paddle_like, pytorch_like, tf2onnx_like, with_if, with_loop, with_unknown_domains
from helpers import assert_same_outputs, op_counts, run_pass, run_pass_with_stats
from onnx import numpy_helper

from polaris_opt.passes import fold_constants
from polaris_opt.passes.fold_constants import FoldConstants
from polaris_opt.passes.lift_constants import LiftConstants
from polaris_opt.pipeline import Pipeline

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)


def parse(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def fold(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    out, stats = run_pass_with_stats(FoldConstants(**options), model)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# x.view(x.size(0), -1) as torch.onnx writes it.
FLATTEN = """
  g ({x_type} x) => (float[{out_shape}] y) {{
    s = Shape(x)
    i = Constant<value = int64 {{0}}>()
    b = Gather<axis = 0>(s, i)
    a = Constant<value = int64[1] {{0}}>()
    u = Unsqueeze(b, a)
    m = Constant<value = int64[1] {{-1}}>()
    c = Concat<axis = 0>(u, m)
    r = Reshape(x, c)
    y = Relu(r) }}"""


def test_static_flatten_chain_folds_into_a_constant_reshape_shape():
    model = parse(FLATTEN.format(x_type="float[2,3,4,4]", out_shape="2,48"))
    out, stats = fold(model)
    assert op_counts(out) == {"Reshape": 1, "Relu": 1}
    shape = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["c"]
    assert shape.tolist() == [2, -1]
    assert stats["shapes_folded"] == 1 and stats["folded"] >= 4
    assert_same_outputs(model, out, {"x": floats(2, 3, 4, 4)})


def test_shape_of_a_dynamic_batch_is_not_folded():
    model = parse(FLATTEN.format(x_type="float[N,3,4,4]", out_shape="N,48"))
    out, _ = fold(model)
    counts = op_counts(out)
    assert counts["Shape"] == 1 and counts["Gather"] == 1 and counts["Concat"] == 1
    assert counts["Constant"] == 0  # the constant parts still fold
    assert_same_outputs(model, out, {"x": floats(5, 3, 4, 4)})


def test_static_dims_of_a_dynamic_tensor_fold_and_the_dynamic_one_stays():
    model = parse("""
      g (float[N,3,4] x, float[2,5] z) => (int64 c, int64[2] tail, int64[1] head, int64[2] last,
                                           int64 n, int64 ten) {
        s = Shape(x)
        k = Constant<value = int64 {1}>()
        c = Gather<axis = 0>(s, k)
        one = Constant<value = int64[1] {1}>()
        big = Constant<value = int64[1] {100}>()
        zero = Constant<value = int64[1] {0}>()
        tail = Slice(s, one, big)
        head = Slice(s, zero, one)
        last = Shape<start = -2>(x)
        n = Size(x)
        ten = Size(z) }""")
    out, stats = fold(model)
    # Only what involves the batch dim stays computed.
    assert op_counts(out) == {"Shape": 1, "Slice": 1, "Size": 1}
    assert stats["shapes_folded"] == 4
    assert_same_outputs(model, out, {"x": floats(7, 3, 4), "z": floats(2, 5)})


def test_fold_shapes_false_keeps_shape_nodes():
    model = parse(FLATTEN.format(x_type="float[2,3,4,4]", out_shape="2,48"))
    out, stats = fold(model, fold_shapes=False)
    assert op_counts(out)["Shape"] == 1 and stats["shapes_folded"] == 0


def test_tf2onnx_weight_transpose_and_cast_fold_into_plain_initializers():
    model, feeds = tf2onnx_like()
    out, _ = fold(model)
    counts = op_counts(out)
    assert counts["Transpose"] == 2 and counts["Cast"] == 0 and counts["Constant"] == 0
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    initializers = {t.name: t for t in out.graph.initializer}
    assert conv.input[1] in initializers and list(initializers[conv.input[1]].dims) == [4, 3, 3, 3]
    assert initializers[conv.input[2]].data_type == onnx.TensorProto.FLOAT
    assert_same_outputs(model, out, feeds)


@pytest.mark.parametrize("build", [pytorch_like, paddle_like, with_loop])
def test_exporter_models_keep_their_outputs(build):
    model, feeds = build()
    out, stats = fold(model)
    assert stats["folded"] > 0
    assert op_counts(out, recursive=True)["Constant"] == 0
    assert_same_outputs(model, out, feeds)


def test_pytorch_like_dynamic_batch_flatten_stays():
    model, _ = pytorch_like()
    out, _ = fold(model)
    assert op_counts(out)["Shape"] == 1 and op_counts(out)["Gather"] == 1


def test_folds_inside_if_branches_but_not_what_reads_outer_variables():
    model, feeds = with_if()
    out, _ = fold(model)
    counts = op_counts(out, recursive=True)
    assert counts["Constant"] == 0 and counts["Add"] == 3 and counts["Mul"] == 1
    assert_same_outputs(model, out, {**feeds, "cond": np.array(False)})
    assert_same_outputs(model, out, feeds)


def test_a_branch_computed_from_outer_constants_becomes_a_constant_output():
    model = parse(
        """
      g (float[2] x, bool c) => (float[2] y) <float[2] w> {
        y = If(c) <
          then_branch = t () => (float[2] a) { two = Constant<value = float {2.0}>()
                                               a = Mul(w, two) },
          else_branch = e () => (float[2] b) { b = Sub(x, w) } > }""",
        w=np.array([1.5, -2.0], np.float32),
    )
    out, _ = fold(model)
    assert op_counts(out, recursive=True) == {"If": 1, "Sub": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": floats(2), "c": np.array(cond)})


def test_control_flow_nodes_stay_even_with_constant_inputs():
    # A sub-graph may read outer tensors the node does not list as inputs; folding happens
    # inside the branches instead.
    model = parse(
        """
      g (float[2] x) => (float[2] y) <bool c, float[2] w> {
        r = If(c) <
          then_branch = t () => (float[2] a) { two = Constant<value = float {2.0}>()
                                               a = Mul(w, two) },
          else_branch = e () => (float[2] b) { b = Sub(w, w) } >
        y = Add(x, r) }""",
        c=np.array(True),
        w=np.array([1.5, -2.0], np.float32),
    )
    out, _ = fold(model)
    assert op_counts(out, recursive=True) == {"If": 1, "Add": 1}
    assert_same_outputs(model, out, {"x": floats(2)})


def test_shapes_inside_a_loop_body_are_not_folded():
    # The loop-carried `acc` is declared [2] but may change shape between iterations.
    model = parse(
        """
      g (float[2] x) => (float[2] y) <int64 n> {
        y = Loop(n, , x) <body = b (int64 i, bool c_in, float[2] acc) => (bool c_out, float[2] next) {
          c_out = Identity(c_in)
          s = Shape(acc)
          f = Cast<to = 1>(s)
          next = Add(acc, f) }> }""",
        n=np.array(3),
    )
    out, stats = fold(model)
    assert op_counts(out, recursive=True)["Shape"] == 1 and stats["shapes_folded"] == 0
    assert_same_outputs(model, out, {"x": floats(2)})


def test_graph_output_computed_from_constants_keeps_its_name():
    model = parse(
        "g (float[2] x) => (float[2] y, float[2] k) <float[2] w> { k = Exp(w)\n y = Add(x, k) }", w=floats(2)
    )
    out, _ = fold(model)
    assert [o.name for o in out.graph.output] == ["y", "k"] and op_counts(out) == {"Add": 1}
    assert_same_outputs(model, out, {"x": floats(2)})


def test_unknown_domain_nodes_are_left_untouched():
    model, feeds = with_unknown_domains(custom=False)
    model.graph.initializer.append(numpy_helper.from_array(floats(8, 8), "w2"))
    gelu = onnx.helper.make_node("Gelu", ["w2"], ["g2"], domain="com.microsoft")
    model.graph.node.extend([gelu, onnx.helper.make_node("MatMul", ["y", "g2"], ["z"])])
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", 8]))
    out, stats = fold(model)
    assert op_counts(out) == op_counts(model) and stats["folded"] == 0
    assert_same_outputs(model, out, feeds)
    custom, _ = with_unknown_domains()
    assert op_counts(fold(custom)[0]) == op_counts(custom)


def test_random_ops_are_not_folded():
    model = parse(
        """
      g (float[3] x) => (float[3] y) <float[3] w> {
        r = RandomUniformLike<seed = 1.0>(w)
        n = RandomNormal<shape = [3]>()
        s = Add(r, n)
        y = Add(x, s) }""",
        w=floats(3),
    )
    out, stats = fold(model)
    assert op_counts(out) == op_counts(model) and stats["folded"] == 0


def test_dequantize_of_a_quantized_weight_stays():
    model = parse(
        """
      g (float[2,4] x) => (float[2,3] y) <int8[4,3] q, float s, int8 z> {
        w = DequantizeLinear(q, s, z)
        y = MatMul(x, w) }""",
        q=RNG.integers(-8, 8, (4, 3)).astype(np.int8),
        s=np.float32(0.1),
        z=np.int8(0),
    )
    assert op_counts(fold(model)[0]) == {"DequantizeLinear": 1, "MatMul": 1}


BIG = """
  g (float[2] x) => (float[2] y) {
    side = Constant<value = int64[1] {1024}>()
    SHAPE
    big = ConstantOfShape<value = float[1] {1.0}>(dims)
    total = ReduceSum<keepdims = 0>(big)
    y = Add(x, total) }"""


# Shape inference propagates values through Concat, so the size is known before evaluation
# and the 4 MB tensor is never computed; through Abs it does not, and the size shows only in
# the result.
@pytest.mark.parametrize(
    ("shape", "evaluated"),
    [
        ("dims = Concat<axis = 0>(side, side)", False),
        ("two = Concat<axis = 0>(side, side)\n dims = Abs(two)", True),
    ],
)
def test_results_above_the_size_limit_keep_their_node(shape, evaluated, monkeypatch):
    model = parse(BIG.replace("SHAPE", shape))
    computed = []
    monkeypatch.setattr(fold_constants, "make_session", _recording(fold_constants.make_session, computed))
    out, stats = fold(model, max_size_mb=1.0)
    assert op_counts(out)["ConstantOfShape"] == 1 and stats["too_large"] == 1
    assert ("big" in computed) == evaluated
    assert all(numpy_helper.to_array(t).nbytes <= 2**20 for t in out.graph.initializer)
    assert_same_outputs(model, out, {"x": floats(2)})
    out, stats = fold(model)
    assert op_counts(out) == {"Add": 1} and stats["too_large"] == 0


def _recording(make_session, names: list[str]):
    def wrapper(model, **kwargs):
        names.extend(output.name for output in model.graph.output)
        return make_session(model, **kwargs)

    return wrapper


def test_a_node_ort_cannot_evaluate_stays_and_the_rest_folds():
    model = parse(
        """
      g (float[2] x) => (float[2] y, float[2] z) <float[3] w, int64[1] start, int64[1] stop, int64[1] bad> {
        e = Exp(w)
        two = Slice(e, start, stop)
        y = Add(x, two)
        picked = Gather(w, bad)
        z = Add(x, picked) }""",
        w=floats(3),
        start=np.array([0]),
        stop=np.array([2]),
        bad=np.array([7]),  # out of range: ORT fails on it at run time
    )
    out, stats = fold(model)
    assert op_counts(out) == {"Add": 2, "Gather": 1} and stats["folded"] == 2


def test_sparse_initializers_stay_sparse():
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sw")
    sparse = onnx.helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 3]), "i"), [2, 2])
    model = onnx.parser.parse_model(
        HEADER + "g (float[2,2] x) => (float[2,2] y) { t = Transpose(sw)\n y = Add(x, t) }"
    )
    model.graph.sparse_initializer.append(sparse)
    out = run_pass(FoldConstants(), model)
    # Shape inference types a sparse initializer as sparse_tensor, which no standard op takes
    # (ORT densifies it at load), so only the basic checker applies to this model.
    onnx.checker.check_model(out)
    assert op_counts(out) == {"Transpose": 1, "Add": 1} and len(out.graph.sparse_initializer) == 1
    assert numpy_helper.to_array(out.graph.sparse_initializer[0].values).dtype == np.float32
    assert_same_outputs(model, out, {"x": floats(2, 2)})


def test_after_lift_constants_in_a_pipeline():
    model, feeds = paddle_like()
    out = run_pass(FoldConstants(), run_pass(LiftConstants(), model))
    assert op_counts(out)["Constant"] == 0
    assert_same_outputs(model, out, feeds)


def test_options_parse_from_pipeline_text():
    [(_, fold_pass)] = Pipeline.parse("fold-constants{max-size-mb=0.5,fold-shapes=false}").passes()
    assert fold_pass == FoldConstants(max_size_mb=0.5, fold_shapes=False)
