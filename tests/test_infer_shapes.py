"""infer-shapes: inferred types land on the graph; declared and symbolic dims stay as they were."""

from __future__ import annotations

import export_like
import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, run_pass

from polaris_opt.export import skeleton_model, to_graph
from polaris_opt.passes.infer_shapes import InferShapes
from polaris_opt.passes_api import PassContext

MIXED = """<ir_version: 8, opset_import: ["" : 17, "my.custom" : 1]>
g (float[N,3] x) => (float[N,6] y, float z) <int64[2] shape = {-1, 6}> {
  a = Relu(x)
  t = Concat <axis = 1> (a, a)
  r = Reshape(t, shape)
  y = Identity(r)
  b = my.custom.Foo(a)
  c = Relu(b)
  z = ReduceSum <keepdims = 0> (c)
}"""


def value_infos(model: onnx.ModelProto | onnx.GraphProto) -> dict[str, tuple[int, list]]:
    """name -> (elem_type, dims as int or dim_param) for every typed tensor of a graph."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    found = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        found[vi.name] = (tensor_type.elem_type, dims)
    return found


def test_intermediate_shapes_are_inferred_with_symbolic_dims():
    model = onnx.parser.parse_model(MIXED)
    out = run_pass(InferShapes(), model)
    infos = value_infos(out)
    assert infos["a"] == (onnx.TensorProto.FLOAT, ["N", 3])
    assert infos["t"] == (onnx.TensorProto.FLOAT, ["N", 6])
    # Behind a custom op inference knows nothing: the tensors stay unknown, nothing fails.
    assert "b" not in infos and "c" not in infos
    onnx.checker.check_model(out, full_check=True)


def test_declared_interface_shapes_are_kept():
    model = onnx.parser.parse_model(MIXED)
    out = run_pass(InferShapes(), model)
    assert [vi.SerializeToString() for vi in out.graph.input] == [
        vi.SerializeToString() for vi in model.graph.input
    ]
    assert [vi.SerializeToString() for vi in out.graph.output] == [
        vi.SerializeToString() for vi in model.graph.output
    ]


def test_stats_count_known_and_unknown_tensors():
    result = InferShapes().run(to_graph(onnx.parser.parse_model(MIXED)), PassContext())
    # x, a, t, r, y, z known; b, c behind the custom op unknown.
    assert result.modified and result.stats == {"shapes_known": 6, "shapes_unknown": 2}


def test_stale_value_info_is_replaced():
    model = onnx.parser.parse_model(MIXED)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [7, 7]))
    out = run_pass(InferShapes(), model)
    assert value_infos(out)["a"] == (onnx.TensorProto.FLOAT, ["N", 3])


def test_value_info_of_custom_op_outputs_is_kept_and_used():
    model = onnx.parser.parse_model(MIXED)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["N", 3]))
    infos = value_infos(run_pass(InferShapes(), model))
    assert infos["b"] == infos["c"] == (onnx.TensorProto.FLOAT, ["N", 3])


def test_subgraph_tensors_get_shapes():
    model, feeds = export_like.with_if()
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for attr in stripped.graph.node[0].attribute:
        del attr.g.value_info[:]
    out = run_pass(InferShapes(), stripped)
    branches = {attr.name: attr.g for attr in out.graph.node[0].attribute}
    assert value_infos(branches["then_branch"])["then_sum"] == (onnx.TensorProto.FLOAT, ["batch", 4])
    assert value_infos(branches["else_branch"])["else_sum"] == (onnx.TensorProto.FLOAT, ["batch", 4])
    assert_same_outputs(model, out, feeds)
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.parametrize("build", [export_like.pytorch_like, export_like.tf2onnx_like, export_like.with_loop])
def test_exporter_models_keep_their_outputs(build):
    model, feeds = build()
    out = run_pass(InferShapes(), model)
    assert value_infos(out)[model.graph.output[0].name] == value_infos(model)[model.graph.output[0].name]
    assert_same_outputs(model, out, feeds)
    onnx.checker.check_model(out, full_check=True)


def test_big_weights_reach_inference_as_typed_inputs_only():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N,64] x) => (float[N,32] y) <int64[2] shape = {-1, 32}> {
        m = MatMul(x, w)
        y = Reshape(m, shape) }""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((64, 32), np.float32), "w"))
    graph = to_graph(model)
    skeleton = skeleton_model(graph)
    assert [t.name for t in skeleton.graph.initializer] == ["shape"]
    assert value_infos(skeleton)["w"] == (onnx.TensorProto.FLOAT, [64, 32])
    InferShapes().run(graph, PassContext())
    assert graph.tensors()["m"].shape == ["N", 32]
    assert isinstance(graph.tensors()["w"].values, np.ndarray)  # the graph keeps its weight


def test_a_failing_inference_leaves_the_graph_as_it_was(monkeypatch):
    def fail(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("boom")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    graph = to_graph(onnx.parser.parse_model(MIXED))
    result = InferShapes().run(graph, PassContext())
    assert not result.modified and result.stats["skipped"] == "inference failed"
    assert graph.tensors()["a"].shape is None


def test_big_outer_weights_read_by_branches_are_not_copied_into_the_skeleton():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N,64] x, bool c) => (float[N,32] y) {
        y = If(c) <then_branch = t () => (float[N,32] a) { m = MatMul(x, w)  a = Relu(m) },
                   else_branch = e () => (float[N,32] b) { b = MatMul(x, w) }> }""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((64, 32), np.float32), "w"))
    graph = to_graph(model)
    branches = [attr.g for attr in skeleton_model(graph).graph.node[0].attribute]
    assert all(len(branch.initializer) == 0 for branch in branches)
    InferShapes().run(graph, PassContext())
    assert graph.nodes[0].attrs["then_branch"].nodes[0].outputs[0].shape == ["N", 32]
