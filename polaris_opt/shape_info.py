"""What ONNX shape inference knows of every tensor of a graph, sub-graphs included.

A pass that must not guess (fold a `Shape`, refuse a result too large to store) asks here:
each tensor name maps to its dims, None where a dim is dynamic or unknown, and its element
size. Names whose tensors disagree (sibling sub-graphs may reuse a name) are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from polaris_opt.export import skeleton_model
from polaris_opt.proto import proto_graphs
from polaris_opt.surgery import STANDARD_DOMAINS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """What shape inference knows of a tensor: its dims (None where dynamic) and element size."""

    dims: tuple[int | None, ...]
    itemsize: int

    @property
    def nbytes(self) -> int | None:
        static = all(d is not None for d in self.dims)
        return int(np.prod(self.dims, dtype=np.int64)) * self.itemsize if static else None


def inference_skeleton(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model fit for inference: a skeleton, less the value-info inference redoes."""
    model = skeleton_model(graph)
    for g in proto_graphs(model.graph):
        _forget_inferable(g)
    return model


def _forget_inferable(graph: onnx.GraphProto) -> None:
    """Drop value-info of tensors standard ops compute: inference recomputes it, and stale
    value-info (a shape from before folding) would otherwise be kept over the inferred one."""
    inferable = {out for node in graph.node if node.domain in STANDARD_DOMAINS for out in node.output}
    kept = [vi for vi in graph.value_info if vi.name not in inferable]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def infer_tensor_info(graph: gs.Graph) -> dict[str, TensorInfo]:
    """Shapes and element sizes ONNX shape inference finds, in every graph; {} when it fails."""
    try:
        model = onnx.shape_inference.infer_shapes(inference_skeleton(graph), data_prop=True)
    except Exception as exc:  # noqa: BLE001 - callers treat every shape as unknown
        log.debug("shape inference failed: %s", exc)
        return {}
    infos: dict[str, TensorInfo] = {}
    ambiguous = set()
    for value_info in _value_infos(model.graph):
        info = _tensor_info(value_info)
        # Sibling sub-graphs may reuse a name for different tensors: such a name tells nothing.
        if info is not None and infos.setdefault(value_info.name, info) != info:
            ambiguous.add(value_info.name)
    return {name: info for name, info in infos.items() if name not in ambiguous}


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    for g in proto_graphs(graph):
        yield from (*g.input, *g.output, *g.value_info)


def _tensor_info(value_info: onnx.ValueInfoProto) -> TensorInfo | None:
    kind = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not kind.HasField("shape"):
        return None
    dims = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in kind.shape.dim
    )
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(kind.elem_type).itemsize
    except (KeyError, TypeError):  # undefined or string element type: size unknown
        itemsize = 0
    return TensorInfo(dims, itemsize)
