"""The weights a pruning pass may prune, each seen as a matrix [output features, reduction].

Every method and pattern works on one view of a weight: rows are the layer's output features
(what a sparse kernel stores as rows, DESIGN.md §5) and columns its reduction dimension (what
an output sums over). N:M groups run along a row; a block `RxC` spans R rows and C columns.

| op | weight layout | matrix view |
|---|---|---|
| MatMul, B constant 2-D | [K, N] | Wᵀ |
| Gemm, transB=0 | [K, N] | Wᵀ |
| Gemm, transB=1 | [N, K] | W |
| Conv | [O, C/g, kh, kw] | [O, C/g·kh·kw], columns in (c, kh, kw) order |
| ConvTranspose | [C, O/g, kh, kw] | [O/g, C·kh·kw] (each group's output features share rows) |

A weight reaches its op as a constant after clean-up (fold-constants turns Transpose, Reshape
and Cast of an initializer into an initializer). One initializer read by several layers is one
target, pruned once: its view is its first reader's, and the other readers are listed so
data-driven methods can add up what each of them sees.

Layers that feed each other are processed in rounds (`layer_rounds`): a layer's round is one more
than the latest round of the listed layers upstream of it, so the layers of one round have no
path between them, and one capture of the model (one ONNX Runtime session) serves them all.
Sequential pruning and the --correct re-fit both work round by round.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.surgery import constant_value, is_standard_domain, node_reads, producer

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass
class PruneTarget:
    """One prunable weight and the layers that read it."""

    weight: gs.Constant
    nodes: list[gs.Node]
    # Position of the target in topological order of its first reader (for skip-first-last and
    # for processing layers front to back).
    order: int = 0
    skipped_readers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def node(self) -> gs.Node:
        """The first reader: its op decides the matrix view."""
        return self.nodes[0]

    @property
    def op(self) -> str:
        return self.node.op

    def matrix(self) -> np.ndarray:
        """A copy of the weight as [rows = output features, cols = reduction], float64-free."""
        return to_matrix(self.node, np.asarray(self.weight.values))

    def set_matrix(self, matrix: np.ndarray) -> None:
        """Write `matrix` (in the view of `matrix()`) back into the weight, in its own layout and dtype."""
        values = from_matrix(self.node, matrix, self.weight.values.shape)
        self.weight.values = values.astype(self.weight.values.dtype, copy=False)

    def layer_input(self, node: gs.Node | None = None) -> gs.Tensor:
        """The activation `node` (the first reader by default) multiplies with the weight."""
        return (node or self.node).inputs[0]


def to_matrix(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """`weight` as `node` uses it, viewed [output features, reduction] (a new array)."""
    if node.op == "Conv":
        return weight.reshape(weight.shape[0], -1).copy()
    if node.op == "ConvTranspose":
        swapped = np.swapaxes(weight, 0, 1)  # [O/g, C, kh, kw]
        return swapped.reshape(swapped.shape[0], -1).copy()
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return weight.copy()
    return weight.T.copy()  # MatMul B and Gemm transB=0: [K, N]


def from_matrix(node: gs.Node, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_matrix`: the matrix back in the weight's own layout `shape`."""
    if node.op == "Conv":
        return matrix.reshape(shape).copy()
    if node.op == "ConvTranspose":
        swapped_shape = (shape[1], shape[0], *shape[2:])
        return np.swapaxes(matrix.reshape(swapped_shape), 0, 1).copy()
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return matrix.copy()
    return matrix.T.copy()


def weight_of(node: gs.Node) -> gs.Constant | None:
    """The constant float weight `node` reads, or None when it has none this module can prune."""
    if not is_standard_domain(node) or node.op not in PRUNABLE_OPS or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    values = constant_value(weight)
    if values is None or values.dtype.type not in FLOAT_TYPES:
        return None
    if node.op == "MatMul" and values.ndim != 2:
        return None  # batched weights have no single output-feature axis
    if node.op == "Gemm" and node.attrs.get("transA", 0) not in (0, 1):
        return None
    if node.op in ("Conv", "ConvTranspose") and values.ndim < 3:
        return None
    return weight


def find_targets(
    graph: gs.Graph,
    exclude: Iterable[str] = (),
    skip_first_last: bool = False,
) -> tuple[list[PruneTarget], list[dict[str, str]]]:
    """The prunable weights of the main graph in topological order, and what was left out and why.

    `exclude` holds fnmatch patterns matched against node names and weight names. With
    `skip_first_last` the first and the last prunable layers in topological order are left
    dense (the input and classifier layers that pruning hurts most).
    """
    graph.toposort()
    patterns = [p for p in exclude if p]
    targets: dict[str, PruneTarget] = {}
    skipped: list[dict[str, str]] = []
    excluded_weights: set[str] = set()
    for order, node in enumerate(graph.nodes):
        if node.op not in PRUNABLE_OPS:
            continue
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue  # activation times activation (attention scores): no weight to prune
        weight = weight_of(node)
        if weight is None:
            reason = "weight is not a float tensor this pass can view as a matrix"
            skipped.append({"name": node.name, "reason": reason})
            continue
        if any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (node.name, weight.name)):
            skipped.append({"name": node.name, "reason": "excluded"})
            excluded_weights.add(weight.name)
            continue
        if weight.name in targets:
            targets[weight.name].nodes.append(node)
        else:
            targets[weight.name] = PruneTarget(weight=weight, nodes=[node], order=order)
    # An excluded node must stay dense, so a weight it shares with other layers stays dense too.
    for name in sorted(excluded_weights & set(targets)):
        for node in targets.pop(name).nodes:
            reason = f"weight '{name}' is shared with an excluded node"
            skipped.append({"name": node.name, "reason": reason})
    ordered = sorted(targets.values(), key=lambda t: t.order)
    if skip_first_last and ordered:
        ends = {ordered[0].name, ordered[-1].name}
        for target in ordered:
            if target.name in ends:
                reason = "first or last layer (--skip-first-last)"
                skipped.append({"name": target.node.name, "reason": reason})
        ordered = [t for t in ordered if t.name not in ends]
    return ordered, skipped


def layer_rounds(graph: gs.Graph, nodes: list[gs.Node]) -> list[int]:
    """The round of each of `nodes` (in a topologically sorted `graph`): 0 when none of `nodes` is
    upstream of it, else one more than the latest round upstream. Nodes of one round have no
    path between them, so one capture of the graph serves them all."""
    wanted = {id(node): index for index, node in enumerate(nodes)}
    latest: dict[int, int] = {}  # node -> latest round of `nodes` at or upstream of it (-1: none)
    rounds = [0] * len(nodes)
    for node in graph.nodes:
        writers = (producer(tensor) for tensor in node_reads(node))
        upstream = max((latest.get(id(w), -1) for w in writers if w is not None), default=-1)
        if id(node) in wanted:
            upstream += 1
            rounds[wanted[id(node)]] = upstream
        latest[id(node)] = upstream
    return rounds


def target_rounds(graph: gs.Graph, targets: list[PruneTarget]) -> list[int]:
    """`layer_rounds` of each target: the latest round of its readers, so that every reader's
    upstream layers come first. A weight read both upstream and downstream of another target is
    the rare exception: that other target may come in the same or an earlier round (its
    statistics then see this weight dense)."""
    readers = [node for target in targets for node in target.nodes]
    by_reader = iter(layer_rounds(graph, readers))
    return [max(next(by_reader) for _ in target.nodes) for target in targets]
