"""quantize-dynamic: MatMul/Gemm with a constant weight ⇒ com.microsoft.DynamicQuantizeMatMul, int8 weights.

Dynamic quantization stores each weight as symmetric int8 and leaves activations float in the
file: ONNX Runtime's DynamicQuantizeMatMul (contrib domain com.microsoft, version 1) measures the
range of its input A on every run, quantizes A to uint8, multiplies in integers and scales the
int32 sums back to float. No calibration data is needed, which suits transformer-style models
whose activation ranges move from input to input.

The op, from ONNX Runtime's schema and CPU kernel:

    Y = quantize(A) · (B - b_zero_point) · b_scale + bias        A float32, Y float32
    B int8 or uint8 [K, N]; b_scale float32, a scalar or [N] (one per column);
    b_zero_point like b_scale (optional, default 0); bias float32 [N] (optional)

Our weights are int8 over [-127, 127] with zero point 0 (quant_params.weight_params), one scale
per output column of B, or one per tensor with `per-channel=false`.

What is rewritten, in every graph (If/Loop bodies too, by name of the weight they read):
- MatMul(A, W) with W a constant float32 [K, N].
- Gemm(A, W, C) with W a constant float32 and transA = 0: transB = 1 is undone by transposing W,
  alpha is folded into W, and beta·C becomes the bias when C is constant and holds one value per
  column (or a single value).
What stays float, each listed in `details` with the reason: a weight of rank > 2 (a batched
MatMul), a weight computed at run time or held in a Constant node (run lift-constants first),
Conv (DynamicQuantizeMatMul covers matrix products only; convolutions need static int8), and the
nodes named in `exclude` by node name or op type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.fidelity import sqnr_db
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.quant_params import dequantize, quantize, weight_axis, weight_params
from polaris_opt.surgery import Names, constant_value, is_standard_domain, iter_graphs, producer

MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
QUANTIZED_OP = "DynamicQuantizeMatMul"
# The weight after transposition is [K, N]: per-column scales run along N, as for MatMul.
COLUMN_AXIS = weight_axis("MatMul", {}, 2)
CONV_REASON = "Conv stays float: dynamic quantization covers MatMul/Gemm"


@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """MatMul/Gemm with a constant 2-D weight  ⇒  DynamicQuantizeMatMul: int8 weights, dynamic activations."""

    name: ClassVar[str] = "quantize-dynamic"
    lossy: ClassVar[bool] = True

    per_channel: bool = field(
        default=True, metadata={"help": "one weight scale per output column (false: one per weight)"}
    )
    exclude: str = field(
        default="", metadata={"help": "';'-separated node names or op types to leave in float"}
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        excluded = {entry.strip() for entry in self.exclude.split(";") if entry.strip()}
        quantizer = _Quantizer(self.per_channel, Names(graph))
        layers = []
        for g in iter_graphs(graph):
            for node in g.nodes:
                if node.op in ("MatMul", "Gemm", "Conv") and is_standard_domain(node):
                    layers.append(_quantize_layer(node, excluded, quantizer))
        quantized = [layer for layer in layers if layer["precision"] == "int8"]
        if quantized:
            _import_domain(graph, MS_DOMAIN, MS_OPSET)
        unmatched = sorted(excluded - {row["name"] for row in layers} - {row["op"] for row in layers})
        if unmatched:
            ctx.log.warning("quantize-dynamic: exclude entries matched nothing: %s", unmatched)
        stats = {
            "quantized": len(quantized),
            "kept_float": len(layers) - len(quantized),
            "weights_int8": len(quantizer.done),
            "weight_bytes_before": quantizer.bytes_before,
            "weight_bytes_after": quantizer.bytes_after,
        }
        details = {"layers": layers, "unmatched_exclude": unmatched}
        return PassResult(modified=bool(quantized), stats=stats, details=details)


def _quantize_layer(node: gs.Node, excluded: set[str], quantizer: _Quantizer) -> dict[str, Any]:
    """Rewrite `node` in place when it qualifies; the row of the per-layer table either way."""
    row: dict[str, Any] = {"name": node.name, "op": node.op}
    if node.name in excluded or node.op in excluded:
        return row | {"precision": "float", "reason": "excluded"}
    if node.op == "Conv":
        return row | {"precision": "float", "reason": CONV_REASON}
    found = _weight_and_bias(node)
    if isinstance(found, str):
        return row | {"precision": "float", "reason": found}
    weight, bias = found
    q_weight, q_scale, q_zero_point, error_db = quantizer.weight(node, weight)
    inputs = [node.inputs[0], q_weight, q_scale, q_zero_point]
    if bias is not None:
        inputs.append(quantizer.constant(f"{node.name}.bias", bias))
    node.op, node.domain = QUANTIZED_OP, MS_DOMAIN
    node.attrs.clear()
    node.inputs.clear()
    node.inputs.extend(inputs)
    return row | {
        "precision": "int8",
        "weight": weight.name,
        "shape": list(q_weight.values.shape),
        "granularity": "per-channel" if quantizer.per_channel else "per-tensor",
        "weight_sqnr_db": error_db,
    }


@dataclass(frozen=True)
class _Weight:
    """A weight to quantize: the tensor it comes from and the float32 [K, N] matrix it stands for."""

    tensor: gs.Constant
    matrix: np.ndarray
    transposed: bool
    alpha: float

    @property
    def name(self) -> str:
        return self.tensor.name


def _weight_and_bias(node: gs.Node) -> tuple[_Weight, np.ndarray | None] | str:
    """A MatMul's or Gemm's weight as [K, N] and bias as [N]; a reason string when it is not eligible."""
    if len(node.inputs) < 2:
        return "missing weight input"
    source = node.inputs[1]
    value = constant_value(source)
    if value is None:
        made_by = producer(source)
        if made_by is not None and made_by.op == "Constant":
            return "weight is held in a Constant node (run lift-constants first)"
        return "weight is computed at run time"
    if value.dtype != np.float32:
        return f"weight is {value.dtype}, DynamicQuantizeMatMul takes float32"
    if value.ndim != 2:
        return f"weight has rank {value.ndim}; only 2-D weights are quantized"
    if node.op == "MatMul":
        return _Weight(source, value, False, 1.0), None
    return _gemm_weight_and_bias(node, source, value)


def _gemm_weight_and_bias(node: gs.Node, source: gs.Constant, value: np.ndarray):
    # Y = alpha·A·op(B) + beta·C  =  A·(alpha·op(B)) + beta·C.
    if node.attrs.get("transA", 0):
        return "Gemm with transA=1"
    trans_b = bool(node.attrs.get("transB", 0))
    alpha = float(node.attrs.get("alpha", 1.0))
    weight = _Weight(source, value.T if trans_b else value, trans_b, alpha)
    has_c = len(node.inputs) > 2 and not node.inputs[2].is_empty()
    if not has_c:
        return weight, None
    c = constant_value(node.inputs[2])
    columns = weight.matrix.shape[1]
    if c is None or c.dtype != np.float32:
        return "Gemm bias C is not a float32 constant"
    # C broadcasts to [M, N]: it is a bias when its rows (if any) are one, its columns 1 or N.
    per_column = c.ndim <= 2 and c.shape[:-1] in ((), (1,)) and c.shape[-1:] in ((), (1,), (columns,))
    if not per_column:
        return f"Gemm bias C of shape {list(c.shape)} is not one value per column"
    beta = float(node.attrs.get("beta", 1.0))
    bias = np.broadcast_to(beta * c.astype(np.float64).reshape(-1), (columns,)).astype(np.float32)
    return weight, bias


class _Quantizer:
    """Quantizes weights once each (a weight shared by several layers keeps one int8 copy) and names them."""

    def __init__(self, per_channel: bool, names: Names):
        self.per_channel = per_channel
        self.names = names
        self.done: dict[tuple, tuple[gs.Constant, gs.Constant, gs.Constant, float]] = {}
        self.bytes_before = 0
        self.bytes_after = 0

    def weight(self, node: gs.Node, weight: _Weight) -> tuple[gs.Constant, gs.Constant, gs.Constant, float]:
        key = (id(weight.tensor), weight.transposed, weight.alpha)
        if key not in self.done:
            self.done[key] = self._quantize(node, weight)
        return self.done[key]

    def _quantize(self, node: gs.Node, weight: _Weight):
        matrix = weight.matrix * np.float32(weight.alpha) if weight.alpha != 1.0 else weight.matrix
        if not np.all(np.isfinite(matrix)):
            raise BadInput(
                f"node '{node.name}' ({node.op}): weight '{weight.name}' holds NaN or Inf; "
                f"repair the weight or leave the node float with quantize-dynamic{{exclude={node.name}}}"
            )
        params = weight_params(matrix, COLUMN_AXIS if self.per_channel else None)
        q = quantize(matrix, params, narrow=True)
        error_db = sqnr_db(matrix, dequantize(q, params))
        self.bytes_before += weight.tensor.values.nbytes
        self.bytes_after += q.nbytes + params.scale.nbytes + params.zero_point.nbytes
        return (
            self.constant(f"{weight.name}.int8", np.ascontiguousarray(q)),
            self.constant(f"{weight.name}.scale", params.scale),
            self.constant(f"{weight.name}.zero_point", params.zero_point),
            round(error_db, 2),
        )

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(base), value)


def _import_domain(graph: gs.Graph, domain: str, version: int) -> None:
    """Declare `domain` in the model's opset imports (the exporter would default it to 1 silently)."""
    domains = graph.import_domains
    if domains is None:  # what the exporter would write: the standard opset alone
        domains = [onnx.helper.make_opsetid("", graph.opset)]
    if not any(opset.domain == domain for opset in domains):
        graph.import_domains = [*domains, onnx.helper.make_opsetid(domain, version)]
