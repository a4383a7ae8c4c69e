"""What is in an ONNX model: opsets, ops, parameters by dtype, initializers, inputs and outputs.

`summarize` returns plain data (JSON-ready); `polaris-opt inspect` renders it. It reads the
protobuf directly and converts each tensor to NumPy once, so a model of a few hundred MB is
summarized in well under a second (no graphsurgeon import of the whole graph).

Prunable weights (the weight input of Conv, ConvTranspose, Gemm and MatMul) are summarised
apart: how many of their elements are zero, and for each one with zeros the pattern they form
in the weight's matrix view [output features, reduction] (polaris_opt.pruning.targets):
"2:4" or "4:8" (at most N nonzeros in every M consecutive entries of a row, the last partial
group padded with zeros), "block:RxC" (every aligned R×C block all zero or all nonzero) or
"unstructured".
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from polaris_opt.proto import proto_graphs

DEFAULT_DOMAINS = ("", "ai.onnx")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# N:M widths tried, narrowest first, and how far above 1 - N/M the zero fraction may be (zeros
# the weight had before pruning).
NM_WIDTHS = (4, 8, 16)
NM_SLACK = 0.05
# Block sides tried along each axis of the matrix view.
BLOCK_SIDES = (2, 4, 8, 16, 32)
# Rows checked first, before a whole weight, when looking for a pattern.
SAMPLE_ROWS = 64
# Types narrower than a byte are packed; bytes on disk are elements * bits / 8, not itemsize.
# (The 2- and 6-bit types only exist in newer onnx releases, hence the getattr.)
_SUBBYTE_BITS = {
    getattr(onnx.TensorProto, type_name): bits
    for type_name, bits in [
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    ]
    if hasattr(onnx.TensorProto, type_name)
}


def summarize(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything `polaris-opt inspect` shows, as plain JSON-ready data."""
    graph = model.graph
    main_ops = Counter(op_key(node) for node in graph.node)
    sub_ops = Counter(op_key(node) for sub in _subgraphs(graph) for node in sub.node)
    tensors = sorted(_tensor_rows(graph), key=lambda row: row["bytes"], reverse=True)
    initializer_names = {t.name for t in graph.initializer}
    return {
        "model": _model_info(model),
        "file": str(path) if path is not None else None,
        "file_bytes": Path(path).stat().st_size if path is not None else None,
        "inputs": [_value_row(v) for v in graph.input if v.name not in initializer_names],
        "outputs": [_value_row(v) for v in graph.output],
        "nodes": len(graph.node),
        "subgraph_nodes": sum(sub_ops.values()),
        "ops": dict(main_ops.most_common()),
        "subgraph_ops": dict(sub_ops.most_common()),
        "parameters": _parameter_totals(tensors),
        "weight_sparsity": weight_sparsity(tensors),
        "initializers": tensors,
    }


def op_key(node: onnx.NodeProto) -> str:
    """ "Conv" for the default ONNX domain, "com.microsoft::Attention" for any other."""
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _model_info(model: onnx.ModelProto) -> dict[str, Any]:
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return {
        "ir_version": model.ir_version,
        "opsets": {
            (o.domain if o.domain not in DEFAULT_DOMAINS else "ai.onnx"): o.version
            for o in model.opset_import
        },
        "producer": producer or None,
        "graph_name": model.graph.name,
        "metadata_props": {p.key: p.value for p in model.metadata_props},
    }


# ------------------------------------------------------------------------- inputs and outputs


def _value_row(value: onnx.ValueInfoProto) -> dict[str, Any]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        # Sequences, maps and optionals: name the kind, the element type is rarely what users need.
        return {"name": value.name, "dtype": kind or "unknown", "shape": None}
    tensor_type = value.type.tensor_type
    shape = [_dim(d) for d in tensor_type.shape.dim] if tensor_type.HasField("shape") else None
    return {"name": value.name, "dtype": dtype_name(tensor_type.elem_type), "shape": shape}


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or "?"


def dtype_name(data_type: int) -> str:
    """NumPy-style name of an ONNX element type: "float32", "int8", "bfloat16", "string"."""
    if data_type == onnx.TensorProto.STRING:
        return "string"
    if data_type == onnx.TensorProto.UNDEFINED:
        return "undefined"
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).name
    except (KeyError, ValueError):
        return onnx.TensorProto.DataType.Name(data_type).lower()


# --------------------------------------------------------------------------------- parameters


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every graph nested in `graph`'s nodes (If branches, Loop and Scan bodies), recursively."""
    return itertools.islice(proto_graphs(graph), 1, None)


def _tensor_rows(graph: onnx.GraphProto) -> Iterator[dict[str, Any]]:
    for level, g in [(False, graph)] + [(True, sub) for sub in _subgraphs(graph)]:
        readers = _weight_readers(g)
        for tensor in g.initializer:
            yield _dense_row(tensor, tensor.name, "initializer", level, readers.get(tensor.name))
        for sparse in g.sparse_initializer:
            yield _sparse_row(sparse, level, readers.get(sparse.values.name))
        for node in g.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                yield from _constant_rows(node, level, readers.get(node.output[0] if node.output else ""))


class _Reader:
    """The op type and attributes of the layer reading a weight: what `targets.to_matrix` needs
    to view it as [output features, reduction] without building a graphsurgeon graph."""

    def __init__(self, node: onnx.NodeProto):
        self.op = node.op_type
        self.attrs = {
            a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"
        }


def _weight_readers(graph: onnx.GraphProto) -> dict[str, _Reader]:
    """Weight tensor name -> its first reader, for the weight input of each layer of `graph`."""
    readers: dict[str, _Reader] = {}
    for node in graph.node:
        if node.op_type in WEIGHTED_OPS and node.domain in DEFAULT_DOMAINS and len(node.input) > 1:
            readers.setdefault(node.input[1], _Reader(node))
    return readers


def _dense_row(
    tensor: onnx.TensorProto, name: str, source: str, in_subgraph: bool, reader: _Reader | None = None
) -> dict[str, Any]:
    elements = math.prod(tensor.dims)
    values = _readable_values(tensor)
    nonzeros = None if values is None else int(np.count_nonzero(values))
    return {
        "name": name,
        "shape": list(tensor.dims),
        "dtype": dtype_name(tensor.data_type),
        "elements": elements,
        "bytes": _stored_bytes(tensor.data_type, elements),
        "sparsity": _zero_fraction(nonzeros, elements),
        "source": source,
        "in_subgraph": in_subgraph,
        "prunable": _is_prunable(reader, values),
        "pattern": _pattern(reader, values) if nonzeros is not None and nonzeros < elements else None,
    }


def _sparse_row(sparse: onnx.SparseTensorProto, in_subgraph: bool, reader: _Reader | None) -> dict[str, Any]:
    # Parameters are counted dense (what the layer holds); bytes are what the file stores.
    row = _dense_row(sparse.values, sparse.values.name, "sparse_initializer", in_subgraph)
    dense_elements = math.prod(sparse.dims)
    index_bytes = _stored_bytes(sparse.indices.data_type, math.prod(sparse.indices.dims))
    dense = _densify(sparse) if reader is not None else None
    row.update(
        shape=list(sparse.dims),
        elements=dense_elements,
        bytes=row["bytes"] + index_bytes,
        sparsity=_zero_fraction(_count_nonzeros(sparse.values), dense_elements),
        prunable=_is_prunable(reader, dense),
        pattern=_pattern(reader, dense),
    )
    return row


def _densify(sparse: onnx.SparseTensorProto) -> np.ndarray | None:
    """The dense array a sparse tensor stands for (indices linear [NNZ] or coordinates [NNZ, rank])."""
    values = _readable_values(sparse.values)
    if values is None:
        return None
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(math.prod(sparse.dims), dtype=values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
    dense[flat] = values.reshape(-1)
    return dense.reshape(tuple(sparse.dims))


def _constant_rows(
    node: onnx.NodeProto, in_subgraph: bool, reader: _Reader | None
) -> Iterator[dict[str, Any]]:
    name = node.output[0] if node.output else node.name
    for attr in node.attribute:
        if attr.name == "value":
            yield _dense_row(attr.t, name, "constant", in_subgraph, reader)
        elif attr.name == "sparse_value":
            row = _sparse_row(attr.sparse_tensor, in_subgraph, reader)
            yield {**row, "name": name, "source": "constant"}
        elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            # Scalar/list forms: rebuild the tensor the Constant produces so it is counted alike.
            values = onnx.helper.get_attribute_value(attr)
            is_float = attr.name.startswith("value_float")
            array = np.asarray(values, dtype=np.float32 if is_float else np.int64)
            yield _dense_row(numpy_helper.from_array(array), name, "constant", in_subgraph)


# ----------------------------------------------------------------------------- weight sparsity


def _is_prunable(reader: _Reader | None, values: np.ndarray | None) -> bool:
    """A float weight of a layer, with the rank its op views as a matrix."""
    if reader is None or values is None or values.dtype.kind != "f":
        return False
    return values.ndim == 2 if reader.op in ("Gemm", "MatMul") else values.ndim >= 3


def _pattern(reader: _Reader | None, values: np.ndarray | None) -> str | None:
    if not _is_prunable(reader, values):
        return None
    from polaris_opt.pruning.targets import to_matrix

    return sparsity_pattern(to_matrix(reader, values))


def sparsity_pattern(matrix: np.ndarray) -> str | None:
    """The pattern the zeros of a [rows, cols] matrix form: "2:4", "block:4x4", "unstructured";
    None when it has no zeros. N:M is tried first, so a 2:4 weight is not also called a block."""
    zero = matrix == 0
    zeros = int(np.count_nonzero(zero))
    if zeros == 0:
        return None
    if zeros == zero.size:
        return "unstructured"
    return _nm_pattern(~zero, zeros / zero.size) or _block_pattern(zero) or "unstructured"


def _nm_pattern(kept: np.ndarray, zero_fraction: float) -> str | None:
    """ "N:M" when every group of M consecutive entries of a row keeps at most N ≤ M/2, and the
    zeros are about what N:M makes (a 90 % unstructured weight may keep ≤ 1 of 16 by chance)."""
    for width in NM_WIDTHS:
        if width > kept.shape[1]:
            break
        # The first rows refute most candidates at a fraction of the cost of the whole matrix.
        if _most_kept(kept[:SAMPLE_ROWS], width) > width // 2:
            continue
        most = _most_kept(kept, width)
        if 0 < most <= width // 2 and zero_fraction <= 1 - most / width + NM_SLACK:
            return f"{most}:{width}"
    return None


def _most_kept(kept: np.ndarray, width: int) -> int:
    """The most entries any group of `width` consecutive columns of a row keeps (padding: none)."""
    padded = np.pad(kept, ((0, 0), (0, -kept.shape[1] % width)))
    return int(padded.reshape(kept.shape[0], -1, width).sum(axis=2, dtype=np.int32).max())


def _block_pattern(zero: np.ndarray) -> str | None:
    """ "block:RxC" with the largest R and C whose aligned blocks are each all zero or all nonzero.

    Uniform along rows in segments of C and along columns in segments of R means uniform in
    R×C blocks, so each side is found alone; a partial block at the edge counts its real entries.
    """
    height, width = _uniform_side(zero.T), _uniform_side(zero)
    return f"block:{height}x{width}" if height * width > 1 else None


def _uniform_side(zero: np.ndarray) -> int:
    """The largest side in BLOCK_SIDES such that every aligned segment of a row is all zero or
    has no zero (1 when none is). Uniform segments of 2·s are made of uniform segments of s."""
    best = 1
    for side in BLOCK_SIDES:
        if side > zero.shape[1]:
            break
        if not (_uniform(zero[:SAMPLE_ROWS], side) and _uniform(zero, side)):
            break
        best = side
    return best


def _uniform(zero: np.ndarray, side: int) -> bool:
    cols = zero.shape[1]
    starts = np.arange(0, cols, side)
    counts = np.add.reduceat(zero, starts, axis=1, dtype=np.int32)
    lengths = np.diff(np.append(starts, cols))
    return bool(np.all((counts == 0) | (counts == lengths)))


def weight_sparsity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Zeros among the prunable weights: tensors, elements, zeros and their fraction."""
    weights = [row for row in rows if row["prunable"] and row["sparsity"] is not None]
    elements = sum(row["elements"] for row in weights)
    zeros = sum(round(row["sparsity"] * row["elements"]) for row in weights)
    return {
        "tensors": len(weights),
        "elements": elements,
        "zeros": zeros,
        "sparsity": zeros / elements if elements else 0.0,
    }


def _stored_bytes(data_type: int, elements: int) -> int:
    if data_type == onnx.TensorProto.STRING:
        return 0  # variable length; not a numeric parameter
    if data_type in _SUBBYTE_BITS:
        return math.ceil(elements * _SUBBYTE_BITS[data_type] / 8)
    return elements * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _readable_values(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The tensor as NumPy, or None where unreadable (strings, unloaded external data)."""
    if tensor.data_type == onnx.TensorProto.STRING or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(tensor)


def _count_nonzeros(tensor: onnx.TensorProto) -> int | None:
    """Elements that are not exactly zero, or None where unreadable."""
    values = _readable_values(tensor)
    return None if values is None else int(np.count_nonzero(values))


def _zero_fraction(nonzeros: int | None, elements: int) -> float | None:
    if nonzeros is None:
        return None
    return (elements - nonzeros) / elements if elements else 0.0


def _parameter_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_dtype: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = by_dtype.setdefault(row["dtype"], {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += row["elements"]
        entry["bytes"] += row["bytes"]
    constants = [row for row in rows if row["source"] == "constant"]
    return {
        "elements": sum(row["elements"] for row in rows),
        "bytes": sum(row["bytes"] for row in rows),
        "tensors": len(rows),
        "by_dtype": dict(sorted(by_dtype.items(), key=lambda item: -item[1]["bytes"])),
        "in_constant_nodes": {
            "tensors": len(constants),
            "elements": sum(row["elements"] for row in constants),
            "bytes": sum(row["bytes"] for row in constants),
        },
    }
