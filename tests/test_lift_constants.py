"""lift-constants: Constant nodes become initializers of their own graph, outputs unchanged."""

from __future__ import annotations

import export_like
import numpy as np
import onnx
from helpers import assert_same_outputs, op_counts, run_pass
from onnx import numpy_helper

from polaris_opt.export import to_graph
from polaris_opt.passes.lift_constants import LiftConstants
from polaris_opt.passes_api import PassContext

ALL_KINDS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y, int64[2] shape) {
  w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
  s = Constant <value_float = 0.5> ()
  shape = Constant <value_ints = [1, 2]> ()
  k = Constant <value_int = 3> ()
  kf = Cast <to = 1> (k)
  a = Mul(x, w)
  b = Mul(a, s)
  y = Add(b, kf)
}"""


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {tensor.name for tensor in graph.initializer}


def test_every_kind_of_constant_becomes_an_initializer():
    model = onnx.parser.parse_model(ALL_KINDS)
    out = run_pass(LiftConstants(), model)
    # `shape` is a graph output: it keeps its Constant node, and its name.
    assert op_counts(out) == {"Constant": 1, "Cast": 1, "Mul": 2, "Add": 1}
    assert initializer_names(out.graph) == {"w", "s", "k"}
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert values["s"].dtype == np.float32 and values["s"].shape == ()
    assert values["k"].dtype == np.int64 and values["k"] == 3
    assert [o.name for o in out.graph.output] == ["y", "shape"]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert_same_outputs(model, out, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    onnx.checker.check_model(out, full_check=True)


def test_stats_count_lifted_and_kept_nodes():
    result = LiftConstants().run(to_graph(onnx.parser.parse_model(ALL_KINDS)), PassContext())
    assert result.modified and result.stats == {"lifted": 3, "skipped": 1}


def test_paddle_like_weights_leave_their_constant_nodes():
    model, feeds = export_like.paddle_like()
    assert op_counts(model)["Constant"] > 0
    out = run_pass(LiftConstants(), model)
    assert op_counts(out)["Constant"] == 0
    assert_same_outputs(model, out, feeds)
    onnx.checker.check_model(out, full_check=True)


def test_if_branch_constants_become_branch_initializers():
    model, feeds = export_like.with_if()
    out = run_pass(LiftConstants(), model)
    branches = {attr.name: attr.g for attr in out.graph.node[0].attribute}
    then_branch, else_branch = branches["then_branch"], branches["else_branch"]
    assert op_counts(out, recursive=True)["Constant"] == 0
    assert "then_c" in initializer_names(then_branch) and "else_c" in initializer_names(else_branch)
    assert not {"then_c", "else_c"} & initializer_names(out.graph)  # scoping kept
    for cond in (True, False):
        assert_same_outputs(model, out, {**feeds, "cond": np.array(cond)})
    onnx.checker.check_model(out, full_check=True)


def test_loop_body_constant_becomes_body_initializer():
    model, feeds = export_like.with_loop()
    out = run_pass(LiftConstants(), model)
    body = out.graph.node[0].attribute[0].g
    assert op_counts(body) == {"Identity": 2, "Add": 1}
    assert "step" in initializer_names(body)
    assert_same_outputs(model, out, feeds)
    onnx.checker.check_model(out, full_check=True)


def test_outer_constant_read_only_by_a_branch_keeps_working():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N] x, bool c) => (float[N] y) {
        k = Constant <value = float[1] {4.0}> ()
        y = If(c) <then_branch = t () => (float[N] a) { a = Add(x, k) },
                   else_branch = e () => (float[N] b) { b = Mul(x, k) }> }""")
    out = run_pass(LiftConstants(), model)
    assert op_counts(out, recursive=True) == {"If": 1, "Add": 1, "Mul": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {"x": np.ones(2, np.float32), "c": np.array(cond)})
    onnx.checker.check_model(out, full_check=True)


def test_other_domains_and_exotic_dtypes_are_left_exact():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "my.custom" : 1]>
      g (float[N] x) => (float[N] y, float[N] z) {
        c = my.custom.Constant <value = float[1] {1.0}> ()
        z = my.custom.Foo(x, c)
        hf = Cast <to = 1> (h)
        y = Add(x, hf) }""")
    # bfloat16 has no NumPy type: the lifted initializer must keep the original bytes.
    bf16 = onnx.helper.make_tensor("h", onnx.TensorProto.BFLOAT16, [2], [1.5, -2.0])
    model.graph.node.insert(2, onnx.helper.make_node("Constant", [], ["h"], value=bf16))
    original_bytes = bf16.SerializeToString()
    out = run_pass(LiftConstants(), model)
    assert op_counts(out) == {"my.custom.Constant": 1, "my.custom.Foo": 1, "Cast": 1, "Add": 1}
    (lifted,) = out.graph.initializer
    assert lifted.SerializeToString() == original_bytes
    onnx.checker.check_model(out, full_check=True)


def test_a_model_without_constants_is_not_modified():
    model, _ = export_like.pytorch_like()
    graph = to_graph(model)
    graph.nodes = [node for node in graph.nodes if node.op != "Constant"]
    assert LiftConstants().run(graph, PassContext()).stats["lifted"] == 0
