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
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.ops import DOMAIN, OPSET_VERSION, register_schemas
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.pruning.targets import PRUNABLE_OPS, to_matrix, weight_of
from polaris_opt.sparse.cost import FormatChoice, choose_format, resolve_profile
from polaris_opt.sparse.formats import from_dense
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    detach,
    is_graph_output,
    is_standard_domain,
    iter_graphs,
    producer,
    remove_nodes,
    replace_tensor_uses,
)

LAYER_OPS = ("MatMul", "Gemm", "Conv")
COO_INDEX_BYTES = 8  # ONNX sparse tensors index with int64


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


# ------------------------------------------------------------------------- target=polaris


@dataclass
class Layer:
    """One layer to rewrite: what the new node reads, computes and replaces."""

    node: gs.Node
    op: str  # the ai.polaris op it becomes
    x: gs.Tensor
    weight: str  # the weight's name, for rows and new tensor names
    matrix: np.ndarray  # [N, K]: float32 W for the sparse ops, int8 w_q for the quantized ones
    bias: np.ndarray | None = None  # float32 [N]
    attrs: dict[str, Any] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # QMatMul's scales, zero point
    fusable_add: bool = True  # MatMul/Gemm: a following Add of a [N] constant is a bias
    sparsity: float = 0.0
    note: str = ""


def rewrite_layers(graph: gs.Graph, options: Sparsify) -> tuple[list[dict], list[dict]]:
    """Rewrite every eligible layer of `graph` and its sub-graphs; (rows, skipped)."""
    weights = StoredWeights(options, Names(graph))
    rows: list[dict] = []
    skipped: list[dict] = []
    for g in list(iter_graphs(graph)):
        replaced: list[gs.Node] = []
        upstream: list[gs.Node] = []
        for node in list(g.nodes):
            if node.op not in LAYER_OPS or not is_standard_domain(node) or not node.outputs:
                continue
            found = _find_layer(node, options)
            if isinstance(found, str):
                skipped.append({"name": node.name, "op": node.op, "reason": found})
                continue
            if found is None:
                continue
            # Q/DQ nodes that fed the layer (its activation, weight, bias) may lose their last reader.
            upstream += [producer(t) for n in [node, *consumers(node.outputs[0])] for t in n.inputs]
            rows.append(_rewrite(found, g, weights, replaced))
        if replaced:
            remove_nodes(g, replaced)
            _remove_unread(g, upstream)
            g.toposort()
    return rows, skipped


def _find_layer(node: gs.Node, options: Sparsify) -> Layer | str | None:
    """The layer `node` becomes, the reason it stays (str), or None when it has no weight at all."""
    if len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    quantized = _quantized_layer(node) if options.qdq else None
    if quantized is None and not isinstance(weight, gs.Constant):
        return None  # activation times activation (attention scores): nothing to store
    if _excluded(options.patterns(), node.name, weight.name):
        return "excluded"
    if quantized is not None:
        return quantized
    layer = _sparse_layer(node)
    if isinstance(layer, Layer) and layer.sparsity < options.min_sparsity:
        return f"sparsity {layer.sparsity:.1%} is below min-sparsity {options.min_sparsity:g}"
    return layer


def _excluded(patterns: list[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names if name)


# ------------------------------------------------------------------------- sparse layers


def _sparse_layer(node: gs.Node) -> Layer | str:
    """MatMul/Gemm/Conv with a float32 constant weight as a SparseMatMul/SparseConv layer."""
    weight = constant_value(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        kind = "a sparse initializer" if weight is None else f"{weight.dtype}"
        return f"weight is {kind}; SparseMatMul/SparseConv take a float32 constant weight"
    problem = _LAYER_PROBLEMS[node.op](node, weight)
    if problem:
        return problem
    bias = _layer_bias(node, weight)
    if isinstance(bias, str):
        return bias
    matrix = to_matrix(node, weight).astype(np.float32)
    alpha = node.attrs.get("alpha", 1.0) if node.op == "Gemm" else 1.0
    if alpha != 1.0:
        matrix = (matrix * np.float32(alpha)).astype(np.float32)  # α·A·B = A·(α·B)
    sparsity = 1 - np.count_nonzero(matrix) / matrix.size if matrix.size else 0.0
    op = "SparseConv" if node.op == "Conv" else "SparseMatMul"
    layer = Layer(node, op, node.inputs[0], node.inputs[1].name, matrix, bias, sparsity=float(sparsity))
    layer.fusable_add = node.op != "Conv"  # a Conv's per-channel Add would be [O, 1, 1]
    if node.op == "Conv":
        layer.attrs = _conv_geometry(node, weight)
    return layer


def _matmul_problem(node: gs.Node, weight: np.ndarray) -> str | None:
    return None if weight.ndim == 2 else f"weight has {weight.ndim} axes; SparseMatMul needs a 2-D B"


def _gemm_problem(node: gs.Node, weight: np.ndarray) -> str | None:
    if node.attrs.get("transA", 0):
        return "transA=1: SparseMatMul reads X as [M, K]"
    return None if weight.ndim == 2 else f"weight has {weight.ndim} axes"


def _conv_problem(node: gs.Node, weight: np.ndarray) -> str | None:
    if node.attrs.get("group", 1) != 1:
        return f"group={node.attrs['group']}: SparseConv handles group 1 only"
    if weight.ndim != 4:
        return f"{weight.ndim - 2}-D convolution: SparseConv handles 2-D only"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={node.attrs['auto_pad']}: SparseConv takes explicit pads"
    return None


_LAYER_PROBLEMS = {"MatMul": _matmul_problem, "Gemm": _gemm_problem, "Conv": _conv_problem}


def _conv_geometry(node: gs.Node, weight: np.ndarray) -> dict[str, list[int]]:
    same = node.attrs.get("auto_pad", "NOTSET") == "VALID"  # VALID means no padding at all
    return {
        "kernel_shape": [int(d) for d in weight.shape[2:]],
        "pads": [0, 0, 0, 0] if same else [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])],
        "strides": [int(s) for s in node.attrs.get("strides", [1, 1])],
        "dilations": [int(d) for d in node.attrs.get("dilations", [1, 1])],
    }


def _layer_bias(node: gs.Node, weight: np.ndarray) -> np.ndarray | None | str:
    """The node's own bias as float32 [N]: Gemm's β·C or Conv's B; None when absent; str: why not."""
    if node.op == "MatMul" or len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    outputs = weight.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else weight.shape[1]
    value = bias_value(node.inputs[2])
    if value is None:
        return "its bias is computed at run time"
    beta = node.attrs.get("beta", 1.0) if node.op == "Gemm" else 1.0
    vector = _as_vector(value, outputs, max_rank=2 if node.op == "Gemm" else 1)
    if vector is None:
        return f"bias of shape {list(value.shape)} is not one value per output feature ({outputs})"
    return (vector.astype(np.float64) * beta).astype(np.float32)


def bias_value(tensor: gs.Tensor) -> np.ndarray | None:
    """A float bias: a float constant, or DequantizeLinear of constant int32 codes (QDQ biases)."""
    value = constant_value(tensor)
    if value is not None:
        return value if value.dtype == np.float32 else None
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or not is_standard_domain(node):
        return None
    codes, scale = constant_value(node.inputs[0]), constant_value(node.inputs[1])
    zero_point = (
        constant_value(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    )
    if (
        codes is None
        or scale is None
        or codes.dtype != np.int32
        or (zero_point is not None and zero_point.any())
    ):
        return None
    axis = node.attrs.get("axis", 1) % max(codes.ndim, 1)
    shape = [1] * codes.ndim
    if scale.size > 1:
        shape[axis] = scale.size
    # As DequantizeLinear computes it: the codes as float32 times the float32 scale.
    return codes.astype(np.float32) * scale.astype(np.float32).reshape(shape)


def _as_vector(value: np.ndarray, size: int, max_rank: int) -> np.ndarray | None:
    """`value` as [size] when it broadcasts as one value per output feature without adding axes."""
    if value.ndim > max_rank or any(d != 1 for d in value.shape[:-1]):
        return None
    if value.size == 1:
        return np.full(size, value.reshape(()), dtype=np.float32)
    return value.reshape(size).astype(np.float32) if value.shape[-1] == size else None


# ---------------------------------------------------------------------- quantized layers


def _quantized_layer(node: gs.Node) -> Layer | str | None:
    """MatMul/Gemm over a QDQ activation and a QDQ int8 weight as QMatMul/QGemm; None when the
    weight is not dequantized int8 (not a QDQ layer at all)."""
    if node.op == "Conv":
        return None
    trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
    weight = _dequantized_weight(node.inputs[1], output_axis=0 if trans_b else 1)
    if weight is None or isinstance(weight, str):
        return weight
    codes, scale, dq_weight = weight
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "transA=1: QGemm reads X as [M, K]"
    activation = _static_activation(node.inputs[0])
    if isinstance(activation, str):
        return activation
    x, x_scale, x_zero_point = activation
    w_q = codes if trans_b else codes.T
    bias = _layer_bias(node, codes)
    if isinstance(bias, str):
        return bias
    op = "QGemm" if node.op == "Gemm" else "QMatMul"
    layer = Layer(node, op, x, dq_weight.inputs[0].name, np.ascontiguousarray(w_q), bias)
    layer.constants = {"w_scale": scale, "x_scale": x_scale, "x_zero_point": x_zero_point}
    if op == "QGemm":
        layer.attrs = {"alpha": float(node.attrs.get("alpha", 1.0))}
    layer.note = f"QDQ int8: static x_scale {float(x_scale):.4g}, zero point {int(x_zero_point)}"
    return layer


def _dequantized_weight(tensor: gs.Tensor, output_axis: int):
    """(int8 codes, float32 scale [N], the DequantizeLinear) of a QDQ weight; str: why it cannot
    become QMatMul's; None: `tensor` is no DequantizeLinear of a constant."""
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or not is_standard_domain(node):
        return None
    codes, scale = constant_value(node.inputs[0]), constant_value(node.inputs[1])
    if codes is None or scale is None:
        return None
    zero_point = (
        constant_value(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    )
    if codes.dtype != np.int8 or codes.ndim != 2 or scale.dtype != np.float32:
        return (
            f"dequantized weight is {codes.dtype} [{codes.ndim} axes] at {scale.dtype} scale; "
            "QMatMul takes a 2-D int8 weight at float32 scales"
        )
    if zero_point is not None and zero_point.any():
        return "weight zero point is not 0: QMatMul takes symmetric int8 weights"
    outputs = codes.shape[output_axis]
    if scale.size == 1:
        return codes, np.full(outputs, scale.reshape(()), dtype=np.float32), node
    if node.attrs.get("axis", 1) % 2 != output_axis or scale.size != outputs:
        return "weight scales are not per output channel"
    return codes, scale.astype(np.float32).reshape(outputs), node


def _static_activation(tensor: gs.Tensor):
    """(X, x_scale, x_zero_point) when `tensor` is DQ(Q(X)) with one constant
    scale and uint8 zero point; str: why QMatMul cannot take it."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or not is_standard_domain(dq):
        return "activation is not quantized (weight-only QDQ): QMatMul would quantize it and change results"
    q = producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear" or not is_standard_domain(q):
        return "activation is dequantized from stored codes, not quantized from a float tensor"
    q_params, dq_params = _scalar_params(q), _scalar_params(dq)
    if q_params is None or dq_params is None:
        return "activation scale (float32) or zero point is not one constant"
    (scale, zero_point), (dq_scale, dq_zero_point) = q_params, dq_params
    if zero_point.dtype != np.uint8 or dq_zero_point.dtype != np.uint8:
        return f"activation zero point is {zero_point.dtype}: QMatMul quantizes X to uint8"
    if scale != dq_scale or zero_point != dq_zero_point:
        return "QuantizeLinear and DequantizeLinear of the activation disagree on scale or zero point"
    return q.inputs[0], np.float32(scale), np.uint8(zero_point)


def _scalar_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """A Q/DQ node's (float32 scale, zero point) when both are one constant each."""
    scale = constant_value(node.inputs[1])
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        zero_point = np.array(0, np.uint8)  # absent: uint8 codes with zero point 0 (ONNX's default)
    else:
        zero_point = constant_value(node.inputs[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return None
    if scale.dtype != np.float32:
        return None  # a float16 model: QMatMul's X and scales are float32
    return scale.reshape(()), zero_point.reshape(())


# ------------------------------------------------------------------------------ rewriting


@dataclass
class Fusion:
    """What joins the layer's node: a bias Add and a Relu after it, and the tensor the last writes."""

    output: gs.Tensor
    absorbed: list[gs.Node]
    bias: np.ndarray | None
    relu: bool = False


def _fuse(layer: Layer, graph: gs.Graph) -> Fusion:
    n = layer.matrix.shape[0]
    fusion = Fusion(layer.node.outputs[0], [layer.node], layer.bias)
    reader = _sole_reader(fusion.output, graph)
    if layer.fusable_add and reader is not None and reader.op == "Add":
        extra = _added_bias(reader, fusion.output, n, _output_rank(layer))
        if extra is not None:
            fusion.bias = extra if fusion.bias is None else (fusion.bias + extra).astype(np.float32)
            fusion.output = reader.outputs[0]
            fusion.absorbed.append(reader)
            reader = _sole_reader(fusion.output, graph)
    if reader is not None and reader.op == "Relu":
        fusion.relu, fusion.output = True, reader.outputs[0]
        fusion.absorbed.append(reader)
    return fusion


def _sole_reader(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The one node of `graph` itself that reads `tensor`, when nothing else can see it."""
    readers = consumers(tensor)
    if len(readers) != 1 or is_graph_output(tensor, graph) or not is_standard_domain(readers[0]):
        return None
    return readers[0] if any(node is readers[0] for node in graph.nodes) else None


def _output_rank(layer: Layer) -> int | None:
    """How many axes the layer's output has, when known: Gemm's 2, or as many as X (MatMul)."""
    if layer.node.op == "Gemm":
        return 2
    for tensor in (layer.node.outputs[0], layer.node.inputs[0]):
        if tensor.shape is not None:
            return max(len(tensor.shape), 1)
    return None


def _added_bias(add: gs.Node, layer_output: gs.Tensor, n: int, rank: int | None) -> np.ndarray | None:
    if len(add.inputs) != 2 or (add.inputs[0] is layer_output) == (add.inputs[1] is layer_output):
        return None
    other = add.inputs[1] if add.inputs[0] is layer_output else add.inputs[0]
    value = bias_value(other)
    # A bias with more axes than the output would add axes to it: [1, N] only on a 2-D+ output.
    return None if value is None else _as_vector(value, n, max_rank=rank or 1)


def _rewrite(layer: Layer, graph: gs.Graph, weights: StoredWeights, replaced: list) -> dict:
    """Put the new node in the layer's place; the replaced nodes go into `replaced`."""
    fusion = _fuse(layer, graph)
    node_name = layer.node.name or weights.names.fresh(layer.op)
    for node in fusion.absorbed:
        detach(node)
    replaced += fusion.absorbed
    if layer.op in ("QMatMul", "QGemm"):
        inputs, attrs, row = _quantized_inputs(layer, fusion, weights.names)
    else:
        inputs, attrs, row = _sparse_inputs(layer, fusion, weights)
    attrs |= {**layer.attrs, "activation": "relu" if fusion.relu else "none"}
    graph.nodes.append(gs.Node(layer.op, node_name, attrs, inputs, [fusion.output], domain=DOMAIN))
    fused = [node.op for node in fusion.absorbed[1:]]
    return {
        "layer": node_name,
        "op": layer.node.op,
        "as": layer.op,
        "weight": layer.weight,
        "shape": list(layer.matrix.shape),
        "fused": fused,
        "bias": fusion.bias is not None,
        **row,
    }


@dataclass
class StoredWeight:
    """A matrix in its chosen format, as the constants a sparse node reads."""

    choice: FormatChoice
    arrays: list[gs.Constant]  # data, indices, indptr
    scale: gs.Constant | None
    nbytes: int


class StoredWeights:
    """Each distinct matrix stored once: layers that share a weight (and its view) share its arrays."""

    def __init__(self, options: Sparsify, names: Names):
        self.options, self.names = options, names
        self.stored: dict[tuple, tuple[np.ndarray, StoredWeight]] = {}

    def get(self, layer: Layer) -> StoredWeight:
        key = (layer.weight, layer.matrix.shape, hashlib.sha1(layer.matrix.tobytes()).digest())
        found = self.stored.get(key)
        if found is None or not np.array_equal(found[0], layer.matrix):
            found = (layer.matrix, self._store(layer))
            self.stored[key] = found
        return found[1]

    def _store(self, layer: Layer) -> StoredWeight:
        values = self.options.values.value
        choice = choose_format(layer.matrix, self.options.profile, values, self.options.format.value)
        cost = choice.chosen
        stored = from_dense(
            layer.matrix, cost.format, values=values, block=cost.block, slice_height=cost.slice_height or 1
        )
        base = f"{layer.weight}.{cost.format}"
        arrays = [
            gs.Constant(self.names.fresh(f"{base}.{part}"), getattr(stored, part))
            for part in ("data", "indices", "indptr")
        ]
        scale = _constant(self.names, f"{base}.scale", stored.scale)
        return StoredWeight(choice, arrays, scale, stored.nbytes)


def _sparse_inputs(layer: Layer, fusion: Fusion, weights: StoredWeights) -> tuple[list, dict, dict]:
    """SparseMatMul/SparseConv's inputs, format attributes and row, W stored in the chosen format."""
    stored = weights.get(layer)
    cost = stored.choice.chosen
    bias = _constant(weights.names, f"{layer.weight}.{cost.format}.bias", fusion.bias)
    inputs = [layer.x, *stored.arrays, *_trimmed([bias, stored.scale])]
    attrs: dict[str, Any] = {"format": cost.format, "shape": [int(d) for d in layer.matrix.shape]}
    if cost.format == "bsr":
        attrs["block"] = list(cost.block)
    if cost.format == "sell":
        attrs["slice_height"] = int(cost.slice_height)
    row = {
        "sparsity": layer.sparsity,
        "format": cost.label,
        "values": weights.options.values.value,
        "index": cost.index,
        "bytes_before": int(layer.matrix.size * 4),
        "bytes_after": int(stored.nbytes),
        **stored.choice.to_dict(),
    }
    return inputs, attrs, row


def _quantized_inputs(layer: Layer, fusion: Fusion, names: Names) -> tuple[list, dict, dict]:
    """QMatMul/QGemm's inputs (X static: x_scale and x_zero_point always given) and row."""
    base = layer.weight
    c = layer.constants
    inputs = [
        layer.x,
        _constant(names, f"{base}.w_q", layer.matrix),
        _constant(names, f"{base}.w_scale", c["w_scale"]),
    ]
    inputs += [
        _constant(names, f"{base}.bias", fusion.bias),
        _constant(names, f"{base}.x_scale", np.array(c["x_scale"], dtype=np.float32)),
        _constant(names, f"{base}.x_zero_point", np.array(c["x_zero_point"], dtype=np.uint8)),
    ]
    stored = layer.matrix.nbytes + c["w_scale"].nbytes
    row = {
        "format": "int8 dense",
        "values": "int8",
        "bytes_before": stored,
        "bytes_after": stored,
        "reason": layer.note,
    }
    return [t if t is not None else gs.Variable.empty() for t in inputs], {}, row


def _constant(names: Names, base: str, value: np.ndarray | None) -> gs.Constant | None:
    return None if value is None else gs.Constant(names.fresh(base), np.ascontiguousarray(value))


def _trimmed(optional: list[gs.Constant | None]) -> list[gs.Tensor]:
    """Optional trailing inputs: absent ones at the end are left out, those before a present one
    are the empty tensor ("")."""
    while optional and optional[-1] is None:
        optional.pop()
    return [t if t is not None else gs.Variable.empty() for t in optional]


def _remove_unread(graph: gs.Graph, candidates: list[gs.Node | None]) -> None:
    """Drop the Q/DQ nodes among `candidates` that nothing reads any more, and then the Q/DQ
    nodes upstream of them that this leaves unread (the Q before a DQ); any still read stay."""
    local = {id(node) for node in graph.nodes}  # a producer in an enclosing graph is not ours to drop
    pending = [node for node in candidates if node is not None]
    gone: set[int] = set()
    while pending:
        node = pending.pop()
        if id(node) in gone or id(node) not in local or node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if _is_read(node, graph):
            continue
        upstream = [producer(t) for t in node.inputs]
        detach(node)
        gone.add(id(node))
        pending += [n for n in upstream if n is not None]
    graph.nodes = [node for node in graph.nodes if id(node) not in gone]


def _is_read(node: gs.Node, graph: gs.Graph) -> bool:
    return any(consumers(t) or is_graph_output(t, graph) for t in node.outputs)


def _import_domain(graph: gs.Graph) -> None:
    """Declare the ai.polaris opset (graphsurgeon would add it as version 1 too; say so explicitly)."""
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    if all(opset.domain != DOMAIN for opset in graph.import_domains):
        graph.import_domains.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))


# ---------------------------------------------------------------------- target=onnxruntime


def store_sparse(graph: gs.Graph, options: Sparsify) -> tuple[list[dict], list[dict]]:
    """Store each eligible weight as COO in a Constant(sparse_value); (rows, skipped)."""
    names = Names(graph)
    rows: list[dict] = []
    skipped: list[dict] = []
    for g in list(iter_graphs(graph)):
        for weight, readers in _weights_by_reader(g):
            reason = _storage_problem(weight, readers, g, options)
            if reason:
                skipped += [{"name": node.name, "op": node.op, "reason": reason} for node in readers]
                continue
            rows.append(_store(weight, readers, g, names))
    return rows, skipped


def _weights_by_reader(graph: gs.Graph) -> list[tuple[gs.Constant, list[gs.Node]]]:
    """Each float weight of a Conv/ConvTranspose/Gemm/MatMul of `graph`, with the layers reading it."""
    found: dict[int, tuple[gs.Constant, list[gs.Node]]] = {}
    for node in graph.nodes:
        if node.op in PRUNABLE_OPS and is_standard_domain(node):
            weight = weight_of(node)
            if weight is not None:
                found.setdefault(id(weight), (weight, []))[1].append(node)
    return list(found.values())


def _storage_problem(weight: gs.Constant, readers: list[gs.Node], graph: gs.Graph, options: Sparsify) -> str:
    values = constant_value(weight)
    if any(_excluded(options.patterns(), node.name, weight.name) for node in readers):
        return "excluded (or its weight is shared with an excluded node)"
    if len(consumers(weight)) != len(readers) or is_graph_output(weight, graph):
        return "weight is also read elsewhere (another op or graph): it stays dense for them"
    sparsity = 1 - np.count_nonzero(values) / values.size if values.size else 0.0
    if sparsity < options.min_sparsity:
        return f"sparsity {sparsity:.1%} is below min-sparsity {options.min_sparsity:g}"
    if _coo_bytes(values) >= values.nbytes:
        needed = COO_INDEX_BYTES / (COO_INDEX_BYTES + values.itemsize)
        return f"COO (int64 indices) is larger than dense at sparsity {sparsity:.1%}; it needs > {needed:.1%}"
    return ""


def _coo_bytes(values: np.ndarray) -> int:
    return int(np.count_nonzero(values)) * (values.itemsize + COO_INDEX_BYTES)


def _store(weight: gs.Constant, readers: list[gs.Node], graph: gs.Graph, names: Names) -> dict:
    values = constant_value(weight)
    flat = values.reshape(-1)
    positions = np.flatnonzero(flat)
    sparse = onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(flat[positions], weight.name),
        onnx.numpy_helper.from_array(positions.astype(np.int64), f"{weight.name}.indices"),
        list(values.shape),
    )
    dense = gs.Variable(weight.name, dtype=values.dtype, shape=list(values.shape))
    replace_tensor_uses(weight, dense)
    node = gs.Node(
        "Constant", names.fresh(f"{weight.name}.sparse"), {"sparse_value": sparse}, outputs=[dense]
    )
    graph.nodes.insert(0, node)
    return {
        "layer": readers[0].name,
        "op": readers[0].op,
        "as": "sparse storage",
        "weight": weight.name,
        "readers": [node.name for node in readers],
        "shape": list(values.shape),
        "sparsity": 1 - positions.size / values.size,
        "format": "coo",
        "values": str(values.dtype),
        "index": "int64",
        "bytes_before": int(values.nbytes),
        "bytes_after": _coo_bytes(values),
        "reason": "stock ONNX Runtime densifies it at load",
    }


# ---------------------------------------------------------------------------------- totals


def _totals(rows: list[dict], skipped: list[dict]) -> dict[str, int]:
    return {
        "sparse": sum(row["as"] in ("SparseMatMul", "SparseConv", "sparse storage") for row in rows),
        "quantized": sum(row["as"] in ("QMatMul", "QGemm") for row in rows),
        "skipped": len(skipped),
        "bytes_before": sum(row["bytes_before"] for row in rows),
        "bytes_after": sum(row["bytes_after"] for row in rows),
    }
