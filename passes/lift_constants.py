"""lift-constants: `Constant` nodes become initializers.

Paddle and tf2onnx exports keep weights in `Constant` nodes; quantizers, pruners and folders
that look only at initializers would miss them. In graphsurgeon an initializer is a
`gs.Constant` that nodes read, so lifting means: every reader of the Constant node's output
reads a `gs.Constant` of the same name instead, and the node goes. A Constant node inside a
sub-graph becomes an initializer of that sub-graph (graphsurgeon exports a `gs.Constant` into
every graph whose nodes read it), so scoping is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.surgery import (
    is_graph_output,
    is_standard_domain,
    iter_graphs,
    remove_nodes,
    replace_tensor_uses,
)

# How each scalar/list attribute of Constant turns into an array (ONNX Constant, opset 12+).
_ATTRIBUTE_ARRAYS = {
    "value_float": lambda v: np.array(v, dtype=np.float32),
    "value_floats": lambda v: np.array(v, dtype=np.float32),
    "value_int": lambda v: np.array(v, dtype=np.int64),
    "value_ints": lambda v: np.array(v, dtype=np.int64),
    "value_string": lambda v: np.array(v.encode(), dtype=object),
    "value_strings": lambda v: np.array([s.encode() for s in v], dtype=object),
}


@dataclass(frozen=True)
class LiftConstants(Pass):
    """Constant nodes  ⇒  initializers of the graph (or sub-graph) they are in."""

    name: ClassVar[str] = "lift-constants"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        lifted = skipped = 0
        for g in list(iter_graphs(graph)):
            candidates = _constant_nodes(g)
            done = [node for node in candidates if _lift(node, g)]
            lifted += remove_nodes(g, done)
            skipped += len(candidates) - len(done)
        return PassResult(modified=lifted > 0, stats={"lifted": lifted, "skipped": skipped})


def _constant_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [node for node in graph.nodes if node.op == "Constant" and is_standard_domain(node)]


def _lift(node: gs.Node, graph: gs.Graph) -> bool:
    """Make the readers of `node`'s output read an initializer; False when it must stay a node."""
    output = node.outputs[0]
    # A graph output must keep its name and nothing reads it as a weight, so lifting it gains
    # nothing and would put an initializer in an output slot, which runtimes rarely exercise.
    if is_graph_output(output, graph):
        return False
    initializer = constant_of(node, output.name)
    if initializer is None:
        return False
    replace_tensor_uses(output, initializer)
    return True


def constant_of(node: gs.Node, name: str) -> gs.Constant | None:
    """The value of a Constant node as a `gs.Constant` named `name`; None when not liftable.

    `sparse_value` is not liftable: graphsurgeon drops that attribute on import, and a sparse
    weight kept sparse is the point of storing it so.
    """
    value: Any = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        # Reuse the imported tensor so its exact bytes and dtype (bfloat16, float8) survive.
        value.name = name
        return value
    for attribute, to_array in _ATTRIBUTE_ARRAYS.items():
        if attribute in node.attrs:
            return gs.Constant(name, to_array(node.attrs[attribute]))
    return None
