"""eliminate-identity: Identity nodes, and Dropout nodes that are identities at inference, go.

Exporters leave Identity nodes behind (tf2onnx around every variable read, PyTorch for
aliased outputs), and they hide patterns such as Conv -> BatchNormalization from later passes.
Readers are rewired to the Identity's input. Graph input and output names never change: when
the output is a graph output, the producer of the input writes it directly; when the input is
a graph input (or comes from an enclosing graph, as in an If branch) the Identity stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.surgery import bypass_nodes, constant_value, is_graph_output, is_standard_domain, iter_graphs


@dataclass(frozen=True)
class EliminateIdentity(Pass):
    """Identity(x) ⇒ x, and Dropout(x) ⇒ x when it is an identity at inference."""

    name: ClassVar[str] = "eliminate-identity"

    dropout: bool = field(
        default=True, metadata={"help": "also remove Dropout nodes whose mask is unused (inference)"}
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for g in list(iter_graphs(graph)):
            removed += bypass_nodes(g, [node for node in g.nodes if self.removable(node, g)])
        return PassResult(modified=removed > 0, stats={"removed": removed})

    def removable(self, node: gs.Node, graph: gs.Graph) -> bool:
        if not is_standard_domain(node) or not node.inputs or node.inputs[0].is_empty():
            return False
        if node.op == "Identity":
            return True
        return self.dropout and node.op == "Dropout" and is_inference_dropout(node, graph)


def is_inference_dropout(node: gs.Node, graph: gs.Graph) -> bool:
    """True when Dropout copies its input: not in training mode and its mask is unused."""
    mask_used = any(not t.is_empty() and (t.outputs or is_graph_output(t, graph)) for t in node.outputs[1:])
    # Opset 12+ takes training_mode as an input (default false); it must be provably false.
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None and not training.is_empty():
        value = constant_value(training)
        if value is None or bool(np.any(value)):
            return False
    return not mask_used
