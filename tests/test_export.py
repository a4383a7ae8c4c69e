"""Export: the full model keeps every weight byte for byte; a skeleton keeps every name, type and
dims but no big payload; neither leaves the graph changed."""

from __future__ import annotations

import json
from pathlib import Path

import export_like
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_same_outputs
from onnx import TensorProto, numpy_helper

from polaris_opt.export import skeleton_model, tensor_problem, to_graph, to_model
from polaris_opt.passes.fold_constants import FoldConstants
from polaris_opt.passes_api import PassContext
from polaris_opt.proto import proto_graphs

MODELS = Path(__file__).resolve().parent.parent / "models"
ZOO = json.loads((MODELS / "zoo.json").read_text())["models"]

# A big weight in each place a shell can end up: the top-level graph (w), an If branch of its
# own (u), and the outer scope, read by a Loop body only (v); `bias` is small.
SCOPES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,64] x, bool c, int64 n) => (float[N,64] y, float[N,64] s) {
  m = MatMul(x, w)
  y = If(c) <then_branch = t () => (float[N,64] a) { h = MatMul(m, u)  a = Add(h, bias) },
             else_branch = e () => (float[N,64] b) { b = Concat <axis = 1> (m, m) }>
  s = Loop(n, c, x) <body = body (int64 i, bool cin, float[N,64] acc) => (bool cout, float[N,64] next) {
    cout = Identity(cin)
    next = MatMul(acc, v) }>
}"""


def scopes_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(SCOPES)
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) / 8, name)

    model.graph.initializer.extend([weight("w", 64, 32), weight("v", 64, 64)])
    then_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    then_branch.initializer.extend([weight("u", 32, 64), weight("bias", 64)])
    onnx.checker.check_model(model, full_check=True)
    return model


def weights(model: onnx.ModelProto) -> dict[str, bytes]:
    """name -> payload bytes, of every initializer in every graph."""
    found = {}
    for graph in proto_graphs(model.graph):
        found.update({t.name: numpy_helper.to_array(t).tobytes() for t in graph.initializer})
    return found


@pytest.mark.parametrize("name", sorted(ZOO))
def test_full_export_keeps_every_weight_byte_for_byte(name):
    model = onnx.load(MODELS / ZOO[name]["file"])
    out = to_model(to_graph(model), model)
    assert weights(out) == weights(model)
    onnx.checker.check_model(out, full_check=True)


def test_full_export_of_weights_in_every_scope_runs_as_the_input():
    model = scopes_model()
    out = to_model(to_graph(model), model)
    assert weights(out) == weights(model)
    feeds = {
        "x": np.ones((2, 64), np.float32) / 64,
        "c": np.array(True),
        "n": np.array(2, np.int64),
    }
    assert_same_outputs(model, out, feeds)


def test_skeleton_declares_big_weights_as_typed_inputs_wherever_they_are():
    skeleton = skeleton_model(to_graph(scopes_model()))
    inputs = {vi.name: vi.type.tensor_type for vi in skeleton.graph.input}
    for name, dims in (("w", [64, 32]), ("u", [32, 64]), ("v", [64, 64])):
        assert inputs[name].elem_type == TensorProto.FLOAT
        assert [d.dim_value for d in inputs[name].shape.dim] == dims
    assert set(weights(skeleton)) == {"bias"}  # small: kept with its values
    onnx.checker.check_model(skeleton, full_check=True)


def test_a_big_weight_that_is_also_a_graph_output_keeps_its_payload():
    # Folding makes k a weight; declared as an input too, a shell would name it twice.
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N,64] x) => (float[N,32] y, float[64,32] k) { y = MatMul(x, w)  k = Relu(w) }""")
    model.graph.initializer.append(numpy_helper.from_array(np.ones((64, 32), np.float32), "w"))
    graph = to_graph(model)
    FoldConstants().run(graph, PassContext())
    skeleton = skeleton_model(graph, model)
    assert list(weights(skeleton)) == ["k"]
    assert "w" in [vi.name for vi in skeleton.graph.input]
    onnx.checker.check_model(skeleton, full_check=True)


def test_exports_leave_every_weight_holding_its_own_values():
    graph = to_graph(scopes_model())
    before = {name: t._values for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    skeleton_model(graph)
    to_model(graph)
    after = {name: t._values for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    assert all(after[name] is values for name, values in before.items())


def test_a_failed_export_leaves_every_weight_holding_its_own_values(monkeypatch):
    graph = to_graph(scopes_model())
    weight = graph.tensors()["w"]
    values = weight._values

    def fail(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(gs, "export_onnx", fail)
    with pytest.raises(RuntimeError):
        skeleton_model(graph)
    assert weight._values is values


def test_exporter_shaped_models_export_whole():
    for build in (export_like.pytorch_like, export_like.with_if, export_like.with_loop):
        model, feeds = build()
        out = to_model(to_graph(model), model)
        assert weights(out) == weights(model)
        assert_same_outputs(model, out, feeds)


def raw(dims: list[int], size: int, data_type=TensorProto.FLOAT) -> onnx.TensorProto:
    return onnx.TensorProto(name="w", data_type=data_type, dims=dims, raw_data=b"\0" * size)


@pytest.mark.parametrize(
    "tensor, problem",
    [
        (raw([64, 32], 64 * 32 * 4), None),
        (raw([64, 32], 64 * 32 * 4 - 4), "holds 8188 bytes of raw_data; its dims and type need 8192"),
        (raw([64, 32], 64 * 32 * 4 + 4), "holds 8196 bytes"),
        (raw([64, 32], 64 * 32 * 8, TensorProto.INT64), None),
        (onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3], float_data=[1.0]), "float_data"),
        (raw([3], 3, TensorProto.STRING), "STRING data"),
    ],
)
def test_tensor_problem_measures_payloads_against_dims_and_type(tensor, problem):
    found = tensor_problem(tensor)
    assert found is None if problem is None else problem in found
