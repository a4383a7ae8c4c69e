"""convert-fp16: float32 weights and compute become float16; Casts join what stays float32 to the rest.

Each node of the main graph is planned from its op schema (onnx.defs.get_schema at the model's
opset). Tensors bound to one type variable must share a type, so the float32 tensors of a type
variable that admits tensor(float16) switch together; an input or output whose type is fixed
(Resize `scales` is tensor(float), LayerNormalization's Mean is float or bfloat16) stays
float32. A node stays float32 altogether when:

- it is of another domain than ONNX's (its kernel's types are unknown to us),
- it holds a sub-graph (If/Loop/Scan): the node and its bodies stay float32 as they are, and
  what they read from the main graph, named or by outer scope, is fed float32,
- its op type is in `keep-ops`,
- a tensor it reads or writes would overflow float16 (|x| > 65504): a weight's values, or, with
  calibration (ctx.calibration), a tensor's calibrated range,
- the types of its tensors are unknown, or its schema admits float16 nowhere.

Values known when converting are converted, not cast at run time: an initializer read only in
float16 is replaced by its float16 version under the same name; one also read in float32 keeps
its float32 version beside a float16 copy. Constant nodes read only in float16 hold float16.
Ops whose output type an attribute names (Cast `to`, EyeLike and Random* `dtype`, the value of
ConstantOfShape) are told float16.

Wherever a tensor is stored in one type and read in the other, one Cast per tensor and type is
inserted right after the tensor is made (shared by all its readers). With keep-io-types=true the
graph's inputs and outputs stay float32, with a Cast after each input and before each output
(under the output's own name); with false they become float16.

No op is kept float32 by default: ONNX Runtime's CPU provider has float16 kernels for few ops and
runs the others in float32 between Casts it inserts itself, so reductions (Softmax,
LayerNormalization, ReduceMean) accumulate in float32 anyway; measured on the zoo, every model
stays above 55 dB SQNR with nothing kept (tests/test_convert_fp16.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from polaris_opt.calib_stats import CalibrationTable
from polaris_opt.errors import BadInput
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.shape_info import inference_skeleton
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    is_graph_output,
    is_standard_domain,
    producer,
    subgraphs,
)

FLOAT32, FLOAT16 = np.dtype(np.float32), np.dtype(np.float16)
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
ONNX_TYPE = {FLOAT32: TensorProto.FLOAT, FLOAT16: TensorProto.FLOAT16}
# Ops whose output type an integer attribute names; a converted one must name float16.
DTYPE_ATTRIBUTES = {
    "Cast": "to",
    "EyeLike": "dtype",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype",
    "Bernoulli": "dtype",
}


@dataclass(frozen=True)
class NodePlan:
    """Which inputs and outputs of a node are float16 after conversion; or why it stays float32."""

    fp16_inputs: frozenset[int] = frozenset()
    fp16_outputs: frozenset[int] = frozenset()
    kept: str | None = None

    @property
    def converted(self) -> bool:
        return bool(self.fp16_inputs or self.fp16_outputs)


@dataclass(frozen=True)
class ConvertFp16(Pass):
    """float32 weights and compute  ⇒  float16, float32 where an op or a range needs it, Casts between."""

    name: ClassVar[str] = "convert-fp16"
    lossy: ClassVar[bool] = True

    keep_io_types: bool = field(
        default=True, metadata={"help": "graph inputs and outputs stay float32 (false: float16)"}
    )
    keep_ops: str = field(default="", metadata={"help": "';'-separated op types to compute in float32"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        keep_ops = parse_keep_ops(self.keep_ops)
        dtypes = tensor_dtypes(graph)
        overflowing = overflowing_tensors(ctx.calibration)
        plans = {
            id(node): plan_node(node, graph.opset, dtypes, keep_ops, overflowing)
            for node in graph.nodes
            if node.op != "Constant" or not is_standard_domain(node)
        }
        converted_nodes = sum(plan.converted for plan in plans.values())
        rewriter = _Rewriter(graph, plans, dtypes, self.keep_io_types)
        rewriter.plan_constant_nodes()
        rewriter.apply()
        kept = [
            {"node": node.name, "op": node.op, "reason": plans[id(node)].kept}
            for node in graph.nodes
            if id(node) in plans and plans[id(node)].kept
        ]
        stats = {"nodes_float16": converted_nodes, "nodes_float32": len(kept), **rewriter.counts}
        details = {"kept_float32": kept, "casts": rewriter.cast_names}
        return PassResult(modified=rewriter.modified, stats=stats, details=details)


# ------------------------------------------------------------------------------- planning


def parse_keep_ops(text: str) -> frozenset[str]:
    ops = frozenset(entry.strip() for entry in text.split(";") if entry.strip())
    unknown = sorted(op for op in ops if not onnx.defs.has(op))
    if unknown:
        raise BadInput(
            f"convert-fp16: keep-ops names {', '.join(repr(op) for op in unknown)}, not ONNX op types; "
            "give op types separated by ';', e.g. keep-ops=Softmax;LayerNormalization"
        )
    return ops


def tensor_dtypes(graph: gs.Graph) -> dict[str, np.dtype]:
    """Element type of the main graph's tensors by name, where known; sequences and optionals are left out.

    ONNX shape inference first (what the graph records may be stale), then what the graph records
    where inference finds nothing (outputs of ops of other domains that have value-info); an
    initializer's type is that of its values.
    """
    known: dict[str, np.dtype] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(inference_skeleton(graph), strict_mode=False).graph
        infos = [*inferred.input, *inferred.output, *inferred.value_info]
    except Exception:  # noqa: BLE001 - what the graph records is all we have then
        infos = []
    for info in infos:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            known[info.name] = _numpy_dtype(info.type.tensor_type.elem_type)
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant):
            value = constant_value(tensor)
            known[name] = value.dtype if value is not None else None
        elif tensor.type == "tensor_type":
            known.setdefault(name, _numpy_dtype(tensor.dtype))
    return {name: dtype for name, dtype in known.items() if dtype is not None}


def _numpy_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, int):  # graphsurgeon keeps ONNX enums for types NumPy lacks (bfloat16)
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except (KeyError, TypeError):
            return None
    return np.dtype(dtype)


def overflowing_tensors(calibration: CalibrationTable | None) -> dict[str, float]:
    """Calibrated tensors whose range leaves float16's, with the largest magnitude seen."""
    if calibration is None:
        return {}
    peaks = {name: max(abs(float(lo)), abs(float(hi))) for name, (lo, hi) in calibration.ranges.items()}
    return {name: peak for name, peak in peaks.items() if peak > FP16_MAX}


def plan_node(
    node: gs.Node, opset: int, dtypes: dict[str, np.dtype], keep_ops: frozenset[str], overflowing: dict
) -> NodePlan:
    """How `node` computes after conversion; NodePlan() when it touches no float32 tensor."""
    tensors = [t for t in [*node.inputs, *node.outputs] if not t.is_empty()]
    if not any(dtypes.get(t.name, FLOAT32) == FLOAT32 for t in tensors):  # unknown may be float32
        return NodePlan()
    reason = _reason_to_keep(node, keep_ops, overflowing)
    if reason is None:
        try:
            return _plan_from_schema(node, onnx.defs.get_schema(node.op, opset, ""), dtypes)
        except onnx.defs.SchemaError:
            reason = f"no ONNX schema for {node.op} at opset {opset}"
    return NodePlan(kept=reason)


def _reason_to_keep(node: gs.Node, keep_ops: frozenset[str], overflowing: dict[str, float]) -> str | None:
    if not is_standard_domain(node):
        return f"op of domain '{node.domain}'"
    if subgraphs(node):
        return "holds sub-graphs, which stay float32"
    if node.op in keep_ops:
        return "in keep-ops"
    for tensor in [*node.inputs, *node.outputs]:
        if tensor.name in overflowing:
            return f"calibrated range of '{tensor.name}' reaches {overflowing[tensor.name]:g} > {FP16_MAX:g}"
    for tensor in node.inputs:
        peak = _peak(_known_values(tensor))
        if peak > FP16_MAX:
            return f"constant '{tensor.name}' reaches {peak:g} > {FP16_MAX:g}"
    if _peak(_attribute_value(node)) > FP16_MAX:
        return f"its value attribute exceeds {FP16_MAX:g}"
    return None


def _plan_from_schema(node: gs.Node, schema: onnx.defs.OpSchema, dtypes: dict[str, np.dtype]) -> NodePlan:
    # A tensor of unknown type may be float32 bound to a type variable with others, or a sequence
    # whose element type an output follows (SequenceAt): switching the rest could break the node.
    if any(dtypes.get(t.name) is None for t in [*node.inputs, *node.outputs] if not t.is_empty()):
        return NodePlan(kept=f"types of {node.op}'s tensors are unknown (untyped, sequence or optional)")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    groups: dict[str, list[tuple[str, int, gs.Tensor]]] = {}
    for side, tensors, params in (("in", node.inputs, schema.inputs), ("out", node.outputs, schema.outputs)):
        for index, tensor in enumerate(tensors):
            param = _formal_parameter(params, index)
            if tensor.is_empty() or param is None or not param.is_homogeneous:
                continue
            groups.setdefault(param.type_str, []).append((side, index, tensor))
    switched: list[tuple[str, int, gs.Tensor]] = []
    for type_str, members in groups.items():
        if "tensor(float16)" not in allowed.get(type_str, {type_str}):
            continue
        if {dtypes[tensor.name] for _, _, tensor in members} == {FLOAT32}:
            switched += members
    if not switched:
        return NodePlan(kept=f"the {node.op} schema admits float16 for none of its float32 tensors")
    inputs = frozenset(i for side, i, _ in switched if side == "in")
    return NodePlan(inputs, frozenset(i for side, i, _ in switched if side == "out"))


def _formal_parameter(params, index: int):
    if index < len(params):
        return params[index]
    variadic = params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    return params[-1] if variadic else None


def _known_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of an initializer or of a Constant node's output; None when computed."""
    if isinstance(tensor, gs.Constant):
        return constant_value(tensor)
    made_by = producer(tensor)
    if made_by is not None and made_by.op == "Constant" and is_standard_domain(made_by):
        return _attribute_value(made_by)
    return None


def _attribute_value(node: gs.Node) -> np.ndarray | None:
    """The float value a Constant or ConstantOfShape holds in its attributes, if any."""
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        return constant_value(value)
    if node.op == "Constant" and "value_float" in node.attrs:
        return np.array(node.attrs["value_float"], dtype=np.float32)
    if node.op == "Constant" and "value_floats" in node.attrs:
        return np.array(node.attrs["value_floats"], dtype=np.float32)
    return None


def _peak(values: np.ndarray | None) -> float:
    if values is None or values.dtype != FLOAT32 or values.size == 0:
        return 0.0
    return float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0))


# ------------------------------------------------------------------------------- rewriting


class _Rewriter:
    """Applies node plans to the main graph: types, attributes, weights, and the Casts between."""

    def __init__(self, graph: gs.Graph, plans: dict[int, NodePlan], dtypes, keep_io_types: bool):
        self.graph, self.plans, self.dtypes, self.keep_io_types = graph, plans, dtypes, keep_io_types
        self.names = Names(graph)
        self.casts_after: dict[int | None, list[gs.Node]] = {}  # id(anchor node) or None: graph start
        self.holders: dict[tuple[int, np.dtype], gs.Tensor] = {}  # (id(tensor), dtype) -> same value
        self.cast_names: list[str] = []
        self.counts = {"initializers_converted": 0, "constants_converted": 0, "casts_inserted": 0}
        self.io_changed = False

    @property
    def modified(self) -> bool:
        return self.io_changed or any(self.counts.values()) or any(p.converted for p in self.plans.values())

    def wants(self, reader: gs.Node, slot: int) -> np.dtype:
        plan = self.plans.get(id(reader))
        return FLOAT16 if plan is not None and slot in plan.fp16_inputs else FLOAT32

    def plan_constant_nodes(self) -> None:
        """A float32 Constant node holds float16 when every reader wants it so (else readers get a Cast)."""
        for node in self.graph.nodes:
            if node.op != "Constant" or not is_standard_domain(node):
                continue
            output = node.outputs[0]
            values = _attribute_value(node)
            if values is None or values.dtype != FLOAT32 or _peak(values) > FP16_MAX:
                continue
            reads = _reads(output)
            if (
                reads
                and not is_graph_output(output, self.graph)
                and all(self.wants(r, s) == FLOAT16 for r, s in reads)
            ):
                node.attrs.clear()
                node.attrs["value"] = gs.Constant(output.name, values.astype(np.float16))
                self.plans[id(node)] = NodePlan(fp16_outputs=frozenset({0}))
                self.counts["constants_converted"] += 1

    def apply(self) -> None:
        for node in self.graph.nodes:
            plan = self.plans.get(id(node))
            if plan is not None and plan.fp16_outputs and node.op != "Constant":
                _tell_attributes_float16(node)
        self._convert_initializers()
        for tensor in self._float32_variables():
            self._route(tensor)
        self._insert_casts()

    def _float32_variables(self) -> list[gs.Variable]:
        found = [t for t in self.graph.inputs if isinstance(t, gs.Variable)]
        found += [t for node in self.graph.nodes for t in node.outputs if not t.is_empty()]
        unique = {id(t): t for t in found}  # by identity: graphsurgeon tensors compare by name
        return [t for t in unique.values() if self.dtypes.get(t.name) == FLOAT32]

    # -- weights

    def _convert_initializers(self) -> None:
        weights = {
            id(t): t
            for node in self.graph.nodes
            for t in node.inputs
            if isinstance(t, gs.Constant) and self.dtypes.get(t.name) == FLOAT32
        }
        for weight in weights.values():
            reads = _reads(weight)
            half = [(r, s) for r, s in reads if self.wants(r, s) == FLOAT16]
            if not half or _is_interface(weight, self.graph):
                continue
            whole = len(half) == len(reads)
            name = weight.name if whole else self.names.fresh(f"{weight.name}_fp16")
            converted = gs.Constant(name, constant_value(weight).astype(np.float16))
            for reader, slot in half:
                reader.inputs[slot] = converted
            self.counts["initializers_converted"] += 1

    # -- computed tensors

    def _route(self, tensor: gs.Variable) -> None:
        """Give each reader of `tensor` the type it wants, and the graph output the type it must have."""
        made_by = producer(tensor)
        stored = self._stored_type(tensor, made_by)
        reads = _reads(tensor)
        source = tensor
        interface_type = FLOAT32 if self.keep_io_types else FLOAT16
        if made_by is not None and is_graph_output(tensor, self.graph) and stored != interface_type:
            source = self._split_output(tensor, made_by, stored, interface_type)
        elif stored != FLOAT32:
            tensor.dtype = stored
            self.io_changed |= _is_interface(tensor, self.graph)
        self.holders[(id(source), stored)] = source
        for reader, slot in reads:
            reader.inputs[slot] = self._holder(source, self.wants(reader, slot), made_by)

    def _stored_type(self, tensor: gs.Variable, made_by: gs.Node | None) -> np.dtype:
        """The type `tensor` is made in: its producer's plan says, or keep-io-types for a graph input."""
        if made_by is None:
            return FLOAT32 if self.keep_io_types else FLOAT16
        plan = self.plans.get(id(made_by)) or NodePlan()
        return FLOAT16 if _position(made_by.outputs, tensor) in plan.fp16_outputs else FLOAT32

    def _split_output(self, output: gs.Variable, made_by: gs.Node, stored, required) -> gs.Variable:
        """The producer writes a new tensor of type `stored`; a Cast from it writes `output`, name kept."""
        twin = gs.Variable(
            self.names.fresh(f"{output.name}_{_short(stored)}"), dtype=stored, shape=output.shape
        )
        made_by.outputs[_position(made_by.outputs, output)] = twin
        output.dtype = required
        self._add_cast(twin, output, made_by)
        self.holders[(id(twin), required)] = output
        self.io_changed = True
        return twin

    def _holder(self, source: gs.Variable, wanted: np.dtype, made_by: gs.Node | None) -> gs.Tensor:
        """The tensor holding `source`'s value as `wanted`: itself, or a Cast of it made once."""
        key = (id(source), wanted)
        if key not in self.holders:
            name = self.names.fresh(f"{source.name}_{_short(wanted)}")
            self.holders[key] = gs.Variable(name, dtype=wanted, shape=source.shape)
            self._add_cast(source, self.holders[key], made_by)
        return self.holders[key]

    def _add_cast(self, source: gs.Tensor, result: gs.Variable, after: gs.Node | None) -> None:
        node = gs.Node(
            "Cast",
            name=self.names.fresh(f"{result.name}/Cast"),
            attrs={"to": ONNX_TYPE[np.dtype(result.dtype)]},
            inputs=[source],
            outputs=[result],
        )
        self.casts_after.setdefault(id(after) if after is not None else None, []).append(node)
        self.cast_names.append(result.name)
        self.counts["casts_inserted"] += 1

    def _insert_casts(self) -> None:
        """Each Cast right after the node making its input (graph inputs' at the start): order stays valid."""
        nodes = list(self.casts_after.get(None, []))
        for node in self.graph.nodes:
            nodes.append(node)
            nodes += self.casts_after.get(id(node), [])
        self.graph.nodes = nodes


def _reads(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """(reader, input slot) for every read of `tensor`, readers inside sub-graphs included."""
    # A node reading the tensor twice is listed twice among its consumers: each read once here.
    reads = {
        (id(node), slot): (node, slot) for node in consumers(tensor) for slot, t in enumerate(node.inputs)
    }
    return [(node, slot) for node, slot in reads.values() if node.inputs[slot] is tensor]


def _position(tensors: list[gs.Tensor], tensor: gs.Tensor) -> int:
    return next(i for i, t in enumerate(tensors) if t is tensor)


def _is_interface(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is tensor for t in [*graph.inputs, *graph.outputs])


def _tell_attributes_float16(node: gs.Node) -> None:
    """Ops whose output type an attribute names: name float16 (their output was float32)."""
    if node.op in DTYPE_ATTRIBUTES:
        node.attrs[DTYPE_ATTRIBUTES[node.op]] = TensorProto.FLOAT16
    if node.op == "ConstantOfShape":
        value = _attribute_value(node)
        filler = value if value is not None else np.zeros(1, np.float32)  # the op's default: float32 0
        node.attrs["value"] = gs.Constant(f"{node.outputs[0].name}.value", filler.astype(np.float16))


def _short(dtype: np.dtype) -> str:
    return "fp16" if np.dtype(dtype) == FLOAT16 else "fp32"
