"""Sensitivity analysis: which layers lose accuracy when quantized to INT8, and where inside the model.

Three views, all measured on the calibration data against the FP32 model:

- per layer, the model's output SQNR and cosine similarity when that layer alone is quantized
  (weights and its input activations, as `quantize{include=NAME}` does), ranked worst first;
- per tensor, the SQNR between the FP32 model's activation and the fully quantized model's
  value of the same tensor (as its readers see it: after its Q → DQ where it is quantized), in
  graph order, so a drop shows where the error enters;
- per layer, a second-order proxy that needs no quantized run: trace(H)·‖ΔW‖²/n, with
  H = XᵀX of the layer input X over the calibration data, ΔW = W − fake_quantize(W) and n the
  number of weight elements. trace(XᵀX) = Σ x² over every element of X, so no K×K matrix is built.

The model is cleaned and calibrated once; every single-layer quantization reuses that
calibration (`ctx.calibration`), and the FP32 outputs are computed once per batch and kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from polaris_opt.capture import float_activations, stream_tensors
from polaris_opt.errors import BadInput
from polaris_opt.fidelity import Agreement, overall
from polaris_opt.numerics import make_session
from polaris_opt.passes_api import PassContext, Progress, no_progress
from polaris_opt.quant_params import fake_quantize_weight, weight_axis

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ops whose quantization starts an int8 region


@dataclass
class LayerSensitivity:
    """One quantizable layer: how much the model's output suffers when only it is quantized."""

    name: str
    op: str
    sqnr_db: float  # model output SQNR with only this layer in INT8
    cosine: float
    proxy: float  # trace(H)·‖ΔW‖²/n
    rank: int = 0  # 1 = most sensitive (lowest SQNR)


@dataclass
class TensorFidelity:
    """One activation: the fully quantized model's value against the FP32 model's."""

    tensor: str
    sqnr_db: float
    cosine: float


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity]  # ranked, most sensitive first
    tensors: list[TensorFidelity]  # in graph order
    full_model: dict[str, Any]  # SQNR, cosine, top-1 agreement of the fully quantized model
    settings: dict[str, Any] = field(default_factory=dict)

    def ranked_names(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [layer.name for layer in self.layers]

    def as_dict(self) -> dict[str, Any]:
        """For --json: infinities (a layer whose quantization is exact) become null."""
        return finite_or_none(
            {
                "settings": self.settings,
                "full_model": self.full_model,
                "layers": [asdict(layer) for layer in self.layers],
                "tensors": [asdict(tensor) for tensor in self.tensors],
            }
        )


def analyze(
    model: onnx.ModelProto,
    source,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    activations: str = "uint8",
    threads: int = 1,
    progress: Progress = no_progress,
) -> SensitivityReport:
    """Rank the quantizable layers of `model` by sensitivity, on the batches of `source`."""
    ctx = PassContext(calib=source, threads=threads, progress=progress)
    cleaned = calibrate_once(model, method, ctx)
    return analyze_calibrated(model, cleaned, ctx, per_channel=per_channel, activations=activations)


def calibrate_once(model: onnx.ModelProto, method: str, ctx: PassContext) -> onnx.ModelProto:
    """The cleaned model; leaves its calibration in `ctx.calibration` for every quantize run after."""
    return run_steps(model, [("cleanup", {}), ("calibrate", {"method": method})], ctx).model


def analyze_calibrated(
    model: onnx.ModelProto,
    cleaned: onnx.ModelProto,
    ctx: PassContext,
    *,
    per_channel: bool = True,
    activations: str = "uint8",
) -> SensitivityReport:
    """`analyze` on a model already cleaned and calibrated (`calibrate_once`) with `ctx`."""
    options = {"per-channel": _flag(per_channel), "activations": activations}
    full = run_steps(cleaned, [("quantize", options)], ctx)
    layers = quantized_layers(full)
    absorbed = activations_after(cleaned)
    reference = ReferenceOutputs(model, ctx.calib.batches, ctx.threads)
    singles = []
    with ctx.progress("quantizing one layer at a time", len(layers)) as advance:
        for layer in layers:
            include = ";".join([layer["name"], *absorbed.get(layer["name"], [])])
            single = run_steps(cleaned, [("quantize", {**options, "include": include})], ctx).model
            singles.append(reference.agreement(make_session(single, threads=ctx.threads)))
            advance(1)
    tensors, input_energy = compare_activations(cleaned, full.model, layers, ctx)
    # quantize falls back to per-tensor weights below opset 13; the proxy follows what it did.
    per_channel_used = all(r.details.get("per_channel", per_channel) for r in full.reports)
    proxies = second_order_proxies(cleaned, layers, input_energy, per_channel_used)
    rows = [
        LayerSensitivity(
            layer["name"], layer["op"], agreement.sqnr_db, agreement.cosine, proxies[layer["name"]]
        )
        for layer, agreement in zip(layers, singles, strict=True)
    ]
    settings = {
        # The calibrate pass may hold its method as an Enum; reports carry plain text.
        "method": getattr(ctx.calibration.method, "value", ctx.calibration.method),
        "per_channel": per_channel,
        "activations": activations,
        "batches": len(reference.outputs),
        "samples": reference.samples,
    }
    full_model = reference.agreement(make_session(full.model, threads=ctx.threads)).as_dict()
    return SensitivityReport(rank(rows), tensors, full_model, settings)


def rank(rows: list[LayerSensitivity]) -> list[LayerSensitivity]:
    """Most sensitive first: lowest SQNR, then the larger proxy; ranks numbered from 1."""
    ordered = sorted(rows, key=lambda row: (row.sqnr_db, -row.proxy if math.isfinite(row.proxy) else 0.0))
    for position, row in enumerate(ordered, start=1):
        row.rank = position
    return ordered


# ------------------------------------------------------------------------------ running passes


def run_steps(model: onnx.ModelProto, steps: list[tuple[str, dict[str, str]]], ctx: PassContext):
    """Run passes given as (name, options) without going through pipeline text.

    Layer names come from the model file and may hold characters the text form cannot
    (',', '{', spaces); a Step built directly takes any value.
    """
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.pipeline import Pipeline, Step
    from polaris_opt.verify import VerifyMode

    pipeline = Pipeline(tuple(Step(name, tuple(options.items())) for name, options in steps))
    # Each candidate is one pass over an already verified graph; checking it again would cost
    # more than the quantization itself for a sweep over every layer.
    return run_pipeline(model, pipeline, ctx=ctx, verify=VerifyMode.NONE)


def quantized_layers(result) -> list[dict[str, Any]]:
    """The weighted layers the quantize pass put in INT8 (from its details), in graph order.

    Only these can be quantized alone: an Add or a pool runs int8 only between tensors that
    other layers quantize. A layer needs a name to be picked out by `include`.
    """
    rows = [row for report in result.reports for row in report.details.get("layers", [])]
    return [row for row in rows if row["precision"] == "int8" and row["op"] in WEIGHTED and row["name"]]


def _flag(value: bool) -> str:
    return "true" if value else "false"


def activations_after(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node name → [the Relu/Clip that is its only reader], for the nodes that have one.

    Quantized with its layer, such an activation is absorbed into the layer's output
    quantization, which then covers [0, max] only. A layer quantized alone without it would
    have its output quantized over its whole range, coarser than in the fully quantized model,
    and would look more sensitive than it is.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    after = {}
    for node in model.graph.node:
        following = readers.get(node.output[0], []) if node.output else []
        if len(following) == 1 and following[0].op_type in ("Relu", "Clip") and following[0].name:
            after[node.name] = [following[0].name]
    return after


# ----------------------------------------------------------------------------- output fidelity


class ReferenceOutputs:
    """The FP32 model's outputs on every batch, computed once and compared with many candidates.

    Only the outputs are kept; `batches()` is called again for the inputs (a calibration
    source restarts).
    """

    def __init__(
        self, model: onnx.ModelProto, batches: Callable[[], Iterable[dict[str, np.ndarray]]], threads: int
    ):
        session = make_session(model, threads=threads)
        self.names = [output.name for output in session.get_outputs()]
        self.batches = batches
        self.outputs, self.samples = [], 0
        for batch in batches():
            self.outputs.append(session.run(self.names, batch))
            self.samples += _rows(batch)
        if not self.outputs:
            raise BadInput("the calibration data yielded no batches")

    def agreement(self, session) -> Agreement:
        """All outputs pooled: a candidate session's SQNR, cosine and top-1 agreement over every batch."""
        per_output = {name: Agreement() for name in self.names}
        for batch, expected in zip(self.batches(), self.outputs, strict=True):
            for name, ref, got in zip(self.names, expected, session.run(self.names, batch), strict=True):
                per_output[name].add(ref, got)
        return overall(per_output)


# ------------------------------------------------------------------------- inside the model


def compare_activations(
    float_model: onnx.ModelProto,
    quantized_model: onnx.ModelProto,
    layers: list[dict[str, Any]],
    ctx: PassContext,
) -> tuple[list[TensorFidelity], dict[str, float]]:
    """Per-tensor fidelity of the quantized model's activations, and Σ x² of every layer input.

    Both models run side by side, batch by batch; each batch's tensors are reduced and dropped.
    """
    pairs = matching_activations(float_model, quantized_model)
    layer_inputs = layer_input_names(float_model, layers)
    agreements = {name: Agreement() for name in pairs}
    energy = dict.fromkeys(set(layer_inputs.values()), 0.0)
    # One pass over the data, shared: the two runs advance in step, so tee holds one batch, and a
    # reader that rewinds is never read by two loops at once.
    for_float, for_quantized = itertools.tee(ctx.calib.batches())
    float_values = stream_tensors(
        float_model, for_float, list(dict.fromkeys([*pairs, *energy])), threads=ctx.threads
    )
    quantized_values = stream_tensors(
        quantized_model,
        for_quantized,
        list(pairs.values()),
        threads=ctx.threads,
        progress=ctx.progress,
        description="comparing activations",
        total=ctx.calib.num_batches,
    )
    for ref, got in zip(float_values, quantized_values, strict=True):
        for name, seen_as in pairs.items():
            agreements[name].add(ref[name], got[seen_as])
        for name in energy:
            energy[name] += float(np.sum(np.square(ref[name], dtype=np.float64)))
    tensors = [TensorFidelity(n, agreements[n].sqnr_db, agreements[n].cosine) for n in pairs]
    return tensors, {layer: energy[tensor] for layer, tensor in layer_inputs.items()}


def matching_activations(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto) -> dict[str, str]:
    """Float model tensor → the quantized model's tensor that carries its value to the readers.

    That is the DequantizeLinear output where the tensor is quantized (Q → DQ after it): the
    raw tensor may even be another value there (a Relu absorbed into its producer's Q leaves
    the producer writing the unclamped result under the Relu's name). Elsewhere it is the
    tensor of the same name, if it survived. Graph inputs appear only when quantized.
    """
    graph_inputs = {i.name for i in float_model.graph.input}
    surviving = set(float_activations(quantized_model))
    dequantized = _dequantized_names(quantized_model)
    pairs = {}
    for name in float_activations(float_model):
        if name in dequantized:
            pairs[name] = dequantized[name]
        elif name in surviving and name not in graph_inputs:
            pairs[name] = name
    return pairs


def _dequantized_names(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor → the output of the DequantizeLinear that reads its QuantizeLinear's result."""
    quantized_by = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {
        quantized_by[n.input[0]]: n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized_by
    }


def layer_input_names(model: onnx.ModelProto, layers: list[dict[str, Any]]) -> dict[str, str]:
    """Layer name → the name of its activation input (input 0 of the node)."""
    by_name = {node.name: node for node in model.graph.node}
    return {layer["name"]: by_name[layer["name"]].input[0] for layer in layers}


def second_order_proxies(
    model: onnx.ModelProto, layers: list[dict[str, Any]], input_energy: dict[str, float], per_channel: bool
) -> dict[str, float]:
    """trace(H)·‖ΔW‖²/n per layer; NaN for a layer whose second input is not a weight (Q·Kᵀ)."""
    weights = {t.name: t for t in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    proxies = {}
    for layer in layers:
        node = by_name[layer["name"]]
        tensor = weights.get(node.input[1]) if len(node.input) > 1 else None
        if tensor is None:
            proxies[layer["name"]] = math.nan
            continue
        weight = onnx.numpy_helper.to_array(tensor)
        proxies[layer["name"]] = weight_proxy(weight, node, input_energy[layer["name"]], per_channel)
    return proxies


def weight_proxy(weight: np.ndarray, node: onnx.NodeProto, input_energy: float, per_channel: bool) -> float:
    """trace(XᵀX)·‖W − fake_quantize(W)‖²/n for one layer whose input has Σ x² = `input_energy`."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis = weight_axis(node.op_type, attrs, weight.ndim) if per_channel else None
    delta = weight.astype(np.float64) - fake_quantize_weight(weight, axis)
    return input_energy * float(np.sum(delta * delta)) / max(weight.size, 1)


# ------------------------------------------------------------------------------------ helpers


def _rows(batch: dict[str, np.ndarray]) -> int:
    first = next(iter(batch.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def finite_or_none(value: Any) -> Any:
    """JSON has no infinity: ±inf and NaN become None, recursively (for --json and reports)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value
