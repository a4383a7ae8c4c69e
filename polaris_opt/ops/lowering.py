"""Lowering: each ai.polaris node becomes standard ONNX ops, so a Polaris model runs on stock
ONNX Runtime and nothing is ever locked in (DESIGN.md §4).

Every weight is densified or dequantized into a float32 initializer by the reference's own
helpers (polaris_opt.ops.reference), so the lowered weights are the reference's weights:

| op | lowered to |
|---|---|
| SparseMatMul | MatMul(X, Wᵀ [K, N]) → Add(bias) → Relu |
| SparseConv | Conv(X, W [O, C, kh, kw], bias) → Relu |
| QMatMul, static | QuantizeLinear → DequantizeLinear on X (the same rounding) → MatMul(·, Wᵀ) → Add → Relu |
| QMatMul, dynamic | DynamicQuantizeLinear → DequantizeLinear on X → MatMul(·, Wᵀ) → Add → Relu |
| QGemm | as QMatMul, alpha folded into Wᵀ |
| MatMulInt4 | MatMul(X, Wᵀ) → Add(bias) |

Wᵀ is [K, N] float32 (w_q·w_scale for INT8, (code − zp)·scale for INT4). The node's output
tensor keeps its name, so graph outputs and later readers are untouched. All emitted ops exist
from opset 11, so the model's own opset is kept.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph, to_model
from polaris_opt.ops import DOMAIN, attributes
from polaris_opt.ops.reference import (
    checked_bias,
    int4_weight,
    int8_weight,
    sparse_weight,
    static_activation_params,
)
from polaris_opt.surgery import Names, constant_value, iter_graphs


def lower(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every ai.polaris node, sub-graphs included, in standard ONNX ops."""
    source = onnx.ModelProto()
    source.CopyFrom(model)  # graphsurgeon holds on to the model's tensors: keep the caller's intact
    graph = to_graph(source)
    lower_graph(graph)
    return to_model(graph, source)


def lower_graph(graph: gs.Graph) -> Counter:
    """Lower every ai.polaris node of `graph` and its sub-graphs in place; counts by op type."""
    names = Names(graph)
    lowered: Counter = Counter()
    for g in list(iter_graphs(graph)):
        for node in [n for n in g.nodes if n.domain == DOMAIN]:
            index = next(i for i, n in enumerate(g.nodes) if n is node)
            g.nodes[index : index + 1] = lower_node(node, names)
            lowered[node.op] += 1
    if graph.import_domains is not None:
        graph.import_domains = [opset for opset in graph.import_domains if opset.domain != DOMAIN]
    return lowered


def polaris_op_counts(model: onnx.ModelProto) -> Counter:
    """ai.polaris nodes in `model` (sub-graphs included), by op type."""
    from polaris_opt.proto import proto_nodes

    return Counter(node.op_type for node in proto_nodes(model.graph) if node.domain == DOMAIN)


def lower_node(node: gs.Node, names: Names) -> list[gs.Node]:
    """The standard nodes that compute `node`'s output; `node` is detached from its tensors."""
    attrs = attributes(node)
    try:
        values = _constant_inputs(node)
        nodes = _LOWERINGS[node.op](node, attrs, values, names)
    except BadInput as error:
        raise BadInput(f"node '{node.name}' ({node.op}): {error}") from None
    # Re-point the output at the last new node: the old node lets go of it first.
    output = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    nodes[-1].outputs.clear()  # its fresh output is dropped: the node's own output takes its place
    nodes[-1].outputs.append(output)
    return nodes


def _constant_inputs(node: gs.Node) -> list[np.ndarray | None]:
    """Values of every input but X (index 0), absent ones None: weights, bias and scales must be
    initializers."""
    count = _INPUT_COUNTS[node.op]
    if len(node.inputs) > count:
        raise BadInput(f"{len(node.inputs)} inputs given; the op takes at most {count}")
    if not node.inputs or node.inputs[0].is_empty() or len(node.outputs) != 1:
        raise BadInput("the op needs an input X and exactly one output Y")
    values: list[np.ndarray | None] = [None]
    for index, tensor in enumerate(node.inputs[1:], start=1):
        if tensor.is_empty():
            values.append(None)
            continue
        value = constant_value(tensor)
        if value is None:
            raise BadInput(
                f"input {index} ('{tensor.name}') is computed at run time; "
                "lowering needs weights, bias and scales as initializers"
            )
        values.append(value)
    return values + [None] * (count - len(values))


# ----------------------------------------------------------------------------- per op


def _sparse_matmul(node, attrs, values, names) -> list[gs.Node]:
    weight = sparse_weight(values, attrs)
    emit = _Emitter(node, names)
    y = emit.matmul(node.inputs[0], weight)
    y = emit.add_bias(y, values[4], weight.shape[0])
    emit.activation(y, attrs["activation"])
    return emit.nodes


def _sparse_conv(node, attrs, values, names) -> list[gs.Node]:
    out_channels, reduction = attrs["shape"]
    kh, kw = attrs["kernel_shape"]
    weight = sparse_weight(values, attrs).reshape(out_channels, reduction // (kh * kw), kh, kw)
    emit = _Emitter(node, names)
    inputs = [node.inputs[0], emit.constant("weight", weight)]
    if values[4] is not None:
        inputs.append(emit.constant("bias", checked_bias(values[4], out_channels, "SparseConv")))
    conv_attrs = {name: list(attrs[name]) for name in ("kernel_shape", "pads", "strides", "dilations")}
    y = emit.node("Conv", inputs, attrs={**conv_attrs, "group": 1})
    emit.activation(y, attrs["activation"])
    return emit.nodes


def _quantized(node, attrs, values, names) -> list[gs.Node]:
    _, w_q, w_scale, bias, x_scale, x_zero_point = values
    weight = int8_weight(w_q, w_scale, node.op) * np.float32(attrs.get("alpha", 1.0))
    static = static_activation_params(x_scale, x_zero_point, node.op)
    emit = _Emitter(node, names)
    if static is None:
        x_q, scale, zero_point = emit.node(
            "DynamicQuantizeLinear", [node.inputs[0]], outputs=(np.uint8, np.float32, np.uint8)
        )
    else:
        scale = emit.constant("x_scale", np.array(static[0], dtype=np.float32))
        zero_point = emit.constant("x_zero_point", np.array(static[1], dtype=np.uint8))
        x_q = emit.node("QuantizeLinear", [node.inputs[0], scale, zero_point], outputs=(np.uint8,))
    x = emit.node("DequantizeLinear", [x_q, scale, zero_point])
    y = emit.add_bias(emit.matmul(x, weight), bias, weight.shape[0])
    emit.activation(y, attrs["activation"])
    return emit.nodes


def _matmul_int4(node, attrs, values, names) -> list[gs.Node]:
    _, w_packed, scales, zero_points, bias = values
    weight = int4_weight(w_packed, scales, zero_points, attrs)
    emit = _Emitter(node, names)
    emit.add_bias(emit.matmul(node.inputs[0], weight), bias, attrs["N"])
    return emit.nodes


_INPUT_COUNTS = {"SparseMatMul": 6, "SparseConv": 6, "QMatMul": 6, "QGemm": 6, "MatMulInt4": 5}
_LOWERINGS = {
    "SparseMatMul": _sparse_matmul,
    "SparseConv": _sparse_conv,
    "QMatMul": _quantized,
    "QGemm": _quantized,
    "MatMulInt4": _matmul_int4,
}


# ---------------------------------------------------------------------------- building


class _Emitter:
    """Builds the replacement nodes of one ai.polaris node, named after it."""

    def __init__(self, node: gs.Node, names: Names):
        self.base, self.op, self.names = node.name or node.op, node.op, names
        self.nodes: list[gs.Node] = []
        self.last: gs.Tensor | None = None

    def constant(self, what: str, value: np.ndarray) -> gs.Constant:
        # Not np.ascontiguousarray for all: it turns a scalar (x_scale) into shape [1].
        contiguous = value if value.flags.c_contiguous else np.ascontiguousarray(value)
        return gs.Constant(self.names.fresh(f"{self.base}.{what}"), contiguous)

    def node(self, op: str, inputs: list, *, attrs=None, outputs=(np.float32,)):
        """Append an `op` node; returns its output (a tuple when it has several)."""
        tensors = [gs.Variable(self.names.fresh(f"{self.base}/{op}_out"), dtype=t) for t in outputs]
        name = self.names.fresh(f"{self.base}/{op}")
        self.nodes.append(gs.Node(op, name, attrs=attrs or {}, inputs=inputs, outputs=tensors))
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def matmul(self, x: gs.Tensor, weight: np.ndarray) -> gs.Tensor:
        """x · weightᵀ, with weight [N, K] stored as the [K, N] float32 initializer MatMul reads."""
        transposed = self.constant("weight", weight.T.astype(np.float32))
        return self.node("MatMul", [x, transposed])

    def add_bias(self, y: gs.Tensor, bias: np.ndarray | None, n: int) -> gs.Tensor:
        if bias is None:
            return y
        return self.node("Add", [y, self.constant("bias", checked_bias(bias, n, self.op))])

    def activation(self, y: gs.Tensor, activation: str) -> gs.Tensor:
        return self.node("Relu", [y]) if activation == "relu" else y
