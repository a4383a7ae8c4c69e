"""quantize: INT8 static quantization to QDQ (QuantizeLinear/DequantizeLinear) for ONNX Runtime.

Weights become int8 initializers read through a DequantizeLinear: symmetric over [-127, 127],
one scale per output channel (or per tensor). Activations get one Q→DQ pair per tensor, with
the scale and zero point of their calibrated range (`ctx.calibration`, left there by the
`calibrate` pass): uint8 asymmetric, or int8 symmetric. Biases of Conv/ConvTranspose/Gemm
become int32 at scale s_x·s_w. Where the Q/DQ go, so that ONNX Runtime fuses them into
QLinearConv, QGemm, QLinearMatMul and friends, is polaris_opt.int8_placement's business.

Left float, and listed in `details["layers"]` with the reason: ops with no int8 form, nodes
of other domains, If/Loop/Scan and everything inside them, tensors without a calibrated range,
excluded nodes. A model that already carries Q/DQ (quantization-aware training) keeps them;
what they cover is not quantized twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.int8_placement import Int8Config, apply_plan, plan_int8
from polaris_opt.passes_api import Pass, PassContext, PassResult


class WeightType(str, enum.Enum):
    INT8 = "int8"


class ActivationType(str, enum.Enum):
    UINT8 = "uint8"  # asymmetric: a zero point, so a Relu's [0, max] uses all 256 codes
    INT8 = "int8"  # symmetric: zero point 0


@dataclass(frozen=True)
class Quantize(Pass):
    """Float Conv/Gemm/MatMul and the ops between them  ⇒  INT8 QDQ, with calibrated activations."""

    name: ClassVar[str] = "quantize"

    weights: WeightType = field(
        default=WeightType.INT8, metadata={"help": "weight type (int8, the one so far)"}
    )
    per_channel: bool = field(
        default=True, metadata={"help": "one weight scale per output channel (false: per tensor)"}
    )
    activations: ActivationType = field(
        default=ActivationType.UINT8, metadata={"help": "uint8 asymmetric or int8 symmetric activations"}
    )
    exclude: str = field(default="", metadata={"help": "';'-separated node names or op types kept float"})
    include: str = field(
        default="", metadata={"help": "';'-separated node names to quantize; empty: every node that can be"}
    )
    # On by default, measured: a Conv (or Add, Concat...) needs the Q after it to run int8, even
    # when it writes a graph output. Three-Conv FCN (48x48, batch 1, one thread): 0.27 ms with
    # the Q on the output, 0.56 ms without (the last Conv runs float on dequantized inputs), 0.27
    # ms for onnxruntime.quantization, 0.63 ms FP32; the Q costs 1.6 dB of output SQNR (33.4
    # against 35.0 dB). A Gemm/MatMul output gets no Q either way unless an int8 reader wants it:
    # QGemm and MatMulIntegerToFloat need none, one rounding fewer than ORT's quantizer makes.
    quantize_outputs: bool = field(
        default=True, metadata={"help": "allow Q/DQ on graph outputs (false: they stay exactly float)"}
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise BadInput(
                "quantize needs calibration: put calibrate{method=...} before it in the pipeline, "
                "or give --calib"
            )
        plan = plan_int8(graph, ctx.calibration.ranges, self._config())
        counts = apply_plan(graph, plan)
        int8 = sum(layer.precision == "int8" for layer in plan.layers)
        stats = {
            "layers_quantized": int8,
            "layers_float": len(plan.layers) - int8,
            "qdq_pairs": counts["qdq_pairs"],
            "weights_quantized": counts["weights"],
            "biases_quantized": counts["biases"],
        }
        details = {
            "layers": [layer.as_dict() for layer in plan.layers],
            "float_ops": plan.float_ops(),
            "per_channel": plan.per_channel,
            "activations": ActivationType(self.activations).value,
            "missing_ranges": plan.missing_ranges,
            "notes": plan.notes,
        }
        for note in plan.notes:
            ctx.log.warning("quantize: %s", note)
        modified = any(counts.values()) or bool(plan.absorbed)
        return PassResult(modified=modified, stats=stats, details=details)

    def _config(self) -> Int8Config:
        return Int8Config(
            per_channel=self.per_channel,
            symmetric_activations=ActivationType(self.activations) is ActivationType.INT8,
            exclude=_names(self.exclude),
            include=_names(self.include),
            quantize_outputs=self.quantize_outputs,
        )


def _names(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(";") if part.strip())
