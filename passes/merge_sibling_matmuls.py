"""merge-sibling-matmuls: MatMuls that read one input with constant weights become one MatMul, then Split.

    Y_i = X · W_i [→ Add(b_i)]   for i = 1..n, each W_i a constant [K, N_i] of one float type
        ⇒  Y = X · [W_1 | … | W_n] [→ Add([b_1 | … | b_n])],  Y_1, …, Y_n = Split(Y, [N_1, …, N_n], axis -1)

The attention projections Q, K and V of a transformer read one normalised input. One wider
MatMul is one GEMM on ONNX Runtime instead of n, and after `sparsify` one SparseMatMul: one
kernel launch and one transfer each way instead of n (benchmarks/bench_end_to_end.py). Run it
after pruning: per-layer pruning would otherwise see the merged weight as one layer.

A bias Add merges too when every sibling has one: a constant 1-D bias of N_i values of the
weight's type, the Add the MatMul's only reader (so `sparsify` can fuse the merged Add). Split
writes the tensors the siblings wrote (the Adds' when they merged), so every name another node
or the caller reads stays.

A MatMul that reads a shared input stays as it is, with its reason in `details["skipped"]`, when
- its weight is not a constant, or not a 2-D float array;
- it reads the shared input as its second operand (X used transposed: Wᵀ·Xᵀ-style products);
- no other sibling has the same reduction size K and weight type (those are grouped apart);
- it or its weight matches an `exclude` pattern, or its weight has fewer zeros than
  `min-sparsity` (so `sparsify` rewrites the merged layer exactly when it rewrote each one).
"""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    is_graph_output,
    is_standard_domain,
    iter_graphs,
)

SPLIT_INPUT_OPSET = 13  # Split takes its sizes as an input from opset 13, as an attribute before


@dataclass(frozen=True)
class Sibling:
    """One MatMul of a group: its node, its weight, and the Add of its bias when it has one."""

    node: gs.Node
    weight: np.ndarray
    bias_add: gs.Node | None
    bias: np.ndarray | None


@dataclass(frozen=True)
class MergeSiblingMatMuls(Pass):
    """MatMuls reading one input with constant weights  ⇒  one MatMul of the weights side by side, Split."""

    name: ClassVar[str] = "merge-sibling-matmuls"

    min_sparsity: float = field(
        default=0.0,
        metadata={"help": "merge only weights with at least this share of zeros, in [0, 1] (0: any weight)"},
    )
    exclude: str = field(
        default="", metadata={"help": "node or weight names (fnmatch patterns) to leave alone, ';'-separated"}
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not 0 <= self.min_sparsity <= 1:
            raise BadInput(f"merge-sibling-matmuls: min-sparsity {self.min_sparsity} is outside [0, 1]")
        names = Names(graph)
        merged, skipped = [], []
        for g in list(iter_graphs(graph)):
            for tensor in list(g.tensors().values()):
                groups, reasons = self.sibling_groups(tensor, g)
                skipped += reasons
                merged += [merge(group, tensor, g, graph.opset, names) for group in groups]
        stats = {"merged": sum(len(row["nodes"]) for row in merged), "into": len(merged)}
        return PassResult(modified=bool(merged), stats=stats, details={"groups": merged, "skipped": skipped})

    def sibling_groups(self, tensor: gs.Tensor, graph: gs.Graph) -> tuple[list[list[Sibling]], list[dict]]:
        """The groups of two or more MatMuls of `graph` that read `tensor` and can merge, and the
        readers left alone with their reasons."""
        readers = [n for n in consumers(tensor) if n.op == "MatMul" and is_standard_domain(n)]
        readers = [n for n in readers if any(n is m for m in graph.nodes)]  # not a sub-graph's
        if len(readers) < 2:
            return [], []
        by_shape: dict[tuple, list[Sibling]] = defaultdict(list)
        skipped = []
        for node in readers:
            sibling, reason = self.as_sibling(node, tensor, graph)
            if sibling is None:
                skipped.append({"name": node.name, "reason": reason})
            else:
                by_shape[(sibling.weight.shape[0], sibling.weight.dtype.str)].append(sibling)
        groups = []
        for group in by_shape.values():
            if len(group) > 1:
                groups.append(_with_common_bias(group))
            else:
                reason = "no other MatMul of this input has its reduction size and weight type"
                skipped.append({"name": group[0].node.name, "reason": reason})
        return groups, skipped

    def as_sibling(self, node: gs.Node, tensor: gs.Tensor, graph: gs.Graph) -> tuple[Sibling | None, str]:
        """`node` as a group member, or None and why it cannot be one."""
        if node.inputs[0] is not tensor or node.inputs[1] is tensor:
            return None, "reads the shared input as its second operand"
        weight = constant_value(node.inputs[1])
        if weight is None:
            return None, "its weight is not a constant"
        if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
            return None, f"its weight is {weight.dtype} {list(weight.shape)}, not a 2-D float matrix"
        if any(
            fnmatch.fnmatchcase(name, p) for name in (node.name, node.inputs[1].name) for p in self.patterns()
        ):
            return None, "excluded"
        if weight.size and np.count_nonzero(weight == 0) / weight.size < self.min_sparsity:
            return None, f"its weight has fewer than {self.min_sparsity:.0%} zeros"
        add, bias = bias_after(node, graph, weight)
        return Sibling(node, weight, add, bias), ""

    def patterns(self) -> list[str]:
        return [p for p in self.exclude.split(";") if p]


def bias_after(
    node: gs.Node, graph: gs.Graph, weight: np.ndarray
) -> tuple[gs.Node | None, np.ndarray | None]:
    """The Add of a constant bias [N] that is the only reader of `node`'s output, and the bias."""
    result = node.outputs[0]
    readers = consumers(result)
    if len(readers) != 1 or is_graph_output(result, graph):
        return None, None
    add = readers[0]
    if add.op != "Add" or not is_standard_domain(add) or not any(add is n for n in graph.nodes):
        return None, None
    others = [t for t in add.inputs if t is not result]
    if len(others) != 1:  # Add(y, y)
        return None, None
    bias = constant_value(others[0])
    if bias is None or bias.shape != (weight.shape[1],) or bias.dtype != weight.dtype:
        return None, None
    return add, bias


def _with_common_bias(group: list[Sibling]) -> list[Sibling]:
    """The group as it is when every member has a bias; else its members without biases (the
    Adds then stay after the Split)."""
    if all(member.bias is not None for member in group):
        return group
    return [Sibling(member.node, member.weight, None, None) for member in group]


def merge(group: list[Sibling], x: gs.Tensor, graph: gs.Graph, opset: int, names: Names) -> dict:
    """Replace `group` by MatMul(x, concatenated weights) [→ Add] → Split in `graph`; its report row."""
    nodes = [member.node for member in group]
    label = joined_name([n.name for n in nodes], "/") or "MergedMatMul"
    weight_name = joined_name([n.inputs[1].name for n in nodes], ".")
    weight = gs.Constant(
        names.fresh(weight_name or f"{label}.weight"), np.concatenate([m.weight for m in group], 1)
    )
    widths = [member.weight.shape[1] for member in group]
    product = gs.Variable(names.fresh(f"{label}_output"), dtype=weight.values.dtype)
    new_nodes = [gs.Node("MatMul", names.fresh(label), inputs=[x, weight], outputs=[product])]
    has_bias = group[0].bias_add is not None
    if has_bias:
        bias_name = joined_name([_bias_tensor(m).name for m in group], ".") or f"{label}.bias"
        bias = gs.Constant(names.fresh(bias_name), np.concatenate([m.bias for m in group]))
        summed = gs.Variable(names.fresh(f"{label}_biased"), dtype=weight.values.dtype)
        new_nodes.append(
            gs.Node("Add", names.fresh(f"{label}_bias"), inputs=[product, bias], outputs=[summed])
        )
        product = summed
    results = [(m.bias_add if has_bias else m.node).outputs[0] for m in group]
    new_nodes.append(split_node(product, results, widths, opset, names.fresh(f"{label}_split"), names))
    first = min(_index(graph, n) for n in nodes)
    doomed = nodes + ([m.bias_add for m in group] if has_bias else [])
    for node in doomed:
        node.inputs.clear()
        node.outputs.clear()
    kept = [n for n in graph.nodes if not any(n is d for d in doomed)]
    before = sum(1 for n in graph.nodes[:first] if not any(n is d for d in doomed))
    graph.nodes = kept[:before] + new_nodes + kept[before:]
    return {"name": new_nodes[0].name, "nodes": [n.name for n in nodes], "widths": widths, "bias": has_bias}


def split_node(
    source: gs.Tensor, results: list[gs.Tensor], widths: list[int], opset: int, name: str, names: Names
):
    """Split(source) along the last axis into `results` of `widths` (sizes as an input from opset 13)."""
    if opset >= SPLIT_INPUT_OPSET:
        sizes = gs.Constant(names.fresh(f"{name}.sizes"), np.array(widths, dtype=np.int64))
        return gs.Node("Split", name, attrs={"axis": -1}, inputs=[source, sizes], outputs=results)
    return gs.Node("Split", name, attrs={"axis": -1, "split": widths}, inputs=[source], outputs=results)


def joined_name(names: list[str], separator: str) -> str:
    """One name for several: their common head and tail around the parts that differ,
    "/a/q_proj/MatMul" and "/a/k_proj/MatMul" → "/a/q_proj+k_proj/MatMul"; "" when a name is empty."""
    if not all(names):
        return ""
    head = os.path.commonprefix(names)
    head = head[: head.rfind(separator) + 1]
    rests = [name[len(head) :] for name in names]
    tail = os.path.commonprefix([rest[::-1] for rest in rests])[::-1]
    tail = tail[tail.find(separator) :] if separator in tail else ""
    return head + "+".join(rest[: len(rest) - len(tail)] for rest in rests) + tail


def _bias_tensor(member: Sibling) -> gs.Tensor:
    return next(t for t in member.bias_add.inputs if t is not member.node.outputs[0])


def _index(graph: gs.Graph, node: gs.Node) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n is node)
