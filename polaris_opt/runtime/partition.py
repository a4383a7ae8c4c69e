"""Split a model into the steps the runtime shim executes: ONNX Runtime sub-models and ai.polaris nodes.

ONNX Runtime's Python API cannot host an execution provider (DESIGN.md §6), so a model that
mixes standard and ai.polaris nodes is cut into a list of steps, once, when a Session opens:

- a maximal run of standard nodes becomes one ONNX Runtime sub-model whose inputs are the
  tensors the run reads from outside itself and whose outputs are the tensors read later (or
  graph outputs); the initializers it uses are copied in;
- each ai.polaris node becomes a step of its own, run by a kernel launcher or its NumPy reference.

The node order is a topological sort that keeps going with nodes of the same kind while it can,
so independent standard branches share one sub-model instead of adding boundaries.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from polaris_opt.errors import BadInput
from polaris_opt.proto import attr_graphs, proto_graphs

POLARIS_DOMAIN = "ai.polaris"  # polaris_opt.ops.DOMAIN; spelled here so partitioning needs no schemas


@dataclass(frozen=True)
class OrtStep:
    """A maximal run of standard nodes, as a self-contained model for one ONNX Runtime session."""

    model: onnx.ModelProto
    inputs: tuple[str, ...]  # tensors it reads from feeds, constants or earlier steps
    outputs: tuple[str, ...]  # tensors later steps or the caller read
    node_count: int


@dataclass(frozen=True)
class PolarisStep:
    """One ai.polaris node; `inputs` keeps "" for an absent optional input, as ONNX does."""

    node: onnx.NodeProto
    inputs: tuple[str, ...]
    output: str

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output,)

    @property
    def label(self) -> str:
        return self.node.name or f"{self.node.op_type}->{self.output}"


Step = OrtStep | PolarisStep


@dataclass(frozen=True)
class Plan:
    """What a Session runs: `steps` in order, over `constants` (initializers and Constant values)."""

    steps: tuple[Step, ...]
    constants: dict[str, np.ndarray]
    graph_inputs: tuple[str, ...]  # the feeds the caller gives (initializers excluded)
    graph_outputs: tuple[str, ...]


def is_polaris(node: onnx.NodeProto) -> bool:
    return node.domain == POLARIS_DOMAIN


def has_polaris_nodes(model: onnx.ModelProto) -> bool:
    return any(is_polaris(node) for graph in proto_graphs(model.graph) for node in graph.node)


def partition(model: onnx.ModelProto) -> Plan:
    """Cut the main graph of `model` into steps (see the module docstring)."""
    graph = model.graph
    _refuse_nested_polaris(graph)
    weights = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    graph_inputs = tuple(i.name for i in graph.input if i.name not in weights)
    graph_outputs = tuple(o.name for o in graph.output)
    runs = _runs(_ordered(list(graph.node), available=set(graph_inputs) | weights))
    declared = _Declared(model)
    # Only what a polaris node or the caller reads: ORT sub-models hold their own weights.
    polaris_reads = {name for node in graph.node if is_polaris(node) for name in node.input if name}
    constants = _constants(graph, polaris_reads | set(graph_outputs))
    steps: list[Step] = []
    for run, read_later in zip(runs, _read_after_each(runs, graph_outputs, set(constants)), strict=True):
        if is_polaris(run[0]):
            steps += [_polaris_step(node) for node in run]
            continue
        step = _ort_step(model, run, read_later, declared)
        if step.outputs:  # a run whose results nobody reads is dead code: skip it
            steps.append(step)
    return Plan(tuple(steps), constants, graph_inputs, graph_outputs)


def _read_after_each(
    runs: list[list[onnx.NodeProto]], graph_outputs: tuple[str, ...], constants: set[str]
) -> list[set[str]]:
    """For each run, the tensors that later runs or the caller read (suffix unions, built backwards).

    A polaris node takes its weights from the plan's constants, so an ONNX Runtime step never
    has to hand them over (a Constant node that only feeds polaris nodes is dead code there).
    """
    after: list[set[str]] = []
    later = set(graph_outputs)
    for run in reversed(runs):
        after.append(set(later))
        for node in run:
            later |= reads(node) - constants if is_polaris(node) else reads(node)
    return after[::-1]


# ----------------------------------------------------------------------------------- ordering


def reads(node: onnx.NodeProto) -> set[str]:
    """Tensors `node` reads: its inputs and what its sub-graphs take from the enclosing scope."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in attr_graphs(attr):
            names |= _outer_reads(sub)
    return names


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {out for node in graph.node for out in node.output}
    return {name for node in graph.node for name in reads(node)} - defined


def _ordered(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """A topological order that switches between standard and polaris nodes as rarely as it can.

    Kahn's algorithm with one ready-queue per kind: keep taking nodes of the kind taken last
    (first in file order), switch only when none is ready. Greedy, but it merges independent
    branches into one run.
    """
    producer = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for index, node in enumerate(nodes):
        for name in sorted(reads(node)):
            if name in producer:
                users[producer[name]].append(index)
                pending[index] += 1
            elif name not in available:
                raise BadInput(f"node '{node.name or node.op_type}' reads '{name}', which nothing produces")
    ready: dict[bool, list[int]] = {False: [], True: []}
    for index, count in enumerate(pending):
        if count == 0:
            heapq.heappush(ready[is_polaris(nodes[index])], index)
    order: list[onnx.NodeProto] = []
    kind = False
    while ready[False] or ready[True]:
        kind = kind if ready[kind] else not kind
        index = heapq.heappop(ready[kind])
        order.append(nodes[index])
        for user in users[index]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready[is_polaris(nodes[user])], user)
    if len(order) < len(nodes):
        raise BadInput("the graph has a cycle: its nodes cannot be put in an order that runs")
    return order


def _runs(order: list[onnx.NodeProto]) -> list[list[onnx.NodeProto]]:
    """Consecutive nodes of the same kind (standard or polaris), grouped."""
    runs: list[list[onnx.NodeProto]] = []
    for node in order:
        if runs and is_polaris(runs[-1][0]) == is_polaris(node):
            runs[-1].append(node)
        else:
            runs.append([node])
    return runs


# ------------------------------------------------------------------------------------ steps


def _polaris_step(node: onnx.NodeProto) -> PolarisStep:
    label = node.name or node.op_type
    if len(node.output) != 1 or not node.output[0]:
        raise BadInput(f"ai.polaris node '{label}' must have exactly one output, has {len(node.output)}")
    if not node.input or not node.input[0]:
        raise BadInput(f"ai.polaris node '{label}' has no input X")
    return PolarisStep(node=node, inputs=tuple(node.input), output=node.output[0])


class _Declared:
    """What the model says about its tensors: value infos by name, and element types.

    Types come from declarations or shape inference; the schemas of the ai.polaris ops may not
    be registered, so inference could stop at such a node: every op of the set outputs float32
    (docs/OPS.md), which is declared before inferring.
    """

    def __init__(self, model: onnx.ModelProto):
        annotated = onnx.ModelProto()
        annotated.CopyFrom(model)
        polaris_outputs = [out for node in annotated.graph.node if is_polaris(node) for out in node.output]
        annotated.graph.value_info.extend(
            onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None) for out in polaris_outputs
        )
        try:
            inferred = onnx.shape_inference.infer_shapes(annotated).graph
        except Exception:  # noqa: BLE001 - an uninferable model still has its declared types
            inferred = annotated.graph
        graph = model.graph
        self.value_infos = {
            vi.name: vi
            for vi in (*graph.output, *graph.value_info, *graph.input)
            if vi.type.tensor_type.elem_type
        }
        known = (*inferred.input, *inferred.value_info, *inferred.output)
        self.types = {vi.name: vi.type.tensor_type.elem_type for vi in known if vi.type.tensor_type.elem_type}

    def input_info(self, name: str) -> onnx.ValueInfoProto:
        """A sub-model input: as declared, else with its element type and an unknown shape."""
        if name in self.value_infos:
            return self.value_infos[name]
        if name not in self.types:
            raise BadInput(f"tensor '{name}' crosses a partition boundary but its type is unknown")
        return onnx.helper.make_tensor_value_info(name, self.types[name], None)

    def output_info(self, name: str) -> onnx.ValueInfoProto:
        # ONNX Runtime infers an output's type itself; a bare name is enough.
        return self.value_infos.get(name) or onnx.ValueInfoProto(name=name)


def _ort_step(
    model: onnx.ModelProto, run: list[onnx.NodeProto], read_later: set[str], declared: _Declared
) -> OrtStep:
    graph = model.graph
    produced = list(dict.fromkeys(out for node in run for out in node.output if out))
    read = list(dict.fromkeys(name for node in run for name in _ordered_reads(node)))
    outside = [name for name in read if name not in set(produced)]
    wanted = set(outside)
    initializers = [t for t in graph.initializer if t.name in wanted]
    sparse = [t for t in graph.sparse_initializer if t.values.name in wanted]
    weights = {t.name for t in initializers} | {t.values.name for t in sparse}
    inputs = [name for name in outside if name not in weights]
    outputs = [name for name in produced if name in read_later]
    sub = onnx.helper.make_graph(
        nodes=run,
        name=f"{graph.name or 'graph'}_segment",
        inputs=[declared.input_info(name) for name in inputs],
        outputs=[declared.output_info(name) for name in outputs],
        initializer=initializers,
        sparse_initializer=sparse,
        value_info=[
            declared.value_infos[n] for n in produced if n in declared.value_infos and n not in outputs
        ],
    )
    sub_model = onnx.helper.make_model(
        sub,
        opset_imports=[o for o in model.opset_import if o.domain != POLARIS_DOMAIN],
        ir_version=model.ir_version,
        functions=list(model.functions),
    )
    return OrtStep(model=sub_model, inputs=tuple(inputs), outputs=tuple(outputs), node_count=len(run))


def _ordered_reads(node: onnx.NodeProto) -> list[str]:
    """`reads(node)` in a stable order: inputs as listed, then outer-scope names sorted."""
    listed = [name for name in node.input if name]
    return listed + sorted(reads(node) - set(listed))


# -------------------------------------------------------------------------------- constants


def _constants(graph: onnx.GraphProto, wanted: set[str]) -> dict[str, np.ndarray]:
    """The `wanted` values known before any run: initializers and Constant nodes holding a tensor.

    ai.polaris nodes take their weights from here, so a weight stored as a Constant node works
    as well as one stored as an initializer.
    """
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in wanted}
    for sparse in graph.sparse_initializer:
        if sparse.values.name in wanted:
            values[sparse.values.name] = _densify(sparse)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] in wanted:
            value = _constant_attribute(node.attribute)
            if value is not None:
                values[node.output[0]] = value
    return values


def _densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse initializer as a dense array; indices are linear [nnz] or coordinates [nnz, rank]."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dense.shape)
    dense.reshape(-1)[indices] = values
    return dense


def _constant_attribute(attributes: Iterable[onnx.AttributeProto]) -> np.ndarray | None:
    for attr in attributes:
        if attr.name == "value" and attr.HasField("t"):
            return numpy_helper.to_array(attr.t)
    return None


def _refuse_nested_polaris(graph: onnx.GraphProto) -> None:
    for sub in list(proto_graphs(graph))[1:]:
        nested = next((node for node in sub.node if is_polaris(node)), None)
        if nested is not None:
            raise BadInput(
                f"ai.polaris node '{nested.name or nested.op_type}' is inside an If/Loop/Scan body, "
                "which the runtime cannot split; run `polaris-opt lower` on the model first"
            )
