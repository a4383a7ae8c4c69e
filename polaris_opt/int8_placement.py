"""Where INT8 goes: which nodes run quantized, which tensors get Q/DQ, with which parameters.

`plan_int8(graph, ranges, config)` decides and changes nothing; `apply_plan` then edits the
graph with the idioms of polaris_opt.qdq. Only the main graph is quantized: calibration sees
no tensor inside an If/Loop body, so sub-graphs stay float, whole.

The rules follow what ONNX Runtime's CPU graph optimizer fuses (its QDQ selectors):

- WEIGHTED (Conv, ConvTranspose, Gemm, MatMul) start the int8 regions: their float inputs get
  Q/DQ, their weights become int8. DQ→Conv→Q is QLinearConv only when every input comes from
  a DQ (the bias as int32) and the Q is the Conv output's one reader, so a Conv's output is
  always quantized. DQ→Gemm is QGemm with or without a Q after it, DQ→MatMul without a Q is
  MatMulIntegerToFloat: their outputs are quantized only when a reader wants them so.
- QLINEAR (Add, Mul, Concat, AveragePool, GlobalAveragePool, Sigmoid, LeakyRelu) have int8
  kernels. They run int8 when their float inputs are quantized already (a residual Add between
  Convs), and then their output is quantized too. Between float tensors (a transformer's bias
  Add after MatMulIntegerToFloat) they stay float: quantizing there adds roundings and Q/DQ
  nodes and costs ONNX Runtime its float fusions (BiasGelu, SkipLayerNormalization). Measured
  on transformer_s: 34.5 dB and 0.076 ms/inference, against 29.1 dB and 0.083 ms when every
  Add and Mul was quantized.
- SHARED (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, MaxPool, Resize) with one scale and
  zero point on both sides lose their Q/DQ and move int8 data. Their output reuses the input's
  parameters; a quantized output pulls the input along, and a quantized input the output.
- Relu, or Clip(0, m), right after a WEIGHTED/QLINEAR op (its only reader): with uint8
  activations the range of its output starts at 0, so zero point 0 and the op's output Q clamps
  exactly as the activation did. The activation goes and the op fuses with no Q/DQ in between.
  With int8 (symmetric) activations a Q cannot clamp at 0, so the activation stays, between two
  Q/DQ of one scale taken from its output's range.
- FOLLOWER (any other Relu/Clip, HardSigmoid) has no int8 kernel: int8 only between tensors
  quantized for other reasons.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.qdq import (
    Names,
    absorb_activation,
    clamp_bounds,
    dequantized_constant,
    existing_params,
    insert_qdq,
    int32_bias,
    is_dequantized,
    prequantized,
)
from polaris_opt.quant_params import QuantParams, activation_params, quantize, weight_axis, weight_params
from polaris_opt.surgery import constant_value, is_graph_output, is_standard_domain, producer, subgraphs

Range = tuple[float, float]
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel scales) arrived in opset 13
QDQ_OPSET = 10


class Role(enum.Enum):
    WEIGHTED = "weighted"
    QLINEAR = "qlinear"
    SHARED = "shared"
    FOLLOWER = "follower"


ROLES: dict[str, Role] = {
    **dict.fromkeys(("Conv", "ConvTranspose", "Gemm", "MatMul"), Role.WEIGHTED),
    **dict.fromkeys(
        ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"), Role.QLINEAR
    ),
    **dict.fromkeys(
        ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize"), Role.SHARED
    ),
    **dict.fromkeys(("Relu", "Clip", "HardSigmoid"), Role.FOLLOWER),
}
ALWAYS_QUANTIZED_OUTPUT = ("Conv", "ConvTranspose")  # no int8 kernel without the Q after them
BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
NOT_LAYERS = ("QuantizeLinear", "DequantizeLinear", "Constant")


@dataclass(frozen=True)
class Int8Config:
    per_channel: bool = True
    symmetric_activations: bool = False  # int8 symmetric; False: uint8 asymmetric
    exclude: frozenset[str] = frozenset()  # node names or op types
    include: frozenset[str] = frozenset()  # node names; empty: every node
    quantize_outputs: bool = True  # graph outputs may get Q/DQ (their op needs one to run int8)


@dataclass
class Layer:
    node: gs.Node
    precision: str  # "int8" | "float"
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        node = self.node
        return {"name": node.name, "op": node.op, "precision": self.precision, "reason": self.reason}


@dataclass
class ConstantJob:
    """A constant input of an int8 node, to be replaced by integer codes and a DequantizeLinear."""

    node: gs.Node
    index: int
    codes: np.ndarray
    params: QuantParams


@dataclass
class ActivationJob:
    """A Q/DQ pair on `tensor`; `readers` switch to the dequantized value (None: every reader)."""

    tensor: gs.Variable
    params: QuantParams
    readers: list[gs.Node] | None


@dataclass
class Plan:
    layers: list[Layer] = field(default_factory=list)  # main-graph nodes, absorbed activations left out
    activations: list[ActivationJob] = field(default_factory=list)
    absorbed: list[gs.Node] = field(default_factory=list)  # Relu/Clip whose producer's Q clamps for them
    weights: list[ConstantJob] = field(default_factory=list)
    biases: list[ConstantJob] = field(default_factory=list)
    per_channel: bool = True
    notes: list[str] = field(default_factory=list)
    missing_ranges: list[str] = field(default_factory=list)

    def float_ops(self) -> dict[str, int]:
        return dict(Counter(layer.node.op for layer in self.layers if layer.precision == "float"))


def plan_int8(graph: gs.Graph, ranges: Mapping[str, Range], config: Int8Config) -> Plan:
    """Decide what `apply_plan` will do to `graph`; BadInput for NaN/Inf weights or ranges."""
    return _Planner(graph, ranges, config).plan()


def apply_plan(graph: gs.Graph, plan: Plan) -> dict[str, int]:
    """Make `graph` what `plan` says; returns how many Q/DQ pairs, weights and biases it made."""
    names = Names(graph)
    for activation in plan.absorbed:
        absorb_activation(graph, activation)
    for job in plan.activations:
        insert_qdq(graph, job.tensor, job.params, names, job.readers)
    stored: dict[tuple, gs.Variable] = {}  # one int8 copy of a weight that several nodes read
    for job in plan.weights:
        source = job.node.inputs[job.index]
        key = (source.name, job.params.axis, job.params.dtype, job.params.scale.tobytes())
        if key not in stored:
            stored[key] = dequantized_constant(graph, source.name, job.codes, job.params, names)
        job.node.inputs[job.index] = stored[key]
    for job in plan.biases:
        base = job.node.inputs[job.index].name
        job.node.inputs[job.index] = dequantized_constant(graph, base, job.codes, job.params, names)
        if job.node.op == "Gemm":
            job.node.attrs["beta"] = 1.0  # β is in the codes now; QGemm wants it written as 1
    graph.toposort()
    return {"qdq_pairs": len(plan.activations), "weights": len(stored), "biases": len(plan.biases)}


# ----------------------------------------------------------------- which nodes may run int8


def float_reason(node: gs.Node, graph: gs.Graph, config: Int8Config) -> str | None:
    """Why `node` stays float whatever its neighbours do; None when it may run int8."""
    if not is_standard_domain(node):
        return f"domain '{node.domain}' is left as it is"
    if subgraphs(node):
        return "control flow: its sub-graphs stay float (calibration covers the main graph only)"
    if node.op not in ROLES:
        return "no int8 form"
    if node.name in config.exclude or node.op in config.exclude:
        return "excluded"
    if config.include and node.name not in config.include:
        return "not in the include list"
    if any(t.outputs or is_graph_output(t, graph) for t in node.outputs[1:]):
        return "more than one output in use"
    if ROLES[node.op] in (Role.SHARED, Role.FOLLOWER):
        return _type_problem(node.outputs[0]) or _type_problem(node.inputs[0])
    return _type_problem(node.outputs[0])


def input_problem(node: gs.Node, ranges: Mapping[str, Range]) -> str | None:
    """Why a WEIGHTED/QLINEAR node cannot quantize its inputs; BadInput for a NaN/Inf weight."""
    for index, tensor in enumerate(node.inputs):
        if tensor.is_empty() or is_dequantized(tensor):
            continue
        value = constant_value(tensor)
        if value is not None:
            if value.dtype != np.float32:
                return f"constant input '{tensor.name}' is {value.dtype}, not float32"
            if not np.all(np.isfinite(value)):
                raise BadInput(
                    f"quantize: weight '{tensor.name}' of {node.op} node '{node.name}' holds NaN or Inf; "
                    f"fix the model, or keep the node float with --exclude {node.name}"
                )
        elif BIAS_INPUT.get(node.op) == index:
            return "its bias is computed at run time"
        elif _type_problem(tensor):
            return _type_problem(tensor)
        elif tensor.name not in ranges:
            return f"no calibration range for '{tensor.name}'"
    return None


def activation_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs of a WEIGHTED/QLINEAR node that are computed at run time (bias excepted)."""
    return [
        tensor
        for index, tensor in enumerate(node.inputs)
        if not tensor.is_empty() and constant_value(tensor) is None and BIAS_INPUT.get(node.op) != index
    ]


class _Planner:
    """The decisions of one `plan_int8` call; tensors are keyed by name (unique in the main graph)."""

    def __init__(self, graph: gs.Graph, ranges: Mapping[str, Range], config: Int8Config):
        self.graph, self.ranges, self.config = graph, ranges, config
        self.per_channel = config.per_channel
        self.nodes = [n for n in graph.nodes if n.op not in NOT_LAYERS or not is_standard_domain(n)]
        self.roles: dict[int, Role] = {}  # id(node) -> role, for the nodes that may run int8
        self.reasons: dict[int, str] = {}  # id(node) -> why it stays float
        self.int8: set[int] = set()  # id(node) of the nodes that run int8
        self.wanted: dict[str, gs.Tensor] = {}  # the tensors to quantize, in the order first wanted
        self.param_source: dict[str, gs.Tensor] = {}  # name -> the tensor whose range sets its parameters
        self.clamps: dict[str, Range] = {}  # a Relu/Clip's bounds, which its output's Q applies
        self.after_op: dict[int, gs.Node] = {}  # id -> Relu/Clip right after a WEIGHTED/QLINEAR op

    def plan(self) -> Plan:
        notes = self._check_opset()
        for node in self.nodes:
            reason = float_reason(node, self.graph, self.config)
            if reason is None and ROLES[node.op] in (Role.WEIGHTED, Role.QLINEAR):
                reason = input_problem(node, self.ranges)
            if reason is None:
                self.roles[id(node)] = ROLES[node.op]
            else:
                self.reasons[id(node)] = reason
        self.after_op = {id(n): n for n in self.nodes if self._right_after_op(n)}
        self.clamps = {a.outputs[0].name: clamp_bounds(a) for a in self.after_op.values()}
        for node in self.nodes:
            if self.roles.get(id(node)) is Role.WEIGHTED:
                self._start_region(node)
        self._propagate()
        plan = Plan(per_channel=self.per_channel, notes=notes)
        plan.absorbed = [a for a in self.after_op.values() if self._absorbed(a)]
        absorbed = {id(a) for a in plan.absorbed}
        plan.layers = [self._layer(node) for node in self.nodes if id(node) not in absorbed]
        plan.activations = self._activation_jobs(absorbed)
        for layer in plan.layers:
            if id(layer.node) in self.int8 and self.roles[id(layer.node)] in (Role.WEIGHTED, Role.QLINEAR):
                self._constant_jobs(layer, plan)
        plan.missing_ranges = self._missing_ranges()
        return plan

    def _check_opset(self) -> list[str]:
        opset = self.graph.opset
        if opset < QDQ_OPSET:
            raise BadInput(
                f"quantize: the model has opset {opset}; QuantizeLinear needs {QDQ_OPSET} or later "
                "(convert it with onnx.version_converter first)"
            )
        if opset < PER_CHANNEL_OPSET and self.per_channel:
            self.per_channel = False
            return [f"per-channel weights need opset {PER_CHANNEL_OPSET}; this model has {opset}: per-tensor"]
        return []

    def _missing_ranges(self) -> list[str]:
        nodes = [n for n in self.nodes if self.reasons.get(id(n), "").startswith("no calibration range")]
        tensors = [t.name for n in nodes for t in activation_inputs(n) if t.name not in self.ranges]
        return list(dict.fromkeys(tensors))

    # ------------------------------------------------------------ Relu/Clip after an int8 op

    def _right_after_op(self, activation: gs.Node) -> bool:
        """A Relu/Clip whose clamp the Q after its producer can do (uint8) or share (int8)."""
        bounds = clamp_bounds(activation) if self.roles.get(id(activation)) is Role.FOLLOWER else None
        if bounds is None or not (self.config.symmetric_activations or bounds[0] == 0.0):
            return False
        source, result = activation.inputs[0], activation.outputs[0]
        writer = producer(source)
        return not (
            writer is None
            or self.roles.get(id(writer)) not in (Role.WEIGHTED, Role.QLINEAR)
            or len(source.outputs) != 1
            or is_graph_output(source, self.graph)
            or result.name not in self.ranges
            or prequantized(result)  # a Q of the input model's own need not clamp at 0
            or (is_graph_output(result, self.graph) and not self.config.quantize_outputs)
        )

    def _absorbed(self, activation: gs.Node) -> bool:
        """uint8: the activation goes when its producer runs int8 and its output is quantized."""
        return (
            not self.config.symmetric_activations
            and id(producer(activation.inputs[0])) in self.int8
            and activation.outputs[0].name in self.wanted
        )

    # -------------------------------------------------------------- spreading int8 regions

    def _start_region(self, node: gs.Node) -> None:
        self.int8.add(id(node))
        for tensor in activation_inputs(node):
            self._want(tensor)
        if node.op in ALWAYS_QUANTIZED_OUTPUT:
            self._want_output(node)

    def _want_output(self, node: gs.Node) -> None:
        """Quantize what the node writes; with uint8, past a Relu/Clip the Q can stand in for."""
        result = node.outputs[0]
        reader = result.outputs[0] if len(result.outputs) == 1 else None
        if reader is not None and id(reader) in self.after_op and not self.config.symmetric_activations:
            result = reader.outputs[0]
        if self.config.quantize_outputs or not is_graph_output(result, self.graph):
            self._want(result)

    def _want(self, tensor: gs.Tensor) -> bool:
        """Mark `tensor` to be quantized (unless the model does so already); True if that is new."""
        if tensor.name in self.wanted or prequantized(tensor):
            return False
        self.wanted[tensor.name] = tensor
        return True

    def _quantized(self, tensor: gs.Tensor) -> bool:
        return tensor.name in self.wanted or prequantized(tensor)

    def _propagate(self) -> None:
        """Spread int8 from the WEIGHTED ops through QLINEAR, SHARED and kept activations, to a fixpoint."""
        changed = True
        while changed:
            changed = False
            for node in self.nodes:
                role = self.roles.get(id(node))
                if role is Role.QLINEAR:
                    changed |= self._join_qlinear(node)
                elif role is Role.SHARED:
                    changed |= self._tie(node, params_from=node.inputs[0])
                elif id(node) in self.after_op and self.config.symmetric_activations:
                    changed |= self._tie(node, params_from=node.outputs[0])

    def _join_qlinear(self, node: gs.Node) -> bool:
        if id(node) in self.int8 or not all(self._quantized(t) for t in activation_inputs(node)):
            return False
        self.int8.add(id(node))
        self._want_output(node)
        return True

    def _tie(self, node: gs.Node, params_from: gs.Tensor) -> bool:
        """Once either side of `node` is quantized, both are, with the parameters of `params_from`.

        SHARED ops take their input's; a Relu/Clip kept for int8 activations its output's, and
        only after an int8 producer.
        """
        source, result = node.inputs[0], node.outputs[0]
        if not (self._quantized(source) or self._quantized(result)):
            return False
        if params_from is source and not self._quantized(source) and source.name not in self.ranges:
            return False  # the output keeps its own range; the op stays float
        if params_from is result and id(producer(source)) not in self.int8:
            return False
        if is_graph_output(result, self.graph) and not self.config.quantize_outputs:
            return False
        self.int8.add(id(node))
        other = result if params_from is source else source
        changed = self.param_source.get(other.name) is not params_from
        self.param_source[other.name] = params_from
        return self._want(source) | self._want(result) | changed

    # ----------------------------------------------------------------------------- results

    def _layer(self, node: gs.Node) -> Layer:
        role = self.roles.get(id(node))
        if role is None:
            return Layer(node, "float", self.reasons[id(node)])
        if role is Role.FOLLOWER and self._quantized(node.inputs[0]) and self._quantized(node.outputs[0]):
            self.int8.add(id(node))
        if id(node) not in self.int8:
            return Layer(node, "float", "its neighbours are float: no int8 region to join")
        notes = {Role.SHARED: ["moves int8 data"], Role.FOLLOWER: ["runs in float between int8 tensors"]}
        notes = notes.get(role, [])
        if all(prequantized(t) for t in node.inputs if not t.is_empty()):
            notes.append("already quantized in the input model")
        reader = node.outputs[0].outputs[0] if len(node.outputs[0].outputs) == 1 else None
        if reader is not None and id(reader) in self.after_op and self._absorbed(reader):
            notes.append(f"{reader.op} '{reader.name}' absorbed: the output Q clamps")
        return Layer(node, "int8", "; ".join(notes))

    def _activation_jobs(self, absorbed: set[int]) -> list[ActivationJob]:
        jobs = []
        for tensor in self.wanted.values():
            readers = self._readers(tensor, absorbed)
            if readers is None or readers:
                jobs.append(ActivationJob(tensor, self._params(tensor), readers))
        return jobs

    def _readers(self, tensor: gs.Tensor, absorbed: set[int]) -> list[gs.Node] | None:
        """Who reads the dequantized tensor; None: every reader, the graph output included.

        An int8 producer must feed nothing but its Q to fuse, so all its readers switch. After a
        float producer (or for a graph input) only int8 readers do: float ones keep exact values.
        """
        writer = producer(tensor)
        if writer is not None and id(writer) in absorbed:
            writer = producer(writer.inputs[0])  # the op that will write the activation's output
        if writer is None or id(writer) not in self.int8:
            return [node for node in tensor.outputs if id(node) in self.int8]
        if is_graph_output(tensor, self.graph) and not self.config.quantize_outputs:
            return list(tensor.outputs)  # the user reads this output unquantized
        return None

    def _params(self, tensor: gs.Tensor) -> QuantParams:
        """From the range of the tensor it shares parameters with (or its own, or the model's Q/DQ)."""
        source = tensor
        while source.name in self.param_source:
            source = self.param_source[source.name]
        if prequantized(source) and existing_params(source) is not None:
            return existing_params(source)
        low, high = self.ranges[source.name]
        bottom, top = self.clamps.get(source.name, (-np.inf, np.inf))
        low, high = max(low, bottom), min(high, top)
        try:
            return activation_params(low, high, symmetric=self.config.symmetric_activations)
        except ValueError:
            raise BadInput(
                f"quantize: calibration range of '{source.name}' is [{low}, {high}], not finite; "
                "check the calibration data for NaN or Inf"
            ) from None

    def _tensor_params(self, tensor: gs.Tensor) -> QuantParams | None:
        return self._params(tensor) if tensor.name in self.wanted else existing_params(tensor)

    # -------------------------------------------------------------------- weights and biases

    def _constant_jobs(self, layer: Layer, plan: Plan) -> None:
        node = layer.node
        for index, tensor in enumerate(node.inputs):
            value = None if tensor.is_empty() or is_dequantized(tensor) else constant_value(tensor)
            if value is None or BIAS_INPUT.get(node.op) == index:
                continue
            params = self._constant_params(node, index, value)
            codes = quantize(value, params, narrow=params.dtype == np.int8)
            plan.weights.append(ConstantJob(node, index, codes, params))
        if node.op in BIAS_INPUT:
            self._bias_job(layer, plan)

    def _constant_params(self, node: gs.Node, index: int, value: np.ndarray) -> QuantParams:
        if self.roles[id(node)] is Role.QLINEAR:
            # A constant operand of Add/Mul/Concat is quantized like the activations it meets.
            low, high = float(value.min(initial=0.0)), float(value.max(initial=0.0))
            return activation_params(low, high, symmetric=self.config.symmetric_activations)
        axis = weight_axis(node.op, node.attrs, value.ndim) if self.per_channel and index == 1 else None
        return weight_params(value, axis)

    def _bias_job(self, layer: Layer, plan: Plan) -> None:
        node, index = layer.node, BIAS_INPUT[layer.node.op]
        if index >= len(node.inputs) or node.inputs[index].is_empty() or is_dequantized(node.inputs[index]):
            return
        bias = constant_value(node.inputs[index])
        if node.op == "Gemm":
            # Y = α·A·B + β·C: a C of shape [1, N] broadcasts like [N]; β goes into the codes.
            bias = bias.reshape(-1) if bias.ndim == 2 and bias.shape[0] == 1 else bias
            bias = bias * np.float32(node.attrs.get("beta", 1.0))
        source = self._tensor_params(node.inputs[0])
        job = next((job for job in plan.weights if job.node is node and job.index == 1), None)
        if job is not None and source is not None:
            job.params = _fit_zero_channels(job, bias, source.scale)
        weight = job.params if job is not None else self._tensor_params(node.inputs[1])
        quantized = int32_bias(bias, source, weight)
        if isinstance(quantized, str):
            layer.reason = "; ".join(filter(None, [layer.reason, quantized]))
        else:
            plan.biases.append(ConstantJob(node, index, *quantized))


def _fit_zero_channels(job: ConstantJob, bias: np.ndarray, input_scale: np.ndarray) -> QuantParams:
    """Weight scales for all-zero channels (pruned, dead) chosen for their bias instead.

    Such a channel's codes are 0 at any scale, and weight_params gives it 1.0; but its bias is
    stored at s_x·s_w, so 1.0 would round the bias to whole multiples of s_x. A scale that puts
    the bias at 2^23 codes keeps it to float32 precision, with room left in int32.
    """
    params = job.params
    zero = _zero_channels(job.codes, params)
    if not np.any(zero) or bias.ndim != 1 or (params.axis is not None and bias.size != params.scale.size):
        return params
    magnitude = np.abs(bias) if params.axis is not None else np.max(np.abs(bias), initial=0.0)
    fitted = (magnitude / (float(input_scale) * 2.0**23)).astype(np.float32)
    scale = np.where(zero & (fitted > 0), fitted, params.scale).astype(np.float32)
    return QuantParams(scale, params.zero_point, params.axis)


def _zero_channels(codes: np.ndarray, params: QuantParams) -> np.ndarray:
    """For each scale of `params`, whether every code it covers is 0."""
    if params.axis is None:
        return np.array(not np.any(codes))
    return ~np.any(np.moveaxis(codes, params.axis, 0).reshape(params.scale.size, -1), axis=1)


def _type_problem(tensor: gs.Tensor) -> str | None:
    """Why `tensor` cannot be quantized for its type; None for float32."""
    if tensor.dtype is None:
        return f"type of '{tensor.name}' unknown (run infer-shapes before quantize)"
    if np.dtype(tensor.dtype) != np.float32:
        return f"'{tensor.name}' is {np.dtype(tensor.dtype)}, not float32"
    return None
