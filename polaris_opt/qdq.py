"""QuantizeLinear/DequantizeLinear surgery, written once for every pass that quantizes (DESIGN.md §2).

- `insert_qdq`: a Q → DQ pair on an activation tensor, one pair shared by the readers it serves.
- `dequantized_constant`: integer codes stored as an initializer (int8 weight, int32 bias) and
  the DequantizeLinear that turns them back into the float tensor a node reads.
- `int32_bias`: a float bias as int32 at scale s_x·s_w with zero point 0, as QLinearConv and
  QGemm add it to their int32 accumulators.
- `absorb_activation`: a Relu/Clip whose clamp the producer's output Q does goes away.
- Recognising what a model quantizes already (quantization-aware training): `is_dequantized`,
  `feeds_quantize`, `prequantized`, `existing_params`; and `clamp_bounds` of a Relu/Clip.

Names: every tensor and node made here gets a name no tensor or node of the model has
(`Names`), derived from the tensor it stands for, so a quantized model still reads like its
source (`conv1.weight_quantized`, `/relu/Relu_output_0_scale`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.quant_params import QuantParams
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    is_graph_output,
    is_standard_domain,
    producer,
    remove_nodes,
)

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
INT32_LIMIT = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------- recognising


def _is_op(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.op == op and is_standard_domain(node)


def is_dequantized(tensor: gs.Tensor) -> bool:
    """True when a DequantizeLinear computes `tensor`: it is quantized already."""
    return _is_op(producer(tensor), DEQUANTIZE)


def feeds_quantize(tensor: gs.Tensor) -> bool:
    """True when a QuantizeLinear reads `tensor`: the model quantizes it already."""
    return any(_is_op(node, QUANTIZE) for node in consumers(tensor))


def prequantized(tensor: gs.Tensor) -> bool:
    """Quantized by the model itself: a DequantizeLinear computes it or a QuantizeLinear reads it."""
    return is_dequantized(tensor) or feeds_quantize(tensor)


def clamp_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(low, high) a Relu or Clip clamps to; None for other ops or bounds computed at run time."""
    if node.op == "Relu":
        return (0.0, np.inf)
    if node.op != "Clip":
        return None
    if "min" in node.attrs or "max" in node.attrs:  # Clip before opset 11 held them as attributes
        return (float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf)))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if index >= len(node.inputs) or node.inputs[index].is_empty():
            bounds.append(default)
            continue
        value = constant_value(node.inputs[index])
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(())))
    return bounds[0], bounds[1]


def existing_params(tensor: gs.Tensor) -> QuantParams | None:
    """The scale and zero point a Q/DQ already in the model gives `tensor`; None if unknown.

    Read from the DequantizeLinear that computes it, or else from a QuantizeLinear that reads it.
    """
    node = producer(tensor)
    if not _is_op(node, DEQUANTIZE):
        node = next((n for n in consumers(tensor) if _is_op(n, QUANTIZE)), None)
    if node is None or len(node.inputs) < 3:
        return None
    scale, zero_point = constant_value(node.inputs[1]), constant_value(node.inputs[2])
    if scale is None or zero_point is None:
        return None
    axis = node.attrs.get("axis", 1) if scale.ndim == 1 else None
    return QuantParams(scale.astype(np.float32), zero_point, axis)


# ------------------------------------------------------------------------------- inserting


def insert_qdq(
    graph: gs.Graph,
    tensor: gs.Variable,
    params: QuantParams,
    names: Names,
    readers: Iterable[gs.Node] | None = None,
) -> gs.Variable:
    """Put QuantizeLinear → DequantizeLinear on `tensor`; returns the dequantized tensor.

    `readers` switch to the dequantized tensor; None means every reader, including nodes of
    sub-graphs that read it by name. Then a graph output keeps its name: its producer writes a
    new tensor and the DequantizeLinear writes the output, so the model's interface is unchanged
    and the producer has no reader but the Q (what ONNX Runtime needs to fuse it).
    """
    scale, zero_point = _param_constants(tensor.name, params, names)
    quantized = gs.Variable(names.fresh(f"{tensor.name}_quantized"), dtype=params.dtype, shape=tensor.shape)
    if readers is None and is_graph_output(tensor, graph) and producer(tensor) is not None:
        source = gs.Variable(names.fresh(f"{tensor.name}_float"), dtype=tensor.dtype, shape=tensor.shape)
        writer = producer(tensor)
        writer.outputs[[t is tensor for t in writer.outputs].index(True)] = source
        dequantized = tensor
    else:
        source = tensor
        dequantized = gs.Variable(
            names.fresh(f"{tensor.name}_dequantized"), dtype=tensor.dtype, shape=tensor.shape
        )
        # Listed before the Q exists, so the Q keeps reading the float tensor.
        for node in list(consumers(tensor) if readers is None else readers):
            _replace_input(node, tensor, dequantized)
    attrs = _axis_attrs(params)
    graph.nodes.append(
        gs.Node(
            QUANTIZE,
            names.fresh(f"{tensor.name}_QuantizeLinear"),
            attrs,
            inputs=[source, scale, zero_point],
            outputs=[quantized],
        )
    )
    graph.nodes.append(
        gs.Node(
            DEQUANTIZE,
            names.fresh(f"{tensor.name}_DequantizeLinear"),
            dict(attrs),
            inputs=[quantized, scale, zero_point],
            outputs=[dequantized],
        )
    )
    return dequantized


def dequantized_constant(
    graph: gs.Graph, base: str, codes: np.ndarray, params: QuantParams, names: Names
) -> gs.Variable:
    """`codes` as an initializer and a DequantizeLinear of it; returns the float tensor it makes."""
    # np.array, not np.ascontiguousarray: that would turn a scalar's codes into shape (1,).
    stored = gs.Constant(names.fresh(f"{base}_quantized"), np.array(codes, order="C"))
    scale, zero_point = _param_constants(base, params, names)
    dequantized = gs.Variable(
        names.fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(np.shape(codes))
    )
    graph.nodes.append(
        gs.Node(
            DEQUANTIZE,
            names.fresh(f"{base}_DequantizeLinear"),
            _axis_attrs(params),
            inputs=[stored, scale, zero_point],
            outputs=[dequantized],
        )
    )
    return dequantized


def int32_bias(
    bias: np.ndarray, source: QuantParams | None, weight: QuantParams | None
) -> tuple[np.ndarray, QuantParams] | str:
    """(codes, params) of `bias` in int32 at scale s_x·s_w, zero point 0; or why it cannot be.

    The scale is computed in float32, as the DequantizeLinear will read it, so the codes
    dequantize to the bias as closely as float32 allows.
    """
    if source is None or weight is None or source.scale.ndim != 0:
        return "bias kept float: its input or weight scale is unknown"
    if bias.ndim != 1 or (weight.scale.ndim == 1 and bias.size != weight.scale.size):
        return "bias kept float: it is not one value per output channel"
    scale = (np.float32(source.scale) * weight.scale.astype(np.float32)).astype(np.float32)
    codes = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    if not np.all(np.abs(codes) <= INT32_LIMIT):
        return "bias kept float: its int32 codes would overflow"
    params = QuantParams(scale, np.zeros(scale.shape, dtype=np.int32), 0 if scale.ndim == 1 else None)
    return codes.astype(np.int32), params


def absorb_activation(graph: gs.Graph, activation: gs.Node) -> None:
    """Remove a Relu/Clip: its producer writes the activation's output, which keeps its name.

    Only sound when a Q after it clamps the same way and the activation is its input's only reader.
    """
    source, result = activation.inputs[0], activation.outputs[0]
    writer = producer(source)
    writer.outputs[[t is source for t in writer.outputs].index(True)] = result
    remove_nodes(graph, [activation])


# ---------------------------------------------------------------------------------- helpers


def _param_constants(base: str, params: QuantParams, names: Names) -> tuple[gs.Constant, gs.Constant]:
    scale = gs.Constant(names.fresh(f"{base}_scale"), np.asarray(params.scale, dtype=np.float32))
    zero_point = gs.Constant(names.fresh(f"{base}_zero_point"), np.asarray(params.zero_point))
    return scale, zero_point


def _axis_attrs(params: QuantParams) -> dict:
    # Per-channel needs the axis written out: DequantizeLinear's default axis is 1, not 0.
    return {} if params.axis is None else {"axis": int(params.axis)}


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new
