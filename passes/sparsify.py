"""sparsify: sparse constant weights become sparse storage; QDQ INT8 MatMul/Gemm become QMatMul/QGemm.

target=polaris (the default) rewrites each eligible layer into an ai.polaris op (docs/OPS.md):

    MatMul(X, B const 2-D)            [→ Add(bias const)] [→ Relu]   ⇒  SparseMatMul
    Gemm(X, B const, C, transA=0)     [→ Add(bias const)] [→ Relu]   ⇒  SparseMatMul (bias β·C, W·α)
    Conv(X, W const, B, group=1, 2-D)                      [→ Relu]   ⇒  SparseConv

when the weight's sparsity (its share of zeros) is at least `min-sparsity`. W is stored in the
format polaris_opt.sparse.cost picks for the device `profile` (fewest bytes moved at batch 1,
padding included), with fp32, fp16 or int8 (per-row scale) values. A bias Add or a Relu joins
the node only when it is the sole reader of the layer's output, in the same graph, and that
output is no graph output; the new node writes the last fused node's output tensor, so every
name a user reads stays. Layers that read one weight the same way share its stored arrays.
With `qdq` (on by default) it also rewrites an INT8 QDQ layer:

    MatMul/Gemm(DequantizeLinear(QuantizeLinear(X, s, zp), s, zp),
                DequantizeLinear(int8 weight, per-channel or per-tensor scale, zero point 0))
        ⇒  QMatMul/QGemm(X, w_q, w_scale, bias, s, zp)

which computes the same numbers with an int32 accumulator (static x_scale and uint8 zero point;
a bias stored as DequantizeLinear of int32 codes is dequantized into QMatMul's float bias). The
Q/DQ nodes the layer leaves unread go; those another node still reads stay.

target=onnxruntime keeps the standard ops and stores each eligible weight sparse, as COO
(values and int64 linear indices, ONNX's SparseTensorProto) in a `Constant(sparse_value)`
node, which stock ONNX Runtime densifies at load: a smaller file that runs anywhere. Not
`graph.sparse_initializer`: ONNX shape inference types a sparse initializer as a sparse tensor,
which no standard op accepts, so `onnx.checker` full_check (and the pipeline's verifier) would
reject every such model; the Constant node's output is an ordinary dense tensor. A weight
moves only when COO is smaller than dense (below about 1/3 density for fp32, since each
nonzero costs 8 bytes of index), and only when no excluded node reads it.

Layers inside If/Loop/Scan bodies are handled like any other. Each layer gets a row in
`details["layers"]` (format, bytes before and after, why this format); each left alone, a row
in `details["skipped"]` with the reason.

This module holds the options; the work is in polaris_opt.sparse: layers.py (which layers can
become SparseMatMul/SparseConv, and their bias), qdq_rewrite.py (QDQ layers to QMatMul/QGemm),
rewrite.py (target=polaris: fusion, stored formats, the new nodes) and coo_storage.py
(target=onnxruntime).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.ops import DOMAIN, OPSET_VERSION, register_schemas
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.sparse.coo_storage import store_sparse
from polaris_opt.sparse.cost import resolve_profile
from polaris_opt.sparse.rewrite import rewrite_layers


class SparseFormat(str, enum.Enum):
    AUTO = "auto"
    CSR = "csr"
    BSR = "bsr"
    SELL = "sell"


class ValueType(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Target(str, enum.Enum):
    POLARIS = "polaris"
    ONNXRUNTIME = "onnxruntime"


@dataclass(frozen=True)
class Sparsify(Pass):
    """MatMul/Gemm/Conv with sparse constant weights  ⇒  SparseMatMul/SparseConv (or sparse storage)."""

    name: ClassVar[str] = "sparsify"
    # fp16/int8 values round the weights, and QMatMul accumulates in int32 rather than float.
    lossy: ClassVar[bool] = True

    min_sparsity: float = field(
        default=0.5,
        metadata={"help": "rewrite a layer whose weight has at least this share of zeros, in [0, 1]"},
    )
    format: SparseFormat = field(
        default=SparseFormat.AUTO,
        metadata={"help": "auto: the fewest bytes moved at batch 1 on the profile; or csr, bsr, sell"},
    )
    values: ValueType = field(
        default=ValueType.FP32, metadata={"help": "stored values: fp32, fp16, or int8 with a scale per row"}
    )
    target: Target = field(
        default=Target.POLARIS,
        metadata={"help": "polaris: ai.polaris ops; onnxruntime: standard ops, weights stored sparse (COO)"},
    )
    profile: str = field(
        default="cpu", metadata={"help": "device profile the format is chosen for (polaris-opt devices)"}
    )
    exclude: str = field(
        default="", metadata={"help": "node or weight names (fnmatch patterns) to leave alone, ';'-separated"}
    )
    qdq: bool = field(
        default=True,
        metadata={"help": "target=polaris: also rewrite QDQ INT8 MatMul/Gemm into QMatMul/QGemm"},
    )

    def __post_init__(self) -> None:
        # Python callers may spell choices as plain strings: Sparsify(values="int8").
        for name, kind in (("format", SparseFormat), ("values", ValueType), ("target", Target)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                valid = ", ".join(member.value for member in kind)
                raise BadInput(f"sparsify: unknown {name} '{getattr(self, name)}'; valid: {valid}") from None

    def check(self) -> None:
        """BadInput for options that cannot work together; run() checks them first too."""
        if not 0 <= self.min_sparsity <= 1:
            raise BadInput(
                f"sparsify: min-sparsity {self.min_sparsity} is outside [0, 1]; give the share of zeros "
                "a weight needs, such as 0.5"
            )
        resolve_profile(self.profile)
        if self.target is Target.ONNXRUNTIME and self.values is not ValueType.FP32:
            raise BadInput(
                f"sparsify: values={self.values.value} needs target=polaris; stock ONNX Runtime reads "
                "the weights' own type (use the quantize pass for INT8 there)"
            )
        if self.target is Target.ONNXRUNTIME and self.format is not SparseFormat.AUTO:
            raise BadInput(
                f"sparsify: format={self.format.value} needs target=polaris; target=onnxruntime stores "
                "COO, the one sparse layout ONNX has"
            )

    def patterns(self) -> list[str]:
        return [p for p in self.exclude.split(";") if p]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.check()
        if self.target is Target.ONNXRUNTIME:
            rows, skipped = store_sparse(graph, self)
        else:
            rows, skipped = rewrite_layers(graph, self)
            if rows:
                register_schemas()  # so the checker after this pass knows the ops
                _import_domain(graph)
        return PassResult(
            modified=bool(rows), stats=_totals(rows, skipped), details={"layers": rows, "skipped": skipped}
        )


def _import_domain(graph: gs.Graph) -> None:
    """Declare the ai.polaris opset (graphsurgeon would add it as version 1 too; say so explicitly)."""
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    if all(opset.domain != DOMAIN for opset in graph.import_domains):
        graph.import_domains.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))


def _totals(rows: list[dict], skipped: list[dict]) -> dict[str, int]:
    return {
        "sparse": sum(row["as"] in ("SparseMatMul", "SparseConv", "sparse storage") for row in rows),
        "quantized": sum(row["as"] in ("QMatMul", "QGemm") for row in rows),
        "skipped": len(skipped),
        "bytes_before": sum(row["bytes_before"] for row in rows),
        "bytes_after": sum(row["bytes_after"] for row in rows),
    }
