"""eliminate-dead-code: nodes whose results reach no graph output go, and so do their weights.

Liveness walks back from each graph's outputs. A node holding sub-graphs (If, Loop, Scan)
also reads whatever those sub-graphs take from the enclosing scope by name, so those tensors'
producers stay alive although the node does not list them as inputs. Sub-graphs are cleaned
first, which can free outer tensors only they read. Graph inputs are never removed: they are
the model's interface, and a Loop/Scan body's inputs are fixed by the node that runs it.

Nodes of domains other than the default one are kept even when dead: we cannot know that a
custom op is free of side effects (a debug dump, a stateful kernel), so it is a root.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.surgery import is_standard_domain, iter_graphs, node_reads, producer, remove_nodes, subgraphs


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Nodes and initializers that no graph output depends on  ⇒  removed (sub-graphs too)."""

    name: ClassVar[str] = "eliminate-dead-code"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        weights_before = initializers(graph)
        nodes_removed = sweep(graph)
        initializers_removed = len(weights_before.keys() - initializers(graph).keys())
        stats = {"nodes_removed": nodes_removed, "initializers_removed": initializers_removed}
        return PassResult(modified=nodes_removed > 0, stats=stats)


def sweep(graph: gs.Graph) -> int:
    """Remove the dead nodes of `graph` and of its sub-graphs; returns how many went."""
    removed = sum(sweep(sub) for node in graph.nodes for sub in subgraphs(node))
    live = live_nodes(graph)
    return removed + remove_nodes(graph, [node for node in graph.nodes if id(node) not in live])


def live_nodes(graph: gs.Graph) -> set[int]:
    """Ids of the nodes of `graph` that a graph output or a kept (foreign-domain) node needs."""
    local = {id(node) for node in graph.nodes}
    live: set[int] = set()
    pending = [node for node in graph.nodes if not is_standard_domain(node)]
    pending += [producer(t) for t in graph.outputs if producer(t) is not None]
    while pending:
        node = pending.pop()
        if id(node) in live or id(node) not in local:
            continue
        live.add(id(node))
        pending += [producer(t) for t in node_reads(node) if producer(t) is not None]
    return live


def initializers(graph: gs.Graph) -> dict[int, gs.Constant]:
    """Every initializer read anywhere in `graph` or its sub-graphs, by identity."""
    return {
        id(tensor): tensor
        for g in iter_graphs(graph)
        for tensor in g.tensors().values()
        if isinstance(tensor, gs.Constant)
    }
