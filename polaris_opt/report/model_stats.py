"""What a report says about one model file: bytes, parameters, precision mix and weight sparsity.

Parameters are the weight values the file stores, counted by stored element type (the precision
mix sums to the parameter count):
- a dense tensor counts all its elements, under its type: a QDQ model's int8 weights as int8,
  their float32 scales and integer zero points as what they are;
- a sparse tensor (ONNX sparse storage, an ai.polaris Sparse* op's `data`) counts its stored
  values, not its index arrays, which are storage, not parameters;
- 4-bit weights (com.microsoft MatMulNBits, ai.polaris MatMulInt4) count N·K elements as "int4",
  not their packed bytes as uint8.
Sparsity is the fraction of zero weights over the weighted layers' weights (Conv, ConvTranspose,
Gemm, MatMul and their quantized and sparse forms), each weight counted at its dense size: a
quantized weight is zero where its code equals its zero point, and a sparse weight's zeros are
its dense size less its nonzero stored values (the zeros BSR and SELL store inside blocks and
slices are zeros of the weight too, so the figure matches the dense weight's).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from polaris_opt.inspect import dtype_name
from polaris_opt.proto import proto_graphs

DENSE_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
STANDARD_DOMAINS = ("", "ai.onnx")
POLARIS = "ai.polaris"
MICROSOFT = "com.microsoft"
# Index arrays of the ai.polaris sparse ops: inputs 2 (indices) and 3 (indptr).
SPARSE_INDEX_INPUTS = (2, 3)
INT4_ZERO_POINT_DEFAULT = 8  # MatMulNBits and MatMulInt4: absent zero points mean 8
INT4_ZERO_POINT_INPUT = 3  # both ops: after the activations, the packed weight and the scales


@dataclass
class Stored:
    """One stored tensor: its values (None where unreadable), type name and elements it counts for."""

    values: np.ndarray | None
    dtype: str
    elements: int


@dataclass
class WeightZeros:
    """A weighted layer's weight at its dense size, and how many of its entries are zero."""

    elements: int
    zeros: int


def model_stats(path: Path, model: onnx.ModelProto) -> dict[str, Any]:
    """The report's "input"/"output" entry for `model`, read from `path`."""
    tensors = stored_tensors(model)
    consumers = _consumers(model)
    precision = _precision(tensors, consumers)
    weights = [w for w in weight_zeros(model, tensors) if w.elements]
    elements = sum(w.elements for w in weights)
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "parameters": sum(precision.values()),
        "precision": precision,
        "sparsity": sum(w.zeros for w in weights) / elements if elements else 0.0,
    }


# ----------------------------------------------------------------------------- stored tensors


def stored_tensors(model: onnx.ModelProto) -> dict[str, Stored]:
    """Every initializer, sparse initializer and Constant value of every graph, by tensor name."""
    tensors: dict[str, Stored] = {}
    for graph in proto_graphs(model.graph):
        for tensor in graph.initializer:
            tensors[tensor.name] = _dense(tensor)
        for sparse in graph.sparse_initializer:
            tensors[sparse.values.name] = _sparse(sparse)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and node.output:
                stored = _constant(node)
                if stored is not None:
                    tensors[node.output[0]] = stored
    return tensors


def _dense(tensor: onnx.TensorProto) -> Stored:
    readable = tensor.data_type != onnx.TensorProto.STRING
    values = numpy_helper.to_array(tensor) if readable else None
    return Stored(values, dtype_name(tensor.data_type), math.prod(tensor.dims))


def _sparse(sparse: onnx.SparseTensorProto) -> Stored:
    """Stored values only; `values` is the dense array, so zeros are counted at the dense size."""
    stored = _dense(sparse.values)
    dense = None
    if stored.values is not None:
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
        dense = np.zeros(math.prod(sparse.dims), dtype=stored.values.dtype)
        dense[flat] = stored.values.reshape(-1)
        dense = dense.reshape(tuple(sparse.dims))
    return Stored(dense, stored.dtype, stored.elements)


def _constant(node: onnx.NodeProto) -> Stored | None:
    for attr in node.attribute:
        if attr.name == "value":
            return _dense(attr.t)
        if attr.name == "sparse_value":
            return _sparse(attr.sparse_tensor)
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            is_float = attr.name.startswith("value_float")
            values = np.asarray(onnx.helper.get_attribute_value(attr), np.float32 if is_float else np.int64)
            return Stored(values, values.dtype.name, values.size)
    return None


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Tensor name -> (node, input index) of each reader, in every graph."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for graph in proto_graphs(model.graph):
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name:
                    readers.setdefault(name, []).append((node, index))
    return readers


# ---------------------------------------------------------------------------------- precision


def _precision(tensors: dict[str, Stored], consumers: dict) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, stored in tensors.items():
        readers = consumers.get(name, [])
        if readers and all(_is_sparse_index(node, index) for node, index in readers):
            continue
        int4 = next((_int4_elements(node) for node, index in readers if _is_int4_weight(node, index)), None)
        if int4 is not None:
            counts["int4"] += int4
        else:
            counts[stored.dtype] += stored.elements
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _is_sparse_index(node: onnx.NodeProto, index: int) -> bool:
    return node.domain == POLARIS and node.op_type.startswith("Sparse") and index in SPARSE_INDEX_INPUTS


def _is_int4_weight(node: onnx.NodeProto, index: int) -> bool:
    return index == 1 and (node.domain, node.op_type) in ((MICROSOFT, "MatMulNBits"), (POLARIS, "MatMulInt4"))


def _int4_elements(node: onnx.NodeProto) -> int:
    attrs = _ints(node)
    return attrs.get("N", 0) * attrs.get("K", 0)


def _ints(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------- sparsity


def weight_zeros(model: onnx.ModelProto, tensors: dict[str, Stored]) -> list[WeightZeros]:
    """The zeros of each weighted layer's weight (layers whose weight cannot be read are left out)."""
    producers = {out: node for g in proto_graphs(model.graph) for node in g.node for out in node.output}
    found = []
    for graph in proto_graphs(model.graph):
        for node in graph.node:
            zeros = _layer_weight_zeros(node, tensors, producers)
            if zeros is not None:
                found.append(zeros)
    return found


def _layer_weight_zeros(node, tensors, producers) -> WeightZeros | None:
    if len(node.input) < 2:
        return None
    if node.domain in STANDARD_DOMAINS and node.op_type in DENSE_WEIGHTED:
        return _dense_weight_zeros(node.input[1], tensors, producers)
    if node.domain == POLARIS and node.op_type in ("QMatMul", "QGemm"):
        return _zeros_of(tensors.get(node.input[1]))
    if node.domain == POLARIS and node.op_type.startswith("Sparse"):
        return _sparse_op_zeros(node, tensors.get(node.input[1]))
    if _is_int4_weight(node, 1):
        return _int4_zeros(node, tensors)
    return None


def _dense_weight_zeros(name: str, tensors, producers) -> WeightZeros | None:
    """A float weight, or the quantized weight a DequantizeLinear turns into it (zero: code == zp)."""
    if name in tensors:
        return _zeros_of(tensors[name]) if _is_float(tensors[name]) else None
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in tensors:
        return None
    codes = tensors[node.input[0]].values
    if codes is None:
        return None
    zero_point = _zero_point(node, tensors, codes)
    zeros = int(np.count_nonzero(codes.astype(np.int32) == zero_point))
    return WeightZeros(codes.size, zeros)


def _zero_point(node: onnx.NodeProto, tensors, codes: np.ndarray) -> np.ndarray | int:
    """The DequantizeLinear zero point broadcast against `codes` (per tensor or along `axis`)."""
    if len(node.input) < 3 or not node.input[2] or tensors.get(node.input[2]) is None:
        return 0
    zero_point = tensors[node.input[2]].values
    if zero_point is None or zero_point.size == 1:
        return 0 if zero_point is None else int(zero_point.reshape(-1)[0])
    axis = _ints(node).get("axis", 1) % codes.ndim
    shape = [1] * codes.ndim
    shape[axis] = zero_point.size
    return zero_point.astype(np.int32).reshape(shape)


def _is_float(stored: Stored) -> bool:
    return stored.values is not None and stored.values.dtype.kind == "f"


def _zeros_of(stored: Stored | None) -> WeightZeros | None:
    if stored is None or stored.values is None:
        return None
    values = stored.values
    return WeightZeros(values.size, values.size - int(np.count_nonzero(values)))


def _sparse_op_zeros(node: onnx.NodeProto, data: Stored | None) -> WeightZeros | None:
    shape = _ints(node).get("shape")
    if data is None or data.values is None or not shape:
        return None
    dense = math.prod(shape)
    return WeightZeros(dense, dense - int(np.count_nonzero(data.values)))


def _int4_zeros(node: onnx.NodeProto, tensors) -> WeightZeros | None:
    """Codes equal to their block's zero point (8 when the op has none), padding left out."""
    from polaris_opt.int4 import num_blocks, unpack_nibbles

    attrs = _ints(node)
    packed = tensors.get(node.input[1])
    if packed is None or packed.values is None or not {"N", "K", "block_size"} <= set(attrs):
        return None
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    blocks = num_blocks(k, block)
    codes = unpack_nibbles(packed.values.reshape(n, blocks, -1), block)
    zero_points = _int4_zero_points(node, tensors, n, blocks)
    if zero_points is None:
        return None
    equal = (codes == zero_points[:, :, None]).reshape(n, -1)[:, :k]
    return WeightZeros(n * k, int(np.count_nonzero(equal)))


def _int4_zero_points(node, tensors, n: int, blocks: int) -> np.ndarray | None:
    """[N, blocks] zero points: packed uint8 nibbles, or 8 when absent; None for other kinds."""
    from polaris_opt.int4 import unpack_nibbles

    index = INT4_ZERO_POINT_INPUT
    if len(node.input) <= index or not node.input[index]:
        return np.full((n, blocks), INT4_ZERO_POINT_DEFAULT, np.uint8)
    stored = tensors.get(node.input[index])
    if stored is None or stored.values is None or stored.values.dtype != np.uint8:
        return None
    return unpack_nibbles(stored.values.reshape(n, -1), blocks)
