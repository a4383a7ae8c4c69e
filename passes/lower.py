"""lower: ai.polaris ops become standard ONNX, so a Polaris model runs on stock ONNX Runtime.

The inverse of the Polaris output form (DESIGN.md §4): SparseMatMul/SparseConv get their weight
densified, QMatMul/QGemm dequantized with Q/DQ (or DynamicQuantizeLinear) on X, MatMulInt4 its
blocks dequantized; see polaris_opt.ops.lowering for the exact node patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

from polaris_opt.ops import register_schemas
from polaris_opt.ops.lowering import lower_graph
from polaris_opt.passes_api import Pass, PassContext, PassResult

# A pipeline that lowers has ai.polaris nodes in its input, which the verifier checks with
# onnx.checker before this pass runs: the schemas must be known by then, and the pipeline
# imports this module when it parses "lower".
register_schemas()


@dataclass(frozen=True)
class Lower(Pass):
    """ai.polaris ops ⇒ standard ONNX ops (MatMul/Conv on float32 weights, Q/DQ for INT8 inputs)."""

    name: ClassVar[str] = "lower"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        lowered = lower_graph(graph)
        return PassResult(
            modified=bool(lowered),
            stats={"lowered": sum(lowered.values())},
            details={"lowered": dict(sorted(lowered.items()))},
        )
