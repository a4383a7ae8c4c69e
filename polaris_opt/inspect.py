"""What is in an ONNX model: opsets, ops, parameters by dtype, initializers, inputs and outputs.

`summarize` returns plain data (JSON-ready); `polaris-opt inspect` renders it. It reads the
protobuf directly and converts each tensor to NumPy once, so a model of a few hundred MB is
summarized in well under a second (no graphsurgeon import of the whole graph).
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
        for tensor in g.initializer:
            yield _dense_row(tensor, tensor.name, "initializer", level)
        for sparse in g.sparse_initializer:
            yield _sparse_row(sparse, level)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                yield from _constant_rows(node, level)


def _dense_row(tensor: onnx.TensorProto, name: str, source: str, in_subgraph: bool) -> dict[str, Any]:
    elements = math.prod(tensor.dims)
    nonzeros = _count_nonzeros(tensor)
    return {
        "name": name,
        "shape": list(tensor.dims),
        "dtype": dtype_name(tensor.data_type),
        "elements": elements,
        "bytes": _stored_bytes(tensor.data_type, elements),
        "sparsity": _zero_fraction(nonzeros, elements),
        "source": source,
        "in_subgraph": in_subgraph,
    }


def _sparse_row(sparse: onnx.SparseTensorProto, in_subgraph: bool) -> dict[str, Any]:
    # Parameters are counted dense (what the layer holds); bytes are what the file stores.
    row = _dense_row(sparse.values, sparse.values.name, "sparse_initializer", in_subgraph)
    dense_elements = math.prod(sparse.dims)
    index_bytes = _stored_bytes(sparse.indices.data_type, math.prod(sparse.indices.dims))
    row.update(
        shape=list(sparse.dims),
        elements=dense_elements,
        bytes=row["bytes"] + index_bytes,
        sparsity=_zero_fraction(_count_nonzeros(sparse.values), dense_elements),
    )
    return row


def _constant_rows(node: onnx.NodeProto, in_subgraph: bool) -> Iterator[dict[str, Any]]:
    name = node.output[0] if node.output else node.name
    for attr in node.attribute:
        if attr.name == "value":
            yield _dense_row(attr.t, name, "constant", in_subgraph)
        elif attr.name == "sparse_value":
            yield {**_sparse_row(attr.sparse_tensor, in_subgraph), "name": name, "source": "constant"}
        elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            # Scalar/list forms: rebuild the tensor the Constant produces so it is counted alike.
            values = onnx.helper.get_attribute_value(attr)
            is_float = attr.name.startswith("value_float")
            array = np.asarray(values, dtype=np.float32 if is_float else np.int64)
            yield _dense_row(numpy_helper.from_array(array), name, "constant", in_subgraph)


def _stored_bytes(data_type: int, elements: int) -> int:
    if data_type == onnx.TensorProto.STRING:
        return 0  # variable length; not a numeric parameter
    if data_type in _SUBBYTE_BITS:
        return math.ceil(elements * _SUBBYTE_BITS[data_type] / 8)
    return elements * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _count_nonzeros(tensor: onnx.TensorProto) -> int | None:
    """Elements that are not exactly zero, or None where unreadable (strings, unloaded external data)."""
    if tensor.data_type == onnx.TensorProto.STRING or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return int(np.count_nonzero(numpy_helper.to_array(tensor)))


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
