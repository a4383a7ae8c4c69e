"""eliminate-identity: Identity and inference Dropout go; interface names and sub-graphs stay."""

from __future__ import annotations

import export_like
import numpy as np
import onnx
from helpers import assert_same_outputs, op_counts, run_pass

from polaris_opt.export import to_graph
from polaris_opt.passes.eliminate_identity import EliminateIdentity
from polaris_opt.passes_api import PassContext

CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y, float[N,4] passthrough) {
  a = Identity(x)
  b = Relu(a)
  c = Identity(b)
  d = Dropout(c)
  y = Identity(d)
  passthrough = Identity(x)
}"""


def feeds(n: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.linspace(-1, 1, n * 4, dtype=np.float32).reshape(n, 4)}


def test_chain_collapses_and_interface_names_stay():
    model = onnx.parser.parse_model(CHAIN)
    out = run_pass(EliminateIdentity(), model)
    # x -> passthrough maps an input straight to an output: only an Identity can do that.
    assert op_counts(out) == {"Relu": 1, "Identity": 1}
    relu = next(node for node in out.graph.node if node.op_type == "Relu")
    assert list(relu.input) == ["x"] and list(relu.output) == ["y"]
    assert [o.name for o in out.graph.output] == ["y", "passthrough"]
    assert [d.dim_param for d in out.graph.output[0].type.tensor_type.shape.dim] == ["N", ""]
    assert_same_outputs(model, out, feeds(3))
    onnx.checker.check_model(out, full_check=True)


def test_stats_count_removed_nodes():
    result = EliminateIdentity().run(to_graph(onnx.parser.parse_model(CHAIN)), PassContext())
    assert result.modified and result.stats == {"removed": 4}


def test_dropout_stays_when_asked_or_when_its_mask_or_training_matters():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N,4] x, bool train) => (float[N,4] y, bool[N,4] mask, float[N,4] z) {
        r = Dropout(x)
        y, mask = Dropout(r)
        z = Dropout(x, ratio, train) }""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(0.5), "ratio"))
    assert op_counts(run_pass(EliminateIdentity(dropout=False), model)) == {"Dropout": 3}
    out = run_pass(EliminateIdentity(), model)
    assert op_counts(out) == {"Dropout": 2}
    assert_same_outputs(model, out, {**feeds(), "train": np.array(False)})
    onnx.checker.check_model(out, full_check=True)


def test_dropout_with_constant_false_training_mode_goes():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N,4] x) => (float[N,4] y) <float ratio = {0.5}, bool off = {0}> {
        d = Dropout(x, ratio, off)
        y = Relu(d) }""")
    out = run_pass(EliminateIdentity(), model)
    assert op_counts(out) == {"Relu": 1}
    assert_same_outputs(model, out, feeds())


def test_if_branches_keep_identities_of_outer_tensors():
    model, inputs = export_like.with_if()
    out = run_pass(EliminateIdentity(), model)
    branches = {attr.name: attr.g for attr in out.graph.node[0].attribute}
    for name, prefix in (("then_branch", "then"), ("else_branch", "else")):
        assert op_counts(branches[name])["Identity"] == 0
        add = next(node for node in branches[name].node if node.op_type == "Add")
        assert add.input[0] == "x"  # reads the outer input by name now
        assert branches[name].output[0].name == f"{prefix}_out"
    for cond in (True, False):
        assert_same_outputs(model, out, {**inputs, "cond": np.array(cond)})
    onnx.checker.check_model(out, full_check=True)


def test_loop_body_pass_through_identities_stay():
    model, inputs = export_like.with_loop()
    out = run_pass(EliminateIdentity(), model)
    # cond_in -> cond_out and acc_out -> scan_out both join two body interface names.
    assert op_counts(out, recursive=True) == op_counts(model, recursive=True)
    assert_same_outputs(model, out, inputs)


def test_identity_inside_a_branch_on_a_local_value_goes():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N,4] x, bool c) => (float[N,4] y) {
        y = If(c) <then_branch = t () => (float[N,4] a) { r = Relu(x)  a = Identity(r) },
                   else_branch = e () => (float[N,4] b) { n = Neg(x)  i = Identity(n)  b = Abs(i) }> }""")
    out = run_pass(EliminateIdentity(), model)
    assert op_counts(out, recursive=True) == {"If": 1, "Relu": 1, "Neg": 1, "Abs": 1}
    for cond in (True, False):
        assert_same_outputs(model, out, {**feeds(), "c": np.array(cond)})
    onnx.checker.check_model(out, full_check=True)


def test_identities_of_other_domains_are_left_alone():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "my.custom" : 1]>
      g (float[N,4] x) => (float[N,4] y) {
        a = my.custom.Identity(x)
        b = Identity(a)
        y = my.custom.Identity(b) }""")
    out = run_pass(EliminateIdentity(), model)
    assert op_counts(out) == {"my.custom.Identity": 2}
    assert [(list(n.input), list(n.output)) for n in out.graph.node] == [(["x"], ["a"]), (["a"], ["y"])]


def test_pytorch_like_identities_go_and_outputs_match():
    model, inputs = export_like.pytorch_like()
    out = run_pass(EliminateIdentity(), model)
    assert op_counts(out)["Identity"] == 0 < op_counts(model)["Identity"]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out, inputs)
    onnx.checker.check_model(out, full_check=True)
