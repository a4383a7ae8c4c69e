"""The sparsify pass's target=polaris: each eligible layer becomes one ai.polaris node.

`rewrite_layers` walks the graph and its sub-graphs, finds each layer (layers.py for the sparse
ops, qdq_rewrite.py for QMatMul/QGemm), fuses the bias Add and Relu that only it reads, stores W
in the format polaris_opt.sparse.cost picks (once per distinct matrix, `StoredWeights`) and puts
the new node in the layer's place, writing the last fused node's output tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.ops import DOMAIN
from polaris_opt.sparse.cost import FormatChoice, choose_format
from polaris_opt.sparse.formats import from_dense
from polaris_opt.sparse.layers import Layer, as_vector, bias_value, is_excluded, new_constant, sparse_layer
from polaris_opt.sparse.qdq_rewrite import quantized_inputs, quantized_layer, remove_unread_qdq
from polaris_opt.surgery import (
    Names,
    consumers,
    detach,
    is_graph_output,
    is_standard_domain,
    iter_graphs,
    producer,
    remove_nodes,
)

if TYPE_CHECKING:
    # Annotations only: the pass imports this module.
    from polaris_opt.passes.sparsify import Sparsify

LAYER_OPS = ("MatMul", "Gemm", "Conv")


def rewrite_layers(graph: gs.Graph, options: Sparsify) -> tuple[list[dict], list[dict]]:
    """Rewrite every eligible layer of `graph` and its sub-graphs; (rows, skipped)."""
    weights = StoredWeights(options, Names(graph))
    rows: list[dict] = []
    skipped: list[dict] = []
    for g in list(iter_graphs(graph)):
        replaced: list[gs.Node] = []
        upstream: list[gs.Node] = []
        for node in list(g.nodes):
            if node.op not in LAYER_OPS or not is_standard_domain(node) or not node.outputs:
                continue
            found = _find_layer(node, options)
            if isinstance(found, str):
                skipped.append({"name": node.name, "op": node.op, "reason": found})
                continue
            if found is None:
                continue
            # Q/DQ nodes that fed the layer (its activation, weight, bias) may lose their last reader.
            upstream += [producer(t) for n in [node, *consumers(node.outputs[0])] for t in n.inputs]
            rows.append(_rewrite(found, g, weights, replaced))
        if replaced:
            remove_nodes(g, replaced)
            remove_unread_qdq(g, upstream)
            g.toposort()
    return rows, skipped


def _find_layer(node: gs.Node, options: Sparsify) -> Layer | str | None:
    """The layer `node` becomes, the reason it stays (str), or None when it has no weight at all."""
    if len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    quantized = quantized_layer(node) if options.qdq else None
    if quantized is None and not isinstance(weight, gs.Constant):
        return None  # activation times activation (attention scores): nothing to store
    if is_excluded(options.patterns(), node.name, weight.name):
        return "excluded"
    if quantized is not None:
        return quantized
    layer = sparse_layer(node)
    if isinstance(layer, Layer) and layer.sparsity < options.min_sparsity:
        return f"sparsity {layer.sparsity:.1%} is below min-sparsity {options.min_sparsity:g}"
    return layer


# ---------------------------------------------------------------------------------- fusion


@dataclass
class Fusion:
    """What joins the layer's node: a bias Add and a Relu after it, and the tensor the last writes."""

    output: gs.Tensor
    absorbed: list[gs.Node]
    bias: np.ndarray | None
    relu: bool = False


def _fuse(layer: Layer, graph: gs.Graph) -> Fusion:
    n = layer.matrix.shape[0]
    fusion = Fusion(layer.node.outputs[0], [layer.node], layer.bias)
    reader = _sole_reader(fusion.output, graph)
    if layer.fusable_add and reader is not None and reader.op == "Add":
        extra = _added_bias(reader, fusion.output, n, _output_rank(layer))
        if extra is not None:
            fusion.bias = extra if fusion.bias is None else (fusion.bias + extra).astype(np.float32)
            fusion.output = reader.outputs[0]
            fusion.absorbed.append(reader)
            reader = _sole_reader(fusion.output, graph)
    if reader is not None and reader.op == "Relu":
        fusion.relu, fusion.output = True, reader.outputs[0]
        fusion.absorbed.append(reader)
    return fusion


def _sole_reader(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The one node of `graph` itself that reads `tensor`, when nothing else can see it."""
    readers = consumers(tensor)
    if len(readers) != 1 or is_graph_output(tensor, graph) or not is_standard_domain(readers[0]):
        return None
    return readers[0] if any(node is readers[0] for node in graph.nodes) else None


def _output_rank(layer: Layer) -> int | None:
    """How many axes the layer's output has, when known: Gemm's 2, or as many as X (MatMul)."""
    if layer.node.op == "Gemm":
        return 2
    for tensor in (layer.node.outputs[0], layer.node.inputs[0]):
        if tensor.shape is not None:
            return max(len(tensor.shape), 1)
    return None


def _added_bias(add: gs.Node, layer_output: gs.Tensor, n: int, rank: int | None) -> np.ndarray | None:
    if len(add.inputs) != 2 or (add.inputs[0] is layer_output) == (add.inputs[1] is layer_output):
        return None
    other = add.inputs[1] if add.inputs[0] is layer_output else add.inputs[0]
    value = bias_value(other)
    # A bias with more axes than the output would add axes to it: [1, N] only on a 2-D+ output.
    return None if value is None else as_vector(value, n, max_rank=rank or 1)


# ------------------------------------------------------------------------------- rewriting


def _rewrite(layer: Layer, graph: gs.Graph, weights: StoredWeights, replaced: list) -> dict:
    """Put the new node in the layer's place; the replaced nodes go into `replaced`."""
    fusion = _fuse(layer, graph)
    node_name = layer.node.name or weights.names.fresh(layer.op)
    for node in fusion.absorbed:
        detach(node)
    replaced += fusion.absorbed
    if layer.op in ("QMatMul", "QGemm"):
        inputs, attrs, row = quantized_inputs(layer, fusion.bias, weights.names)
    else:
        inputs, attrs, row = _sparse_inputs(layer, fusion, weights)
    attrs |= {**layer.attrs, "activation": "relu" if fusion.relu else "none"}
    graph.nodes.append(gs.Node(layer.op, node_name, attrs, inputs, [fusion.output], domain=DOMAIN))
    fused = [node.op for node in fusion.absorbed[1:]]
    return {
        "layer": node_name,
        "op": layer.node.op,
        "as": layer.op,
        "weight": layer.weight,
        "shape": list(layer.matrix.shape),
        "fused": fused,
        "bias": fusion.bias is not None,
        **row,
    }


@dataclass
class StoredWeight:
    """A matrix in its chosen format, as the constants a sparse node reads."""

    choice: FormatChoice
    arrays: list[gs.Constant]  # data, indices, indptr
    scale: gs.Constant | None
    nbytes: int


class StoredWeights:
    """Each distinct matrix stored once: layers that share a weight (and its view) share its arrays."""

    def __init__(self, options: Sparsify, names: Names):
        self.options, self.names = options, names
        self.stored: dict[tuple, tuple[np.ndarray, StoredWeight]] = {}

    def get(self, layer: Layer) -> StoredWeight:
        key = (layer.weight, layer.matrix.shape, hashlib.sha1(layer.matrix.tobytes()).digest())
        found = self.stored.get(key)
        if found is None or not np.array_equal(found[0], layer.matrix):
            found = (layer.matrix, self._store(layer))
            self.stored[key] = found
        return found[1]

    def _store(self, layer: Layer) -> StoredWeight:
        values = self.options.values.value
        choice = choose_format(layer.matrix, self.options.profile, values, self.options.format.value)
        cost = choice.chosen
        stored = from_dense(
            layer.matrix, cost.format, values=values, block=cost.block, slice_height=cost.slice_height or 1
        )
        base = f"{layer.weight}.{cost.format}"
        arrays = [
            gs.Constant(self.names.fresh(f"{base}.{part}"), getattr(stored, part))
            for part in ("data", "indices", "indptr")
        ]
        scale = new_constant(self.names, f"{base}.scale", stored.scale)
        return StoredWeight(choice, arrays, scale, stored.nbytes)


def _sparse_inputs(layer: Layer, fusion: Fusion, weights: StoredWeights) -> tuple[list, dict, dict]:
    """SparseMatMul/SparseConv's inputs, format attributes and row, W stored in the chosen format."""
    stored = weights.get(layer)
    cost = stored.choice.chosen
    bias = new_constant(weights.names, f"{layer.weight}.{cost.format}.bias", fusion.bias)
    inputs = [layer.x, *stored.arrays, *_trimmed([bias, stored.scale])]
    attrs: dict[str, Any] = {"format": cost.format, "shape": [int(d) for d in layer.matrix.shape]}
    if cost.format == "bsr":
        attrs["block"] = list(cost.block)
    if cost.format == "sell":
        attrs["slice_height"] = int(cost.slice_height)
    row = {
        "sparsity": layer.sparsity,
        "format": cost.label,
        "values": weights.options.values.value,
        "index": cost.index,
        "bytes_before": int(layer.matrix.size * 4),
        "bytes_after": int(stored.nbytes),
        **stored.choice.to_dict(),
    }
    return inputs, attrs, row


def _trimmed(optional: list[gs.Constant | None]) -> list[gs.Tensor]:
    """Optional trailing inputs: absent ones at the end are left out, those before a present one
    are the empty tensor ("")."""
    while optional and optional[-1] is None:
        optional.pop()
    return [t if t is not None else gs.Variable.empty() for t in optional]
