"""correct-bias: remove the per-channel output mean shift that weight quantization will cause.

Quantizing a weight W to W_q = W + ΔW changes a linear layer's output by op(x, ΔW). Its mean
over real data is a systematic per-output-channel shift that the network downstream sees as a
wrong bias (the empirical bias correction of Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", 2019). This pass measures
that shift on the calibration data and subtracts it from the layer's bias, on the float graph,
before `quantize` runs: the weight itself is left unchanged, so the later quantize pass makes
the same W_q and the shift cancels.

For Gemm and MatMul the measured shift is ΔW·E[x] exactly (the layer is linear in x). For Conv
it is measured rather than derived from the per-channel input mean and ΔW summed over the
kernel taps, because zero padding makes the border outputs see fewer inputs: measuring
op(x, ΔW) takes that into account. The mean is the per-channel average over the batch and
spatial positions, which is the shift that minimizes the squared error per channel.

Layers: Conv and Gemm with a constant float32 weight (a zero bias is created when there is
none), and MatMul with a constant 2-D float32 weight whose only reader is an Add of a
constant (its bias). Only the main graph is corrected; calibration data cannot reach
If/Loop bodies. A layer that stays float (`exclude`, as given to quantize) must keep its bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.capture import stream_tensors
from polaris_opt.errors import BadInput
from polaris_opt.export import to_model
from polaris_opt.fidelity import sqnr_from_energies
from polaris_opt.int8_placement import PER_CHANNEL_OPSET
from polaris_opt.layer_bias import bias_add, channels_last, conv_bias, gemm_bias, set_bias
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.quant_params import fake_quantize_weight, weight_axis
from polaris_opt.surgery import Names, constant_value, is_standard_domain

PROBE_PREFIX = "correct_bias.probe"


@dataclass(frozen=True)
class CorrectBias(Pass):
    """Conv/Gemm/MatMul+Add before quantize  ⇒  bias minus the mean output shift of its int8 weight."""

    name: ClassVar[str] = "correct-bias"
    lossy: ClassVar[bool] = True
    per_channel: bool = field(
        default=True, metadata={"help": "Quantize weights per output channel, as quantize will."}
    )
    exclude: str = field(
        default="",
        metadata={
            "help": "';'-separated node names or op types kept in float by quantize: left as they are."
        },
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.calib is None:
            raise BadInput(
                "correct-bias needs calibration data: give --calib DATA (the shift is measured on it)"
            )
        # quantize falls back to per-tensor weights below opset 13 (DequantizeLinear has no
        # axis there); the correction must cancel the error of the weight quantize will make.
        per_channel = self.per_channel and graph.opset >= PER_CHANNEL_OPSET
        layers, skipped = find_layers(graph, per_channel, split_names(self.exclude))
        rows = []
        if layers:
            measured = measure_errors(to_model(graph), layers, ctx)
            names = Names(graph)
            rows = [
                apply_correction(layer, sums, names) for layer, sums in zip(layers, measured, strict=True)
            ]
        stats = {"corrected": len(rows), "skipped": len(skipped), "mean_sqnr_gain_db": mean_gain(rows)}
        return PassResult(modified=bool(rows), stats=stats, details={"layers": rows, "skipped": skipped})


def mean_gain(rows: list[dict[str, Any]]) -> float:
    """Mean SQNR gain in dB over the corrected layers; a layer with no error at all counts 0."""
    gains = [r["sqnr_after_db"] - r["sqnr_before_db"] for r in rows if np.isfinite(r["sqnr_before_db"])]
    return round(float(np.mean(gains)), 3) if gains else 0.0


def split_names(text: str) -> set[str]:
    """'a;b' → {'a', 'b'}: node names or op types, the form quantize's exclude takes."""
    return {part.strip() for part in text.split(";") if part.strip()}


# ----------------------------------------------------------------------------- finding layers


@dataclass
class Layer:
    """One layer to correct: its node, the weight error it will get, and where its bias lives."""

    node: gs.Node
    delta: np.ndarray  # ΔW = fake_quantize(W) − W, W's layout
    output: gs.Tensor  # the tensor whose mean shifts: the layer's output, or its bias Add's
    bias_add: gs.Node | None = None  # MatMul only: the Add that holds its bias

    @property
    def channel_axis(self) -> int:
        return 1 if self.node.op == "Conv" else -1


def find_layers(graph: gs.Graph, per_channel: bool, exclude: set[str]) -> tuple[list[Layer], list[dict]]:
    """The correctable layers of the main graph, and why each other candidate was skipped."""
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not is_standard_domain(node):
            continue
        if node.name in exclude or node.op in exclude:
            reason = "excluded"
        else:
            layer_or_reason = _layer(node, graph, per_channel)
            if isinstance(layer_or_reason, Layer):
                layers.append(layer_or_reason)
                continue
            reason = layer_or_reason
        skipped.append({"name": node.name, "op": node.op, "reason": reason})
    return layers, skipped


def _layer(node: gs.Node, graph: gs.Graph, per_channel: bool) -> Layer | str:
    """A Layer for `node`, or the reason it cannot be corrected."""
    if len(node.inputs) < 2 or constant_value(node.inputs[0]) is not None:
        return "input is not an activation"
    weight = constant_value(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        return "weight is not a constant float32"
    if node.op == "MatMul" and weight.ndim != 2:
        return "MatMul weight is not 2-D"
    axis = weight_axis(node.op, node.attrs, weight.ndim) if per_channel else None
    delta = fake_quantize_weight(weight, axis) - weight
    if not np.any(delta):
        return "weight is exact in int8"
    if node.op != "MatMul":
        has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        bias = constant_value(node.inputs[2]) if has_bias else None
        if has_bias and (bias is None or bias.dtype != np.float32):
            return "bias is not a constant float32"
        return Layer(node, delta, node.outputs[0])
    add = bias_add(node, graph)
    if add is None:
        return "MatMul has no constant bias Add as its only reader"
    return Layer(node, delta, add.outputs[0], add)


# --------------------------------------------------------------------------- measuring errors


@dataclass
class ErrorSums:
    """Per-output-channel sums of a layer's error e = op(x, ΔW), and its float output's energy."""

    error_sum: np.ndarray  # Σ e per channel
    error_square_sum: np.ndarray  # Σ e² per channel
    count: int = 0  # values per channel
    signal: float = 0.0  # Σ y² of the float layer output

    @property
    def shift(self) -> np.ndarray:
        return self.error_sum / max(self.count, 1)

    def sqnr_before(self) -> float:
        return sqnr_from_energies(self.signal, float(self.error_square_sum.sum()))

    def sqnr_after(self) -> float:
        # Σ (e − s)² = Σ e² − (Σ e)²/n per channel, for s = Σ e / n: no second pass over the data.
        residual = self.error_square_sum - self.error_sum**2 / max(self.count, 1)
        return sqnr_from_energies(self.signal, float(np.maximum(residual, 0.0).sum()))


def measure_errors(model: onnx.ModelProto, layers: list[Layer], ctx: PassContext) -> list[ErrorSums]:
    """Stream the calibration data once through `model` plus one probe op(x, ΔW) per layer."""
    probed = with_probes(model, layers)
    probes = [f"{PROBE_PREFIX}.{index}" for index in range(len(layers))]
    outputs = [layer.output.name for layer in layers]
    sums: list[ErrorSums | None] = [None] * len(layers)
    streamed = stream_tensors(
        probed,
        ctx.calib.batches(),
        [*probes, *outputs],
        threads=ctx.threads,
        progress=ctx.progress,
        description="bias correction",
        total=ctx.calib.num_batches,
    )
    for values in streamed:
        for index, layer in enumerate(layers):
            error = channels_last(values[probes[index]], layer.channel_axis)
            output = values[layer.output.name].astype(np.float64)
            sums[index] = _accumulate(sums[index], error, output)
    if sums and sums[0] is None:
        raise BadInput("correct-bias: the calibration data yielded no batches")
    return sums


def with_probes(model: onnx.ModelProto, layers: list[Layer]) -> onnx.ModelProto:
    """`model` plus, per layer, the same op applied to ΔW instead of W, without bias."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    for index, layer in enumerate(layers):
        node = layer.node
        delta_name = f"{PROBE_PREFIX}.{index}.delta"
        # A Gemm probe without C ignores beta; every other attribute means the same for ΔW.
        attrs = {k: v for k, v in node.attrs.items() if k != "beta" and v not in ([], ())}
        probe = onnx.helper.make_node(
            node.op, [node.inputs[0].name, delta_name], [f"{PROBE_PREFIX}.{index}"], **attrs
        )
        probed.graph.node.append(probe)
        probed.graph.initializer.append(onnx.numpy_helper.from_array(layer.delta, delta_name))
    return probed


def _accumulate(sums: ErrorSums | None, error: np.ndarray, output: np.ndarray) -> ErrorSums:
    if sums is None:
        channels = error.shape[1]
        sums = ErrorSums(np.zeros(channels), np.zeros(channels))
    sums.error_sum += error.sum(axis=0)
    sums.error_square_sum += (error * error).sum(axis=0)
    sums.count += error.shape[0]
    sums.signal += float(np.sum(output * output))
    return sums


# ---------------------------------------------------------------------------- correcting bias


def apply_correction(layer: Layer, errors: ErrorSums, names: Names) -> dict[str, Any]:
    """Subtract the measured shift from the layer's bias; the row that reports it."""
    shift = errors.shift
    if layer.node.op == "Conv":
        set_bias(layer.node, 2, conv_bias(layer.node, shift), names)
    elif layer.node.op == "Gemm":
        set_bias(layer.node, 2, gemm_bias(layer.node, shift), names)
    else:
        add = layer.bias_add
        index = 0 if add.inputs[1] is layer.node.outputs[0] else 1
        bias = constant_value(add.inputs[index]).astype(np.float64)
        set_bias(add, index, (bias - shift).astype(np.float32), names)
    return {
        "name": layer.node.name,
        "op": layer.node.op,
        "mean_abs_shift": float(np.mean(np.abs(shift))),
        "max_abs_shift": float(np.max(np.abs(shift))),
        "sqnr_before_db": round(errors.sqnr_before(), 3),
        "sqnr_after_db": round(errors.sqnr_after(), 3),
    }
