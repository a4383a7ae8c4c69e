"""Graph-surgery idioms on onnx-graphsurgeon graphs, written once and shared by every pass.

Facts about graphsurgeon these helpers rely on (and which a pass would otherwise rediscover):

- A sub-graph (If branch, Loop/Scan body) is a `gs.Graph` in a node attribute. Its nodes may
  read tensors of an enclosing graph by name; those readers hold the *same* tensor object as
  the outer graph, and appear in that tensor's `outputs`, although the If/Loop node itself
  does not list the tensor among its inputs.
- Initializers are the `gs.Constant`s that a graph's nodes read; there is no separate list.
- `SynchronizedList.remove` and `list.remove` compare nodes with `==`, which compares names,
  ops and attributes; two distinct nodes can be equal, so node lists are edited by identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

STANDARD_DOMAINS = ("", "ai.onnx")


def is_standard_domain(node: gs.Node) -> bool:
    """True for the default ONNX operator set; passes leave every other domain untouched."""
    return (node.domain or "") in STANDARD_DOMAINS


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs held in `node`'s attributes (If branches, Loop and Scan bodies)."""
    return [value for value in node.attrs.values() if isinstance(value, gs.Graph)]


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """`graph` and every sub-graph nested in it, outer graphs before the graphs they contain."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """An initializer's value as a pass may compute with it.

    None for a tensor computed at run time, a sparse initializer, or one exported as another
    type than it holds (it would compute differently).
    """
    # Test for sparse before touching `.values`: graphsurgeon densifies a sparse initializer
    # (as float64) on first access, and the model would then store it dense.
    if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, SparseValues):
        return None
    values = tensor.values
    export = tensor.export_dtype
    if isinstance(export, int) or np.dtype(export) != values.dtype:
        return None
    return values


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`; None for graph inputs and initializers."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Every node that reads `tensor`, including nodes inside sub-graphs that read it by name."""
    return list(tensor.outputs)


def is_graph_input(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is tensor for t in graph.inputs)


def is_graph_output(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_local(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """True when a node of `graph` itself (not of an enclosing graph) computes `tensor`."""
    node = producer(tensor)
    return node is not None and any(n is node for n in graph.nodes)


def replace_tensor_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads `old` read `new` instead; graph outputs are not touched."""
    for node in consumers(old):
        for index, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[index] = new


def detach(node: gs.Node) -> None:
    """Unlink `node` from its tensors so no tensor still lists it as producer or consumer."""
    node.inputs.clear()
    node.outputs.clear()


def remove_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> int:
    """Detach `nodes` and drop them from `graph` (by identity); returns how many were dropped."""
    doomed = {id(node): node for node in nodes}
    for node in doomed.values():
        detach(node)
    before = len(graph.nodes)
    graph.nodes = [node for node in graph.nodes if id(node) not in doomed]
    return before - len(graph.nodes)


def bypass_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> int:
    """Remove nodes whose first output equals their first input, rewiring their readers.

    Graph output names are part of the model's interface and must not change. When the output
    is a graph output, the producer of the input is made to write the output directly; that is
    only possible when the input is computed in this very graph and is not itself an input or
    output of it. Otherwise the node stays. Other outputs of a node (a Dropout mask) must be
    unused; the caller checks that. Returns how many nodes went; the graph's node list is
    rebuilt once, so bypassing thousands of nodes stays linear.
    """
    bypassed = [node for node in nodes if _rewire_around(node, graph)]
    return remove_nodes(graph, bypassed)


def bypass_node(node: gs.Node, graph: gs.Graph) -> bool:
    """`bypass_nodes` for one node: True when it went, False when it had to stay."""
    return bypass_nodes(graph, [node]) == 1


def _rewire_around(node: gs.Node, graph: gs.Graph) -> bool:
    # Leaves `node` detached (so no tensor lists it) but still in graph.nodes, for one removal.
    source, result = node.inputs[0], node.outputs[0]
    if not is_graph_output(result, graph):
        detach(node)
        replace_tensor_uses(result, source)
        return True
    if not _can_rename(source, graph):
        return False
    writer = producer(source)
    detach(node)
    replace_tensor_uses(source, result)
    writer.outputs[[t is source for t in writer.outputs].index(True)] = result
    return True


def _can_rename(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    # Renaming is safe only for a tensor no one outside this graph's nodes knows by name.
    return (
        is_local(tensor, graph) and not is_graph_input(tensor, graph) and not is_graph_output(tensor, graph)
    )


def outer_scope_tensors(graph: gs.Graph) -> list[gs.Tensor]:
    """Tensors that `graph`, or a sub-graph nested in it, reads from an enclosing graph.

    The If/Loop/Scan node that holds `graph` depends on these although it does not list them
    as inputs, so dead-code and ordering decisions in the enclosing graph must count them.
    """
    defined = {id(t) for t in graph.inputs} | {id(t) for n in graph.nodes for t in n.outputs}
    found: dict[int, gs.Tensor] = {}
    for node in graph.nodes:
        for tensor in node_reads(node):
            if id(tensor) not in defined and not tensor.is_empty():
                found[id(tensor)] = tensor
    return list(found.values())


def node_reads(node: gs.Node) -> list[gs.Tensor]:
    """What `node` reads: its inputs plus what its sub-graphs take from the enclosing scope."""
    reads = [t for t in node.inputs if not t.is_empty()]
    for sub in subgraphs(node):
        reads += outer_scope_tensors(sub)
    return list({id(t): t for t in reads}.values())  # each once, in first-read order


class Names:
    """Hands out names that no tensor or node of the graph (sub-graphs included) uses yet:
    `fresh("w.int8")` gives "w.int8", then "w.int8_1", "w.int8_2", ..."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        for g in iter_graphs(graph):
            self.taken.update(g.tensors())
            self.taken.update(node.name for node in g.nodes)

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            name, n = f"{base}_{n}", n + 1
        self.taken.add(name)
        return name
