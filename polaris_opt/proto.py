"""Walking ONNX protos: a graph, the sub-graphs nested in its nodes' attributes, their nodes.

If branches and Loop/Scan bodies live in node attributes; every reader of a whole model (I/O,
inspection, export, shape facts) walks them the same way, from here.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The graphs an attribute holds: one (`g`, If/Loop/Scan) or a list (`graphs`)."""
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every sub-graph nested in it, outer graphs first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                yield from proto_graphs(sub)


def proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of its sub-graphs."""
    for g in proto_graphs(graph):
        yield from g.node
