"""ONNX model ⇄ graphsurgeon graph: import, and export in full or as a skeleton without the big
weights' payloads.

Import densifies `Constant(sparse_value)` nodes, which graphsurgeon would silently drop.

Both exports hand graphsurgeon's exporter *shells* for the big weights: TensorProtos of their
name, type and dims alone. graphsurgeon's own export copies every weight twice (into a graph,
then the graph into a model); `to_model` instead copies each payload once, into its shell.

Checking structure (onnx.checker, strict shape inference) and inferring shapes read every
weight's type and dims, but its values only for small shape-like tensors (Reshape shapes,
Resize scales). A skeleton (`skeleton_model`) therefore keeps the shells and declares them as
top-level graph inputs of the same name, type and dims, so checking it copies no payload and
the skeleton of a model above protobuf's 2 GB limit stays small. Sub-graph weights become
top-level inputs too: graphsurgeon exports a weight into every graph whose nodes read it, so
lifting one lets no node read a name it could not read before. The one fact a skeleton cannot
show, whether each payload left out fits its dims and type, `tensor_problem` checks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from polaris_opt.proto import attr_graphs, proto_graphs, proto_nodes
from polaris_opt.surgery import iter_graphs

BIG_WEIGHT_ELEMENTS = 1024  # larger weights are exported as shells

# Element sizes of the types whose raw_data `tensor_problem` measures itself; other types
# (strings, 4-bit, complex) and typed fields go to onnx.checker.check_tensor.
_T = onnx.TensorProto
_RAW_ITEMSIZE = {
    dtype: onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize
    for dtype in (_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.DOUBLE, _T.BOOL)
    + (_T.INT8, _T.UINT8, _T.INT16, _T.UINT16, _T.INT32, _T.UINT32, _T.INT64, _T.UINT64)
}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


# --------------------------------------------------------------------------------- import


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """The IR every pass works on."""
    sparse_constants = [node for node in proto_nodes(model.graph) if _sparse_value(node) is not None]
    if sparse_constants:
        # graphsurgeon drops a Constant's `sparse_value` on import, leaving a node with no value.
        model = _with_dense_constants(model)
    return gs.import_onnx(model)


def _sparse_value(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    return next((attr for attr in node.attribute if attr.name == "sparse_value"), None)


def _with_dense_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    for node in proto_nodes(dense.graph):
        attr = _sparse_value(node)
        if attr is not None:
            value = onnx.numpy_helper.from_array(densify(attr.sparse_tensor), node.output[0])
            node.attribute.remove(attr)
            node.attribute.append(onnx.helper.make_attribute("value", value))
    return dense


def densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a SparseTensorProto (COO indices, linear [NNZ] or [NNZ, rank])."""
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(indices.T, tuple(sparse.dims))
    dense[indices] = values
    return dense.reshape(tuple(sparse.dims))


# --------------------------------------------------------------------------------- export


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export `graph`, carrying over what graphsurgeon does not keep (metadata, docs, IR version)."""
    weights = hollowed_weights(graph)
    model = _export_hollow(graph, template, weights.values())
    for g in proto_graphs(model.graph):
        for tensor in g.initializer:
            if tensor.name in weights:
                tensor.CopyFrom(OnnxExporter.export_tensor_proto(weights[tensor.name]))
    return model


def skeleton_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """`to_model(graph, template)` with every weight of `hollowed_weights` a typed graph input."""
    weights = hollowed_weights(graph)
    model = _export_hollow(graph, template, weights.values())
    inputs: dict[str, onnx.ValueInfoProto] = {}
    for g in proto_graphs(model.graph):
        for tensor in g.initializer:
            if tensor.name in weights:
                typed = onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                inputs.setdefault(tensor.name, typed)
        kept = [tensor for tensor in g.initializer if tensor.name not in weights]
        del g.initializer[:]
        g.initializer.extend(kept)
    model.graph.input.extend(inputs.values())
    return model


def hollowed_weights(graph: gs.Graph) -> dict[str, gs.Constant]:
    """The big weights both exports shell, by name, in `graph` and its sub-graphs.

    Only a weight that is the one tensor going by its name, and whose name nothing declares
    otherwise (a graph input or output, a node output), so that a shell is found by its name
    and a skeleton names exactly what the full export names.
    """
    holders: dict[str, set[int]] = defaultdict(set)  # name -> ids of the tensors that go by it
    declared: set[str] = set()
    constants: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        declared.update(t.name for t in [*g.inputs, *g.outputs])
        for node in g.nodes:
            declared.update(t.name for t in node.outputs)
            for tensor in [*node.inputs, *node.outputs]:
                holders[tensor.name].add(id(tensor))
                if isinstance(tensor, gs.Constant):
                    constants[id(tensor)] = tensor
    return {
        t.name: t
        for t in constants.values()
        if len(holders[t.name]) == 1 and t.name not in declared and _is_big(t)
    }


def _is_big(weight: gs.Constant) -> bool:
    values = weight._values  # not `.values`: that would read a lazily loaded payload into numpy
    if isinstance(values, SparseValues):
        return False  # exported as a sparse initializer, which a shell cannot stand in for
    if isinstance(values, LazyValues) and values.tensor.data_location == _T.EXTERNAL:
        return False  # its payload is in a side file already
    if not isinstance(values, LazyValues) and values.dtype == object:
        return False  # strings: no raw payload to leave out
    return math.prod(values.shape) > BIG_WEIGHT_ELEMENTS


def _export_hollow(
    graph: gs.Graph, template: onnx.ModelProto | None, weights: Iterable[gs.Constant]
) -> onnx.ModelProto:
    with _exported_as_shells(weights):
        model = gs.export_onnx(graph, do_type_check=False)
    if template is not None:
        model.ir_version = template.ir_version
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
        model.domain = template.domain
        model.model_version = template.model_version
        model.doc_string = template.doc_string
        model.metadata_props.extend(template.metadata_props)
    _dedupe_subgraph_initializers(model.graph, outer=set())
    return model


@contextmanager
def _exported_as_shells(weights: Iterable[gs.Constant]) -> Iterator[None]:
    """While open, each weight exports as a TensorProto of its name, type and dims alone."""
    saved = [(weight, weight._values) for weight in weights]
    try:
        for weight, values in saved:
            weight._values = LazyValues(_shell(weight, values))
        yield
    finally:
        for weight, values in saved:
            weight._values = values


def _shell(weight: gs.Constant, values) -> onnx.TensorProto:
    # The type the full export writes: a lazily loaded proto keeps its own, an array is
    # converted to the weight's export dtype.
    if isinstance(values, LazyValues):
        data_type, dims = values.tensor.data_type, values.tensor.dims
    else:
        data_type, dims = dtype_to_onnx(weight.export_dtype), values.shape
    return onnx.TensorProto(name=weight.name, data_type=data_type, dims=dims)


def _dedupe_subgraph_initializers(graph: onnx.GraphProto, outer: set[str]) -> None:
    """Undo graphsurgeon's copies of outer-scope weights into every sub-graph that reads them.

    A weight already visible from an enclosing graph is dropped from the sub-graph; one copied
    into several sibling sub-graphs (both branches of an If) moves up once into this graph.
    """
    visible = outer | {tensor.name for tensor in graph.initializer}
    children = [sub for node in graph.node for attr in node.attribute for sub in attr_graphs(attr)]
    seen: dict[str, onnx.TensorProto] = {}
    shared = set()
    for sub in children:
        for tensor in sub.initializer:
            shared.update([tensor.name] if tensor.name in seen else [])
            seen.setdefault(tensor.name, tensor)
    for name in sorted(shared - visible):
        graph.initializer.append(seen[name])
    visible |= shared
    for sub in children:
        for tensor in [t for t in sub.initializer if t.name in visible]:
            sub.initializer.remove(tensor)
        _dedupe_subgraph_initializers(sub, visible)


# ----------------------------------------------------------------------------- payloads


def payloads_left_out(graph: gs.Graph) -> list[onnx.TensorProto]:
    """The TensorProtos whose payloads the skeleton of `graph` leaves out, to be measured.

    Weights held as arrays are not listed: an array always fits, as the export writes exactly
    its bytes with its shape as dims. A lazily loaded TensorProto (read from the input, or built
    by a pass) may not.
    """
    weights = hollowed_weights(graph).values()
    return [w._values.tensor for w in weights if isinstance(w._values, LazyValues)]


def tensor_problem(tensor: onnx.TensorProto) -> str | None:
    """What onnx.checker would say of `tensor`'s payload, or of oversized raw data; None if sound."""
    itemsize = _RAW_ITEMSIZE.get(tensor.data_type)
    typed = any(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
    if itemsize is None or typed or not tensor.HasField("raw_data"):
        return _checker_problem(tensor)
    expected = math.prod(tensor.dims) * itemsize
    size = len(tensor.raw_data)  # a copy under protobuf's upb backend: callers check each tensor once
    if size != expected:
        return f"tensor '{tensor.name}' holds {size} bytes of raw_data; its dims and type need {expected}"
    return None


def _checker_problem(tensor: onnx.TensorProto) -> str | None:
    try:
        onnx.checker.check_tensor(tensor)
    except onnx.checker.ValidationError as exc:
        return str(exc).strip().splitlines()[0]
    return None
