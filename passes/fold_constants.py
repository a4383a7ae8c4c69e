"""fold-constants: what can be computed ahead of time becomes an initializer (DESIGN.md §3).

A node folds when every input is constant (an initializer, or the output of a node folded
before it) and it is a deterministic standard op without sub-graphs. All such nodes of a graph
are evaluated together in one ONNX Runtime session. `Shape`, `Size`, and `Gather`/`Slice` of a
shape fold from statically known dims only: a dynamic dim (a batch size) stays dynamic, and
nothing shape-based folds inside Loop/Scan bodies. Sub-graphs fold too; tensors they take
from the outer scope count only when constant there. No result above `max-size-mb` is stored.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from polaris_opt.graph_io import max_ir_version_for_ort
from polaris_opt.numerics import make_session
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.shape_info import TensorInfo, infer_tensor_info
from polaris_opt.surgery import constant_value, is_standard_domain, iter_graphs, remove_nodes, subgraphs

# Each run would give another value: folding them would freeze one draw into the model.
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
# Folding DequantizeLinear(int8 weight) would undo quantization and store the weight at 4x size.
QUANTIZATION = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Folding can expose new static shapes (a Reshape whose shape became constant), which can expose
# more folding; a chain of that depth is already unusual.
MAX_ROUNDS = 8


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Nodes whose inputs are all constant  ⇒  initializers holding their outputs."""

    name: ClassVar[str] = "fold-constants"
    max_size_mb: float = field(
        default=64.0, metadata={"help": "largest folded tensor in MB; larger stay computed"}
    )
    fold_shapes: bool = field(default=True, metadata={"help": "fold Shape/Size/Gather/Slice of static dims"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folder = Folder(graph, int(self.max_size_mb * 2**20), ctx.log)
        totals: Counter[str] = Counter()
        for _ in range(MAX_ROUNDS):
            done = folder.fold_round(self.fold_shapes)
            totals += done
            if not done:
                break
        stats = {"folded": totals["folded"], "shapes_folded": totals["shapes_folded"]}
        stats["too_large"] = len(folder.too_large)
        return PassResult(modified=bool(totals["folded"] or totals["shapes_folded"]), stats=stats)


def can_fold(node: gs.Node) -> bool:
    """Standard, deterministic, no sub-graph: ORT can evaluate it alone and the result is final."""
    if not is_standard_domain(node) or node.op in NONDETERMINISTIC or node.op in QUANTIZATION:
        return False
    # Dropout with a training_mode input may draw a random mask.
    if node.op == "Dropout" and len(node.inputs) > 2:
        return False
    return bool(node.outputs) and not any(True for _ in node.subgraphs())


@dataclass
class Folder:
    """One run's working state: the root graph, the size limit, and nodes that would not fold."""

    root: gs.Graph
    limit_bytes: int
    log: logging.Logger
    # Ids of nodes that stay although their inputs are constant, so later rounds skip them:
    # a result over the size limit, or one that is no storable tensor (a sequence, strings).
    too_large: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)

    def fold_round(self, fold_shapes: bool) -> Counter[str]:
        infos = infer_tensor_info(self.root)
        in_loops = loop_scoped(self.root)
        done: Counter[str] = Counter()
        # Outer graphs first: what folds there becomes a constant their sub-graphs can use.
        for graph in iter_graphs(self.root):
            if fold_shapes and id(graph) not in in_loops:
                done["shapes_folded"] += fold_shape_nodes(graph, infos)
            plan = self.plan(graph, infos)
            if plan:
                done["folded"] += self.apply(graph, plan, self.evaluate(plan))
        return +done

    def plan(self, graph: gs.Graph, infos: dict[str, TensorInfo]) -> list[gs.Node]:
        """Foldable nodes in evaluation order: each needs only constants and earlier results."""
        pending = [n for n in graph.nodes if can_fold(n) and id(n) not in self.refused]
        # A result known in advance to exceed the limit is not even computed (a 10 GB Expand).
        self.too_large.update(id(n) for n in pending if _known_bytes(n, infos) > self.limit_bytes)
        pending = [n for n in pending if id(n) not in self.too_large]
        planned: list[gs.Node] = []
        produced: set[str] = set()
        # Repeat sweeps so a graph that is not topologically sorted still folds completely.
        while ready := [n for n in pending if _ready(n, produced)]:
            for node in ready:
                planned.append(node)
                produced.update(t.name for t in node.outputs)
            taken = {id(n) for n in ready}  # by identity: gs nodes compare equal by content
            pending = [n for n in pending if id(n) not in taken]
        return planned

    def evaluate(self, plan: list[gs.Node]) -> dict[str, object]:
        """Every output of `plan`, from one ORT session, or node by node when that one fails."""
        try:
            return self._run(plan, {})
        except Exception as exc:  # noqa: BLE001 - ORT's error types are not public API
            self.log.debug("fold-constants: batch evaluation failed (%s); trying node by node", exc)
        return self._evaluate_each(plan)

    def _evaluate_each(self, plan: list[gs.Node]) -> dict[str, object]:
        # One node ORT cannot run (an op it lacks, a bad index) must not keep the others.
        values: dict[str, object] = {}
        for node in plan:
            if _ready(node, set(values)):
                try:
                    values.update(self._run([node], values))
                except Exception as exc:  # noqa: BLE001 - the node just stays unfolded
                    self.log.debug("fold-constants: cannot evaluate %s (%s): %s", node.name, node.op, exc)
        return values

    def _run(self, nodes: list[gs.Node], values: dict[str, object]) -> dict[str, object]:
        model = self._batch_model(nodes, values)
        names = [output.name for output in model.graph.output]
        results = make_session(model, optimize=False).run(names, {})
        return dict(zip(names, results, strict=True))

    def _batch_model(self, nodes: list[gs.Node], values: dict[str, object]) -> onnx.ModelProto:
        """A model of `nodes` alone: their constant inputs as initializers, every output returned."""
        outputs = [t.name for node in nodes for t in node.outputs if not t.is_empty()]
        produced = set(outputs)
        feeds = {t.name: t for node in nodes for t in node.inputs if not (t.is_empty() or t.name in produced)}
        # ORT infers the output types itself; the folded nodes' declared ones may be absent.
        graph = helper.make_graph(
            [OnnxExporter.export_node(node) for node in nodes],
            "fold",
            [],
            [onnx.ValueInfoProto(name=n) for n in outputs],
        )
        opset = helper.make_opsetid("", self.root.opset)
        model = helper.make_model(graph, opset_imports=[opset], ir_version=max_ir_version_for_ort())
        # Added last: make_graph and make_model would each copy the weights once more.
        model.graph.initializer.extend(
            numpy_helper.from_array(values[name] if name in values else constant_value(t), name)
            for name, t in feeds.items()
        )
        return model

    def apply(self, graph: gs.Graph, plan: list[gs.Node], values: dict[str, object]) -> int:
        """Outputs become constants (same names, so consumers and graph outputs stay wired)."""
        folded = []
        for node in plan:
            outputs = [t for t in node.outputs if not t.is_empty()]
            results = [values.get(t.name) for t in outputs]
            if not all(_storable(r) for r in results):
                self.refused.add(id(node))
            elif any(r.nbytes > self.limit_bytes for r in results):
                self.too_large.add(id(node))
            else:
                for tensor, result in zip(outputs, results, strict=True):
                    tensor.to_constant(result)
                folded.append(node)
        return remove_nodes(graph, folded)


def _ready(node: gs.Node, computed: set[str]) -> bool:
    return all(t.is_empty() or t.name in computed or constant_value(t) is not None for t in node.inputs)


def _known_bytes(node: gs.Node, infos: dict[str, TensorInfo]) -> int:
    """The size of the largest output as shape inference knows it; 0 when unknown."""
    return max((infos[t.name].nbytes or 0 for t in node.outputs if t.name in infos), default=0)


def _storable(value: object) -> bool:
    # Sequences and strings stay computed at run time; only numeric tensors become initializers.
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


# ------------------------------------------------------------------------------------ shapes


def loop_scoped(graph: gs.Graph, inside: bool = False) -> set[int]:
    """Ids of the graphs a Loop or Scan runs, nested ones included.

    A loop-carried tensor may change shape from one iteration to the next, so a shape that
    inference states there (from the first iteration's) is not a fact to fold.
    """
    found = {id(graph)} if inside else set()
    for node in graph.nodes:
        for sub in subgraphs(node):
            found |= loop_scoped(sub, inside or node.op in ("Loop", "Scan"))
    return found


def fold_shape_nodes(graph: gs.Graph, infos: dict[str, TensorInfo]) -> int:
    """Shape/Size of static dims, and Gather/Slice picking static dims of a shape  ⇒  constants."""
    # Shape outputs that are not constant as a whole: the dims each holds, None where dynamic.
    vectors: dict[str, list[int | None]] = {}
    folded = []
    for node in graph.nodes:
        value = _shape_value(node, infos, vectors) if is_standard_domain(node) else None
        if value is not None:
            node.outputs[0].to_constant(value)
            folded.append(node)
    return remove_nodes(graph, folded)


def _shape_value(node: gs.Node, infos, vectors) -> np.ndarray | None:
    source = node.inputs[0] if node.inputs else None
    if source is None or isinstance(source, gs.Constant):
        return None  # a constant input folds by evaluation
    if node.op in ("Shape", "Size") and source.name in infos:
        dims = list(infos[source.name].dims)
        if node.op == "Size":
            return np.array(np.prod(dims), np.int64) if None not in dims else None
        vectors[node.outputs[0].name] = dims = dims[node.attrs.get("start", 0) : node.attrs.get("end")]
        return _static(dims)
    if node.op in ("Gather", "Slice") and source.name in vectors:
        picked = _pick(node, vectors[source.name])
        return _static(picked) if picked is not None else None
    return None


def _static(dims: list[int | None] | np.ndarray) -> np.ndarray | None:
    values = np.asarray(dims, dtype=object)
    return values.astype(np.int64) if not any(v is None for v in values.flat) else None


def _pick(node: gs.Node, dims: list[int | None]) -> np.ndarray | list | None:
    """The dims a Gather or Slice with constant indices takes from a shape; None if not constant."""
    args = [constant_value(t) for t in node.inputs[1:]]
    if any(a is None for a in args) or node.attrs.get("axis", 0) not in (0, -1):
        return None
    if node.op == "Gather":
        indices = args[0]
        in_range = np.all((indices >= -len(dims)) & (indices < len(dims)))
        return np.asarray(dims, dtype=object)[indices] if in_range else None
    starts, ends, axes, steps = (*args, None, None)[:4]
    if (axes is not None and list(axes) not in ([0], [-1])) or (steps is not None and 0 in steps):
        return None
    # Python's slice clamps starts and ends exactly as ONNX Slice does.
    return dims[slice(int(starts[0]), int(ends[0]), int(steps[0]) if steps is not None else 1)]
