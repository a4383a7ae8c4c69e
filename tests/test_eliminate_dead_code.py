"""eliminate-dead-code: what reaches no output goes; what sub-graphs read by name stays."""

from __future__ import annotations

import export_like
import numpy as np
import onnx
from helpers import assert_same_outputs, op_counts, run_pass

from polaris_opt.export import to_graph
from polaris_opt.passes.eliminate_dead_code import EliminateDeadCode
from polaris_opt.passes_api import PassContext

DEAD_CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x, float[N,3] unused) => (float[N,3] y)
  <float[3] w = {1.0, 2.0, 3.0}, float[3] v = {4.0, 5.0, 6.0}> {
  y = Mul(x, w)
  d = Add(x, v)
  e = Relu(d)
}"""

OUTER_SCOPE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x, bool c) => (float[N,3] y) <float[3] w = {1.0, 2.0, 3.0}> {
  z = Sigmoid(x)
  k = Neg(x)
  y = If(c) <
    then_branch = t () => (float[N,3] a) {
      a = If(c) <then_branch = tt () => (float[N,3] p) { p = Add(z, w) },
                 else_branch = te () => (float[N,3] q) { q = Mul(z, w) }> },
    else_branch = e () => (float[N,3] b) { dead = Relu(k)  b = Abs(x) }>
}"""


def run(model: onnx.ModelProto):
    return EliminateDeadCode().run(to_graph(model), PassContext())


def test_dead_chain_and_its_weight_go_but_inputs_stay():
    model = onnx.parser.parse_model(DEAD_CHAIN)
    out = run_pass(EliminateDeadCode(), model)
    assert op_counts(out) == {"Mul": 1}
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert [i.name for i in out.graph.input] == ["x", "unused"]  # the interface is kept
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    feeds = {"x": np.ones((2, 3), np.float32), "unused": np.zeros((2, 3), np.float32)}
    assert_same_outputs(model, out, feeds)
    onnx.checker.check_model(out, full_check=True)


def test_stats():
    result = run(onnx.parser.parse_model(DEAD_CHAIN))
    assert result.modified and result.stats == {"nodes_removed": 2, "initializers_removed": 1}
    clean = run(onnx.parser.parse_model(DEAD_CHAIN.replace("  d = Add(x, v)\n  e = Relu(d)\n", "")))
    assert not clean.modified and clean.stats == {"nodes_removed": 0, "initializers_removed": 0}


def test_tensors_read_only_by_nested_branches_stay():
    model = onnx.parser.parse_model(OUTER_SCOPE)
    out = run_pass(EliminateDeadCode(), model)
    # z is read two levels down, by name only; k was read only by a dead node of a branch.
    assert op_counts(out) == {"Sigmoid": 1, "If": 1}
    assert op_counts(out, recursive=True) == {"Sigmoid": 1, "If": 2, "Add": 1, "Mul": 1, "Abs": 1}
    for cond in (True, False):
        feeds = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "c": np.array(cond)}
        assert_same_outputs(model, out, feeds)
    onnx.checker.check_model(out, full_check=True)


def test_outer_scope_stats_count_nested_removals():
    assert run(onnx.parser.parse_model(OUTER_SCOPE)).stats["nodes_removed"] == 2  # dead, then k


def test_dead_nodes_in_a_loop_body_go_and_body_inputs_stay():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N] x) => (float[N] y) <int64 trips = {3}, bool go = {1}> {
        y = Loop(trips, go, x) <body = b (int64 i, bool c_in, float[N] acc) => (bool c_out, float[N] next) {
            c_out = Identity(c_in)
            waste = Exp(acc)
            next = Add(acc, acc) }> }""")
    out = run_pass(EliminateDeadCode(), model)
    body = out.graph.node[0].attribute[0].g
    assert op_counts(body) == {"Identity": 1, "Add": 1}
    assert [i.name for i in body.input] == ["i", "c_in", "acc"]
    assert_same_outputs(model, out, {"x": np.arange(3, dtype=np.float32)})
    onnx.checker.check_model(out, full_check=True)


def test_dead_nodes_of_other_domains_stay_with_their_inputs():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
      g (float[N,3] x) => (float[N,3] y) {
        y = Relu(x)
        s = Sigmoid(x)
        g = com.microsoft.Gelu(s)
        n = Neg(x) }""")
    out = run_pass(EliminateDeadCode(), model)
    assert op_counts(out) == {"Relu": 1, "Sigmoid": 1, "com.microsoft.Gelu": 1}
    assert_same_outputs(model, out, {"x": np.ones((1, 3), np.float32)})


def test_pytorch_like_dead_branch_goes():
    model, feeds = export_like.pytorch_like()
    out = run_pass(EliminateDeadCode(), model)
    assert sum(op_counts(out).values()) < sum(op_counts(model).values())
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out, feeds)
    onnx.checker.check_model(out, full_check=True)


def test_control_flow_models_lose_nothing_live():
    for build in (export_like.with_if, export_like.with_loop):
        model, feeds = build()
        out = run_pass(EliminateDeadCode(), model)
        assert op_counts(out, recursive=True) == op_counts(model, recursive=True)
        assert_same_outputs(model, out, feeds)
        onnx.checker.check_model(out, full_check=True)
