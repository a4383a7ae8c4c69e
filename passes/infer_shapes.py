"""infer-shapes: ONNX shape inference, its dtypes and shapes written onto the graph's tensors.

The graph is exported to a *skeleton* model for inference (polaris_opt.shape_info): big
weights, in any graph, become top-level inputs of the same type and shape, without their
values, so the skeleton stays far below protobuf's 2 GB limit even for models above it.

What inference finds is carried back onto the graph's tensors, pairing nodes of the exported
model with graph nodes by position (export keeps the order). Declared shapes of graph inputs
and outputs are kept, so dynamic dimensions stay dynamic; inferred symbolic dimensions keep
their names. Value-info that earlier passes may have made stale is dropped before inference
for outputs of standard ops (inference recomputes it) and kept for custom ops (it cannot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

from polaris_opt.graph_io import PROTOBUF_LIMIT
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.shape_info import inference_skeleton
from polaris_opt.surgery import is_standard_domain, iter_graphs, producer


@dataclass(frozen=True)
class InferShapes(Pass):
    """Tensors of unknown dtype or shape  ⇒  annotated by ONNX shape inference."""

    name: ClassVar[str] = "infer-shapes"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _snapshot(graph)
        skeleton = inference_skeleton(graph)
        if skeleton.ByteSize() > PROTOBUF_LIMIT:
            return PassResult(modified=False, stats={**_count(graph), "skipped": "model over 2 GB"})
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
        except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
            ctx.log.warning("infer-shapes: shape inference failed, shapes left as they were: %s", exc)
            return PassResult(modified=False, stats={**_count(graph), "skipped": "inference failed"})
        apply_types(graph, inferred.graph)
        return PassResult(modified=_snapshot(graph) != before, stats=_count(graph))


def apply_types(graph: gs.Graph, inferred: onnx.GraphProto) -> None:
    """Write the inferred types of `inferred` (the export of `graph`) onto `graph`'s tensors."""
    infos = {vi.name: vi for vi in [*inferred.input, *inferred.value_info, *inferred.output]}
    interface = {id(t) for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Variable):
            continue
        if id(tensor) in interface:
            if tensor.shape is None and tensor.name in infos:
                _assign(tensor, infos[tensor.name])
        elif tensor.name in infos:
            _assign(tensor, infos[tensor.name])
        elif producer(tensor) is not None and is_standard_domain(producer(tensor)):
            tensor.dtype, tensor.shape = None, None  # unknown now; what it had may be stale
    for node, proto in zip(graph.nodes, inferred.node, strict=True):
        for attr in proto.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and isinstance(node.attrs.get(attr.name), gs.Graph):
                apply_types(node.attrs[attr.name], attr.g)


def _assign(tensor: gs.Variable, info: onnx.ValueInfoProto) -> None:
    found = OnnxImporter.import_tensor(info)
    tensor.dtype, tensor.shape, tensor.type = found.dtype, found.shape, found.type


def _snapshot(graph: gs.Graph) -> list[tuple[str, object, object]]:
    return [(t.name, t.dtype, t.shape) for t in _variables(graph)]


def _variables(graph: gs.Graph) -> list[gs.Variable]:
    """Every computed tensor of `graph` and its sub-graphs, once each."""
    found = {id(t): t for g in iter_graphs(graph) for t in g.tensors().values() if isinstance(t, gs.Variable)}
    return list(found.values())


def _count(graph: gs.Graph) -> dict[str, int]:
    tensors = _variables(graph)
    known = sum(t.dtype is not None and t.shape is not None for t in tensors)
    return {"shapes_known": known, "shapes_unknown": len(tensors) - known}
