"""QDQ INT8 MatMul/Gemm  ⇒  QMatMul/QGemm, for the sparsify pass (its docstring has the pattern):

    MatMul/Gemm(DequantizeLinear(QuantizeLinear(X, s, zp), s, zp),
                DequantizeLinear(int8 weight, per-channel or per-tensor scale, zero point 0))

`quantized_layer` matches it, or says why QMatMul cannot compute the same numbers;
`quantized_inputs` gives the new node's inputs; `remove_unread_qdq` drops the Q/DQ nodes the
rewritten layers no longer read.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.sparse.layers import Layer, layer_bias, new_constant
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    detach,
    is_graph_output,
    is_standard_domain,
    producer,
)


def quantized_layer(node: gs.Node) -> Layer | str | None:
    """MatMul/Gemm over a QDQ activation and a QDQ int8 weight as QMatMul/QGemm; None when the
    weight is not dequantized int8 (not a QDQ layer at all)."""
    if node.op == "Conv":
        return None
    trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
    weight = _dequantized_weight(node.inputs[1], output_axis=0 if trans_b else 1)
    if weight is None or isinstance(weight, str):
        return weight
    codes, scale, dq_weight = weight
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "transA=1: QGemm reads X as [M, K]"
    activation = _static_activation(node.inputs[0])
    if isinstance(activation, str):
        return activation
    x, x_scale, x_zero_point = activation
    w_q = codes if trans_b else codes.T
    bias = layer_bias(node, codes)
    if isinstance(bias, str):
        return bias
    op = "QGemm" if node.op == "Gemm" else "QMatMul"
    layer = Layer(node, op, x, dq_weight.inputs[0].name, np.ascontiguousarray(w_q), bias)
    layer.constants = {"w_scale": scale, "x_scale": x_scale, "x_zero_point": x_zero_point}
    if op == "QGemm":
        layer.attrs = {"alpha": float(node.attrs.get("alpha", 1.0))}
    layer.note = f"QDQ int8: static x_scale {float(x_scale):.4g}, zero point {int(x_zero_point)}"
    return layer


def _dequantized_weight(tensor: gs.Tensor, output_axis: int):
    """(int8 codes, float32 scale [N], the DequantizeLinear) of a QDQ weight; str: why it cannot
    become QMatMul's; None: `tensor` is no DequantizeLinear of a constant."""
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or not is_standard_domain(node):
        return None
    codes, scale = constant_value(node.inputs[0]), constant_value(node.inputs[1])
    if codes is None or scale is None:
        return None
    zero_point = (
        constant_value(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    )
    if codes.dtype != np.int8 or codes.ndim != 2 or scale.dtype != np.float32:
        return (
            f"dequantized weight is {codes.dtype} [{codes.ndim} axes] at {scale.dtype} scale; "
            "QMatMul takes a 2-D int8 weight at float32 scales"
        )
    if zero_point is not None and zero_point.any():
        return "weight zero point is not 0: QMatMul takes symmetric int8 weights"
    outputs = codes.shape[output_axis]
    if scale.size == 1:
        return codes, np.full(outputs, scale.reshape(()), dtype=np.float32), node
    if node.attrs.get("axis", 1) % 2 != output_axis or scale.size != outputs:
        return "weight scales are not per output channel"
    return codes, scale.astype(np.float32).reshape(outputs), node


def _static_activation(tensor: gs.Tensor):
    """(X, x_scale, x_zero_point) when `tensor` is DQ(Q(X)) with one constant
    scale and uint8 zero point; str: why QMatMul cannot take it."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or not is_standard_domain(dq):
        return "activation is not quantized (weight-only QDQ): QMatMul would quantize it and change results"
    q = producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear" or not is_standard_domain(q):
        return "activation is dequantized from stored codes, not quantized from a float tensor"
    q_params, dq_params = _scalar_params(q), _scalar_params(dq)
    if q_params is None or dq_params is None:
        return "activation scale (float32) or zero point is not one constant"
    (scale, zero_point), (dq_scale, dq_zero_point) = q_params, dq_params
    if zero_point.dtype != np.uint8 or dq_zero_point.dtype != np.uint8:
        return f"activation zero point is {zero_point.dtype}: QMatMul quantizes X to uint8"
    if scale != dq_scale or zero_point != dq_zero_point:
        return "QuantizeLinear and DequantizeLinear of the activation disagree on scale or zero point"
    return q.inputs[0], np.float32(scale), np.uint8(zero_point)


def _scalar_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """A Q/DQ node's (float32 scale, zero point) when both are one constant each."""
    scale = constant_value(node.inputs[1])
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        zero_point = np.array(0, np.uint8)  # absent: uint8 codes with zero point 0 (ONNX's default)
    else:
        zero_point = constant_value(node.inputs[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return None
    if scale.dtype != np.float32:
        return None  # a float16 model: QMatMul's X and scales are float32
    return scale.reshape(()), zero_point.reshape(())


# ------------------------------------------------------------------------------ rewriting


def quantized_inputs(layer: Layer, bias: np.ndarray | None, names: Names) -> tuple[list, dict, dict]:
    """QMatMul/QGemm's inputs (X static: x_scale and x_zero_point always given), attributes and
    row; `bias` is the layer's own bias plus any Add fused after it."""
    base = layer.weight
    c = layer.constants
    inputs = [
        layer.x,
        new_constant(names, f"{base}.w_q", layer.matrix),
        new_constant(names, f"{base}.w_scale", c["w_scale"]),
    ]
    inputs += [
        new_constant(names, f"{base}.bias", bias),
        new_constant(names, f"{base}.x_scale", np.array(c["x_scale"], dtype=np.float32)),
        new_constant(names, f"{base}.x_zero_point", np.array(c["x_zero_point"], dtype=np.uint8)),
    ]
    stored = layer.matrix.nbytes + c["w_scale"].nbytes
    row = {
        "format": "int8 dense",
        "values": "int8",
        "bytes_before": stored,
        "bytes_after": stored,
        "reason": layer.note,
    }
    return [t if t is not None else gs.Variable.empty() for t in inputs], {}, row


def remove_unread_qdq(graph: gs.Graph, candidates: list[gs.Node | None]) -> None:
    """Drop the Q/DQ nodes among `candidates` that nothing reads any more, and then the Q/DQ
    nodes upstream of them that this leaves unread (the Q before a DQ); any still read stay."""
    local = {id(node) for node in graph.nodes}  # a producer in an enclosing graph is not ours to drop
    pending = [node for node in candidates if node is not None]
    gone: set[int] = set()
    while pending:
        node = pending.pop()
        if id(node) in gone or id(node) not in local or node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if _is_read(node, graph):
            continue
        upstream = [producer(t) for t in node.inputs]
        detach(node)
        gone.add(id(node))
        pending += [n for n in upstream if n is not None]
    graph.nodes = [node for node in graph.nodes if id(node) not in gone]


def _is_read(node: gs.Node, graph: gs.Graph) -> bool:
    return any(consumers(t) or is_graph_output(t, graph) for t in node.outputs)
