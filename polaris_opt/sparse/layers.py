"""The layers the sparsify pass rewrites: which MatMul/Gemm/Conv can become SparseMatMul/SparseConv,
and the bias each one takes along.

`sparse_layer` gives a `Layer` (what the new node reads and computes) or the reason the node stays
(a str, which becomes its row in `details["skipped"]`). The QDQ layers that become QMatMul/QGemm
are matched in qdq_rewrite.py; both read their bias through `layer_bias`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.pruning.targets import to_matrix
from polaris_opt.surgery import Names, constant_value, is_standard_domain, producer


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


def is_excluded(patterns: list[str], *names: str) -> bool:
    """Whether any of `names` (node or weight names; empty ones skipped) matches an fnmatch pattern."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names if name)


def new_constant(names: Names, base: str, value: np.ndarray | None) -> gs.Constant | None:
    """A constant for a new node to read, under a fresh name derived from `base`; None for None."""
    return None if value is None else gs.Constant(names.fresh(base), np.ascontiguousarray(value))


# ------------------------------------------------------------------------- sparse layers


def sparse_layer(node: gs.Node) -> Layer | str:
    """MatMul/Gemm/Conv with a float32 constant weight as a SparseMatMul/SparseConv layer."""
    weight = constant_value(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        kind = "a sparse initializer" if weight is None else f"{weight.dtype}"
        return f"weight is {kind}; SparseMatMul/SparseConv take a float32 constant weight"
    problem = _LAYER_PROBLEMS[node.op](node, weight)
    if problem:
        return problem
    bias = layer_bias(node, weight)
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


# ---------------------------------------------------------------------------------- biases


def layer_bias(node: gs.Node, weight: np.ndarray) -> np.ndarray | None | str:
    """The node's own bias as float32 [N]: Gemm's β·C or Conv's B; None when absent; str: why not."""
    if node.op == "MatMul" or len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    outputs = weight.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else weight.shape[1]
    value = bias_value(node.inputs[2])
    if value is None:
        return "its bias is computed at run time"
    beta = node.attrs.get("beta", 1.0) if node.op == "Gemm" else 1.0
    vector = as_vector(value, outputs, max_rank=2 if node.op == "Gemm" else 1)
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


def as_vector(value: np.ndarray, size: int, max_rank: int) -> np.ndarray | None:
    """`value` as [size] when it broadcasts as one value per output feature without adding axes."""
    if value.ndim > max_rank or any(d != 1 for d in value.shape[:-1]):
        return None
    if value.size == 1:
        return np.full(size, value.reshape(()), dtype=np.float32)
    return value.reshape(size).astype(np.float32) if value.shape[-1] == size else None
