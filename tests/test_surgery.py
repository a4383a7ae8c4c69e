"""The graph-surgery helpers: sub-graph walking, outer-scope reads, rewiring and bypassing."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from helpers import assert_same_outputs

from polaris_opt import surgery
from polaris_opt.export import to_graph, to_model

NESTED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x, bool c) => (float[N,3] y) <float[3] w = {1.0, 2.0, 3.0}> {
  z = Relu(x)
  y = If(c) <
    then_branch = t () => (float[N,3] a) {
      a = If(c) <
        then_branch = tt () => (float[N,3] p) { p = Add(z, w) },
        else_branch = te () => (float[N,3] q) { q = Neg(z) }> },
    else_branch = e () => (float[N,3] b) { b = Mul(x, w) }>
}"""

CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y, float[N,3] s) {
  r = Relu(x)
  i = Identity(r)
  y = Identity(i)
  s = Sigmoid(i)
}"""


def by_name(graph: gs.Graph, op: str) -> gs.Node:
    return next(node for node in graph.nodes if node.op == op)


def test_iter_graphs_visits_nested_branches_outer_first():
    graph = to_graph(onnx.parser.parse_model(NESTED))
    assert [g.name for g in surgery.iter_graphs(graph)] == ["g", "t", "tt", "te", "e"]


def test_outer_scope_tensors_include_reads_of_nested_subgraphs():
    graph = to_graph(onnx.parser.parse_model(NESTED))
    then_branch = by_name(graph, "If").attrs["then_branch"]
    assert sorted(t.name for t in surgery.outer_scope_tensors(then_branch)) == ["c", "w", "z"]
    # The If node lists only `c` as input, but it also reads z, w and x through its branches.
    assert sorted(t.name for t in surgery.node_reads(by_name(graph, "If"))) == ["c", "w", "x", "z"]


def test_consumers_include_subgraph_nodes_reading_by_name():
    graph = to_graph(onnx.parser.parse_model(NESTED))
    z = graph.tensors()["z"]
    assert sorted(node.op for node in surgery.consumers(z)) == ["Add", "Neg"]
    assert surgery.producer(z).op == "Relu"
    assert surgery.producer(graph.inputs[0]) is None


def test_constant_value_and_domain():
    graph = to_graph(onnx.parser.parse_model(NESTED))
    w = by_name(graph, "If").attrs["else_branch"].nodes[0].inputs[1]
    np.testing.assert_array_equal(surgery.constant_value(w), [1.0, 2.0, 3.0])
    assert surgery.constant_value(graph.inputs[0]) is None
    assert surgery.is_standard_domain(gs.Node("Relu", domain="ai.onnx"))
    assert not surgery.is_standard_domain(gs.Node("Gelu", domain="com.microsoft"))


def test_bypass_rewires_readers_to_the_input():
    model = onnx.parser.parse_model(CHAIN)
    graph = to_graph(model)
    first = next(node for node in graph.nodes if node.outputs[0].name == "i")
    assert surgery.bypass_node(first, graph)
    assert [node.op for node in graph.nodes] == ["Relu", "Identity", "Sigmoid"]
    assert by_name(graph, "Sigmoid").inputs[0].name == "r"
    assert_same_outputs(model, to_model(graph, model), {"x": np.ones((2, 3), np.float32)})


def test_bypass_of_a_graph_output_keeps_its_name():
    model = onnx.parser.parse_model(CHAIN)
    graph = to_graph(model)
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        assert surgery.bypass_node(node, graph)
    # Relu now writes the output `y` itself, and Sigmoid reads it under that name.
    assert [(n.op, n.outputs[0].name) for n in graph.nodes] == [("Relu", "y"), ("Sigmoid", "s")]
    out = to_model(graph, model)
    assert [o.name for o in out.graph.output] == ["y", "s"]
    assert_same_outputs(model, out, {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)})


def test_bypass_refuses_when_input_and_output_are_both_interface():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N] x) => (float[N] y) { y = Identity(x) }""")
    graph = to_graph(model)
    assert not surgery.bypass_node(graph.nodes[0], graph)
    assert len(graph.nodes) == 1 and graph.outputs[0].name == "y"


def test_bypass_refuses_to_rename_an_outer_scope_tensor():
    graph = to_graph(
        onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
      g (float[N] x, bool c) => (float[N] y) {
        r = Relu(x)
        y = If(c) <then_branch = t () => (float[N] a) { a = Identity(r) },
                   else_branch = e () => (float[N] b) { b = Neg(r) }> }""")
    )
    branch = graph.nodes[1].attrs["then_branch"]
    assert not surgery.bypass_node(branch.nodes[0], branch)
    assert surgery.producer(graph.tensors()["r"]).op == "Relu"


def test_remove_nodes_goes_by_identity_not_equality():
    graph = gs.Graph(nodes=[gs.Node("Relu"), gs.Node("Relu")])
    twin = graph.nodes[1]
    assert graph.nodes[0] == twin  # graphsurgeon's == cannot tell them apart
    assert surgery.remove_nodes(graph, [twin]) == 1
    assert len(graph.nodes) == 1 and graph.nodes[0] is not twin
