"""What pruning did to a model: per-layer rows, totals, and how far the outputs moved.

`build_prune_report` reads the pruning pass's `details` (which layers, which pattern and method,
what was skipped and why) and measures the rest itself on the two models: nonzeros and bytes
from the weights, the bytes CSR storage would need (float32 values, int32 column indices and
row pointers, rows = output features), and the SQNR of every pruned layer's output and of the
model's outputs against the dense model on a bounded sample of the calibration data (seeded
random inputs when there is none). Both models run once per batch, each capturing its layer
outputs as extra graph outputs (polaris_opt.capture), so memory holds one batch at a time.

Structured pruning makes layer outputs narrower; their SQNR compares the channels (or heads)
that remain with the same channels of the dense output.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from polaris_opt.fidelity import Agreement, overall
from polaris_opt.passes_api import Progress, no_progress
from polaris_opt.quantization import FIDELITY_BATCHES

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
RANDOM_BATCHES = 4
INDEX_BYTES = 4  # int32 column indices and row pointers
VALUE_BYTES = 4  # float32 values


def build_prune_report(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    pipeline_text: str,
    pass_reports: list,
    batches: Any = None,
    eval_data: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
    threads: int = 1,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """The report of one pruning run; `dense` is the model the pruning pass started from.

    `pass_reports` are the compiler's PassReports (the pruning pass last); `batches` is a
    CalibrationSource, a list of feeds, or None (random inputs). `eval_data` = (inputs, labels)
    adds top-1 accuracy before and after.
    """
    pruning = _pruning_report(pass_reports)
    details = pruning.details if pruning is not None else {}
    before, after = ModelIndex(dense), ModelIndex(pruned)
    if "groups" in details:
        layers = [_structured_row(name, group, before, after) for name, group in _group_layers(details)]
        # Graph order, as the unstructured rows come: the groups list producers before consumers.
        position = {node.name: index for index, node in enumerate(pruned.graph.node)}
        layers = sorted((row for row in layers if row is not None), key=lambda row: position[row["layer"]])
    else:
        layers = [_unstructured_row(row, before, after) for row in details.get("layers", [])]
    fidelity, layer_sqnr, data = measure(
        dense, pruned, layers, details, batches, threads=threads, progress=progress
    )
    layers = [_ordered({**row, "sqnr_db": layer_sqnr.get(row["layer"])}) for row in layers]
    report: dict[str, Any] = {
        "pipeline": pipeline_text,
        "kind": _kind(pruning),
        "changed": bool(pruning.modified) if pruning is not None else False,
        "layers": layers,
        "skipped": list(details.get("skipped", [])),
        "totals": totals(layers, dense, pruned),
        "fidelity": {**fidelity.as_dict(), "data": data},
        "passes": [_pass_row(r) for r in pass_reports],
    }
    for key in ("groups", "correction"):
        if key in details:
            report[key] = details[key]
    if eval_data is not None:
        from polaris_opt.quantization import measure_accuracy

        report["accuracy"] = measure_accuracy(dense, pruned, eval_data, threads=threads)
    return report


# The keys of a layer row, in the order --json shows them; others (correction) follow.
ROW_KEYS = (
    "layer",
    "nodes",
    "weight",
    "op",
    "group",
    "pattern",
    "method",
    "shape_before",
    "shape_after",
    "params_before",
    "params_after",
    "nonzeros_before",
    "nonzeros_after",
    "sparsity_before",
    "sparsity_after",
    "bytes_before",
    "bytes_after",
    "csr_bytes",
    "output",
    "sqnr_db",
)


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    ordered = {key: row[key] for key in ROW_KEYS if key in row}
    return ordered | {key: value for key, value in row.items() if key not in ordered}


def _pruning_report(pass_reports: list):
    """The report of the pruning pass: the last `prune` or `prune-structured` step."""
    found = [r for r in pass_reports if r.step.split("{")[0] in ("prune", "prune-structured")]
    return found[-1] if found else None


def _kind(pruning) -> str | None:
    """ "unstructured" for `prune` (whatever its pattern), else the structured kind (channel, head...)."""
    if pruning is None:
        return None
    from polaris_opt.pipeline import Pipeline

    (_, pass_), *_ = Pipeline.parse(pruning.step).passes()
    kind = getattr(pass_, "kind", "unstructured")
    return str(getattr(kind, "value", kind))  # the structured kind is an Enum


def _pass_row(report) -> dict[str, Any]:
    # The pruning pass's details are the report's layers: not repeated per pass.
    row = asdict(report)
    row.pop("details", None)
    return row


# ---------------------------------------------------------------------------- the two models


@dataclass
class ModelIndex:
    """A model's main-graph nodes by name and constant tensors by name, read from the protobuf."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.nodes = {node.name: node for node in graph.node if node.name}
        self.tensors = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.tensors[node.output[0]] = value

    def weight(self, name: str) -> np.ndarray | None:
        tensor = self.tensors.get(name)
        return numpy_helper.to_array(tensor) if tensor is not None else None

    def node_weight(self, node_name: str) -> tuple[onnx.NodeProto, str, np.ndarray] | None:
        """(node, weight name, weight) of a layer, or None when the node or its weight is not here."""
        node = self.nodes.get(node_name)
        if node is None or len(node.input) < 2:
            return None
        values = self.weight(node.input[1])
        return None if values is None else (node, node.input[1], values)


def csr_bytes(nonzeros: int, rows: int) -> int:
    """Bytes of CSR storage: float32 values and int32 column indices per nonzero, rows+1 int32 pointers."""
    return nonzeros * (VALUE_BYTES + INDEX_BYTES) + (rows + 1) * INDEX_BYTES


def matrix_rows(node: onnx.NodeProto, shape: list[int]) -> int:
    """Output features of the layer (the rows of its matrix view in polaris_opt.pruning.targets)."""
    if node.op_type == "Conv":
        return shape[0]
    if node.op_type == "ConvTranspose":
        return shape[1]
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    if node.op_type == "Gemm" and trans_b:
        return shape[0]
    return shape[1] if len(shape) > 1 else 1


def _counts(prefix: str, values: np.ndarray) -> dict[str, Any]:
    nonzeros = int(np.count_nonzero(values))
    return {
        f"shape_{prefix}": list(values.shape),
        f"params_{prefix}": int(values.size),
        f"nonzeros_{prefix}": nonzeros,
        f"bytes_{prefix}": int(values.nbytes),
    }


def _sparsities(row: dict[str, Any]) -> dict[str, Any]:
    """Sparsity before and after, both over the dense layer's size: removed weights count as zeros."""
    size = row["params_before"]
    row["sparsity_before"] = 1 - row["nonzeros_before"] / size if size else 0.0
    row["sparsity_after"] = 1 - row["nonzeros_after"] / size if size else 0.0
    return row


# ----------------------------------------------------------------------------- per-layer rows


def _unstructured_row(detail: dict[str, Any], before: ModelIndex, after: ModelIndex) -> dict[str, Any]:
    """A `prune` pass row with counts measured on the weights of both models (its own as fallback)."""
    row = {key: value for key, value in detail.items() if key not in ("shape", "params", "bytes", "sparsity")}
    dense, pruned = before.weight(detail["weight"]), after.weight(detail["weight"])
    fallback = {
        "shape": list(detail.get("shape", [])),
        "params": detail.get("params", 0),
        "bytes": detail.get("bytes", 0),
    }
    for prefix, values, nonzeros in (
        ("before", dense, detail.get("nonzeros_before", 0)),
        ("after", pruned, detail.get("nonzeros_after", 0)),
    ):
        if values is not None:
            row.update(_counts(prefix, values))
        else:  # the weight is gone from this model (unchanged output, renamed by clean-up)
            row.update({f"{key}_{prefix}": value for key, value in fallback.items()})
            row[f"nonzeros_{prefix}"] = nonzeros
    node = after.nodes.get(detail["layer"]) or before.nodes.get(detail["layer"])
    rows = matrix_rows(node, row["shape_after"]) if node is not None else row["shape_after"][0]
    row["csr_bytes"] = csr_bytes(row["nonzeros_after"], rows)
    row["output"] = node.output[0] if node is not None and node.output else None
    return _sparsities(row)


def _group_layers(details: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(layer name, its group) for every layer a structured group touched: the group whose
    channels the layer makes, else the first whose channels it reads."""
    seen: dict[str, dict[str, Any]] = {}
    for role in (("producers", "layers"), ("consumers",)):
        for group in details.get("groups", []):
            for name in [name for key in role for name in group.get(key, [])]:
                seen.setdefault(name, group)
    return list(seen.items())


def _structured_row(
    name: str, group: dict[str, Any], before: ModelIndex, after: ModelIndex
) -> dict[str, Any] | None:
    dense, pruned = before.node_weight(name), after.node_weight(name)
    if dense is None or pruned is None:
        return None  # not a weighted layer (or not one this report can find)
    node, weight, values = pruned
    row = {
        "layer": name,
        "nodes": [name],
        "weight": weight,
        "op": node.op_type,
        "group": group.get("group"),
        **_counts("before", dense[2]),
        **_counts("after", values),
    }
    row["csr_bytes"] = csr_bytes(row["nonzeros_after"], matrix_rows(node, row["shape_after"]))
    row["output"] = node.output[0] if node.output else None
    return _sparsities(row)


def totals(layers: list[dict[str, Any]], dense: onnx.ModelProto, pruned: onnx.ModelProto) -> dict[str, Any]:
    """Sums over the pruned layers, and over every float weight of each model."""
    summed = {
        key: sum(row[key] for row in layers)
        for key in (
            "params_before",
            "params_after",
            "nonzeros_before",
            "nonzeros_after",
            "bytes_before",
            "bytes_after",
            "csr_bytes",
        )
    }
    summed["layers"] = len(layers)
    _sparsities(summed)
    for prefix, model in (("before", dense), ("after", pruned)):
        params, nonzeros = float_weight_counts(model)
        summed[f"model_params_{prefix}"] = params
        summed[f"model_nonzeros_{prefix}"] = nonzeros
        summed[f"file_bytes_{prefix}"] = model.ByteSize()
    return summed


def float_weight_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(elements, nonzeros) of the model's float initializers and Constant values, sub-graphs included."""
    from polaris_opt.graph_io import iter_model_tensors

    params = nonzeros = 0
    for tensor in iter_model_tensors(model):
        if tensor.data_type in FLOAT_TYPES and tensor.data_location != onnx.TensorProto.EXTERNAL:
            values = numpy_helper.to_array(tensor)
            params += values.size
            nonzeros += int(np.count_nonzero(values))
    return params, nonzeros


# -------------------------------------------------------------------------------- fidelity


def fidelity_batches(batches: Any, session) -> tuple[list[dict[str, np.ndarray]], str]:
    """At most FIDELITY_BATCHES batches to measure on, and how the report names them; with no
    data, seeded random inputs from the declared shapes of `session`'s model."""
    from polaris_opt.calib_data import CalibrationSource
    from polaris_opt.numerics import sample_inputs

    if batches is None:
        feeds = [sample_inputs(session, seed=seed, dynamic_size=8) for seed in range(RANDOM_BATCHES)]
        return feeds, "random inputs"
    if isinstance(batches, CalibrationSource):
        feeds = list(itertools.islice(batches.batches(), FIDELITY_BATCHES))
        if batches.num_batches is not None and batches.num_batches <= FIDELITY_BATCHES:
            return feeds, "calibration data"
        return feeds, f"the first {FIDELITY_BATCHES} batches of the calibration data"
    return list(itertools.islice(iter(batches), FIDELITY_BATCHES)), "the given batches"


def measure(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    layers: list[dict[str, Any]],
    details: dict[str, Any],
    batches: Any,
    *,
    threads: int = 1,
    progress: Progress = no_progress,
) -> tuple[Agreement, dict[str, float], str]:
    """Model-output agreement (pooled over outputs), each layer's output SQNR against `dense`, and
    the name of the data measured on."""
    from polaris_opt.capture import with_outputs
    from polaris_opt.numerics import make_session

    outputs = [o.name for o in pruned.graph.output]
    wanted = {row["layer"]: row["output"] for row in layers if row.get("output")}
    captured = capturable(dense, pruned, [t for t in dict.fromkeys(wanted.values()) if t not in outputs])
    reference = make_session(with_outputs(dense, captured), threads=threads)
    candidate = make_session(with_outputs(pruned, captured), threads=threads)
    feeds, data = fidelity_batches(batches, reference)
    names = outputs + captured
    model_agreements = {name: Agreement() for name in outputs}
    layer_agreements = {layer: Agreement() for layer, tensor in wanted.items() if tensor in names}
    removals = _removals(details)
    measured: set[str] = set()
    with progress("measuring fidelity", len(feeds)) as advance:
        for batch in feeds:
            ref = dict(zip(names, reference.run(names, batch), strict=True))
            got = dict(zip(names, candidate.run(names, batch), strict=True))
            for name in outputs:
                model_agreements[name].add(ref[name], got[name])
            for layer, agreement in layer_agreements.items():
                aligned = align(ref[wanted[layer]], got[wanted[layer]], removals.get(layer))
                if aligned is not None:
                    agreement.add(*aligned)
                    measured.add(layer)
            advance(1)
    layer_sqnr = {layer: layer_agreements[layer].sqnr_db for layer in measured}
    return overall(model_agreements), layer_sqnr, data


def capturable(dense: onnx.ModelProto, pruned: onnx.ModelProto, names: list[str]) -> list[str]:
    """The `names` both models can output, typed. The types declared in the models are read first:
    clean-up's infer-shapes declares them all, and shape inference over a model of hundreds of MB
    costs seconds; only when some are undeclared does it run."""
    from polaris_opt.capture import tensor_types

    known = _declared_types(dense).keys() & _declared_types(pruned).keys()
    if not set(names) <= known:
        known = tensor_types(dense).keys() & tensor_types(pruned).keys()
    return [name for name in names if name in known]


def _declared_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    return {
        value.name: value.type.tensor_type.elem_type
        for value in (*graph.input, *graph.output, *graph.value_info)
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type
    }


@dataclass(frozen=True)
class Removal:
    """Which units (channels or heads) a structured group took out of a layer's output."""

    units: int  # units before pruning
    removed: tuple[int, ...]


def _removals(details: dict[str, Any]) -> dict[str, Removal]:
    """For each layer whose output a group narrowed, what was removed from it."""
    removals: dict[str, Removal] = {}
    for group in details.get("groups", []):
        units = group.get("channels_before", group.get("heads_before"))
        if units is None:
            continue
        removal = Removal(int(units), tuple(int(i) for i in group.get("removed", [])))
        for name in [*group.get("producers", []), *group.get("layers", [])]:
            removals.setdefault(name, removal)
    return removals


def align(ref: np.ndarray, got: np.ndarray, removal: Removal | None) -> tuple[np.ndarray, np.ndarray] | None:
    """`ref` and `got` with the same elements: the dense output without the removed units.

    A unit spans `size // units` consecutive entries of the narrowed axis (1 for a channel,
    the head size for a head). None when the shapes cannot be matched that way.
    """
    if ref.shape == got.shape:
        return ref, got
    differing = [axis for axis, (r, g) in enumerate(zip(ref.shape, got.shape, strict=False)) if r != g]
    if removal is None or ref.ndim != got.ndim or len(differing) != 1:
        return None
    axis = differing[0]
    size = ref.shape[axis]
    if size % removal.units:
        return None
    width = size // removal.units
    gone = {u * width + k for u in removal.removed for k in range(width)}
    kept = [i for i in range(size) if i not in gone]
    if len(kept) != got.shape[axis]:
        return None
    return np.take(ref, kept, axis=axis), got
