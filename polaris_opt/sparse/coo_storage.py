"""The sparsify pass's target=onnxruntime: standard ops stay, sparse weights are stored as COO.

Each eligible weight goes into a `Constant(sparse_value)` node (values and int64 linear indices,
ONNX's SparseTensorProto) that stock ONNX Runtime densifies at load: a smaller file that runs
anywhere. The pass's docstring says why not `graph.sparse_initializer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.pruning.targets import PRUNABLE_OPS, weight_of
from polaris_opt.sparse.layers import is_excluded
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    is_graph_output,
    is_standard_domain,
    iter_graphs,
    replace_tensor_uses,
)

if TYPE_CHECKING:
    # Annotations only: the pass imports this module.
    from polaris_opt.passes.sparsify import Sparsify

COO_INDEX_BYTES = 8  # ONNX sparse tensors index with int64


def store_sparse(graph: gs.Graph, options: Sparsify) -> tuple[list[dict], list[dict]]:
    """Store each eligible weight as COO in a Constant(sparse_value); (rows, skipped)."""
    names = Names(graph)
    rows: list[dict] = []
    skipped: list[dict] = []
    for g in list(iter_graphs(graph)):
        for weight, readers in _weights_by_reader(g):
            reason = _storage_problem(weight, readers, g, options)
            if reason:
                skipped += [{"name": node.name, "op": node.op, "reason": reason} for node in readers]
                continue
            rows.append(_store(weight, readers, g, names))
    return rows, skipped


def _weights_by_reader(graph: gs.Graph) -> list[tuple[gs.Constant, list[gs.Node]]]:
    """Each float weight of a Conv/ConvTranspose/Gemm/MatMul of `graph`, with the layers reading it."""
    found: dict[int, tuple[gs.Constant, list[gs.Node]]] = {}
    for node in graph.nodes:
        if node.op in PRUNABLE_OPS and is_standard_domain(node):
            weight = weight_of(node)
            if weight is not None:
                found.setdefault(id(weight), (weight, []))[1].append(node)
    return list(found.values())


def _storage_problem(weight: gs.Constant, readers: list[gs.Node], graph: gs.Graph, options: Sparsify) -> str:
    """Why `weight` stays dense ("" when it moves): excluded, read elsewhere, or not sparse enough."""
    values = constant_value(weight)
    if any(is_excluded(options.patterns(), node.name, weight.name) for node in readers):
        return "excluded (or its weight is shared with an excluded node)"
    if len(consumers(weight)) != len(readers) or is_graph_output(weight, graph):
        return "weight is also read elsewhere (another op or graph): it stays dense for them"
    sparsity = 1 - np.count_nonzero(values) / values.size if values.size else 0.0
    if sparsity < options.min_sparsity:
        return f"sparsity {sparsity:.1%} is below min-sparsity {options.min_sparsity:g}"
    if _coo_bytes(values) >= values.nbytes:
        needed = COO_INDEX_BYTES / (COO_INDEX_BYTES + values.itemsize)
        return f"COO (int64 indices) is larger than dense at sparsity {sparsity:.1%}; it needs > {needed:.1%}"
    return ""


def _coo_bytes(values: np.ndarray) -> int:
    return int(np.count_nonzero(values)) * (values.itemsize + COO_INDEX_BYTES)


def _store(weight: gs.Constant, readers: list[gs.Node], graph: gs.Graph, names: Names) -> dict:
    """Replace `weight` by the output of a Constant(sparse_value) node; the layer's row."""
    values = constant_value(weight)
    flat = values.reshape(-1)
    positions = np.flatnonzero(flat)
    sparse = onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(flat[positions], weight.name),
        onnx.numpy_helper.from_array(positions.astype(np.int64), f"{weight.name}.indices"),
        list(values.shape),
    )
    dense = gs.Variable(weight.name, dtype=values.dtype, shape=list(values.shape))
    replace_tensor_uses(weight, dense)
    node = gs.Node(
        "Constant", names.fresh(f"{weight.name}.sparse"), {"sparse_value": sparse}, outputs=[dense]
    )
    graph.nodes.insert(0, node)
    return {
        "layer": readers[0].name,
        "op": readers[0].op,
        "as": "sparse storage",
        "weight": weight.name,
        "readers": [node.name for node in readers],
        "shape": list(values.shape),
        "sparsity": 1 - positions.size / values.size,
        "format": "coo",
        "values": str(values.dtype),
        "index": "int64",
        "bytes_before": int(values.nbytes),
        "bytes_after": _coo_bytes(values),
        "reason": "stock ONNX Runtime densifies it at load",
    }
