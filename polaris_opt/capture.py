"""Run a model over calibration batches and hand chosen intermediate tensors to the caller.

Calibration statistics, GPTQ Hessians, bias correction and sensitivity analysis all need the
values of tensors inside the model on real data. They all come from here: the model is copied
with those tensors added as graph outputs, one ONNX Runtime session is built, and each batch is
run once; the caller reduces each batch's tensors and drops them, so memory never grows with
the number of samples (DESIGN.md §8).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx

from polaris_opt.numerics import make_session
from polaris_opt.passes_api import Progress, no_progress

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor that shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an uninferable model still has its declared types
        inferred = model
    graph = inferred.graph
    types = {}
    for value_info in (*graph.input, *graph.output, *graph.value_info):
        if value_info.type.HasField("tensor_type"):
            types[value_info.name] = value_info.type.tensor_type.elem_type
    return types


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Names of the floating-point tensors the main graph computes or takes as input, in graph order.

    Weights (initializers, Constant outputs) are not activations; tensors inside If/Loop bodies
    are not reachable as outputs and are left out.
    """
    graph = model.graph
    types = tensor_types(model)
    weights = {t.name for t in graph.initializer}
    weights |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    names = [i.name for i in graph.input if i.name not in weights]
    names += [out for node in graph.node if node.op_type != "Constant" for out in node.output if out]
    seen: set[str] = set()
    wanted = []
    for name in names:
        if name not in seen and types.get(name) in FLOAT_TYPES:
            seen.add(name)
            wanted.append(name)
    return wanted


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (tensors of the main graph)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    # A graph input is read from the batch itself, never asked of the session.
    present = {o.name for o in exposed.graph.output} | {i.name for i in exposed.graph.input}
    types = tensor_types(model)
    for name in names:
        if name in present:
            continue
        if name not in types:
            raise ValueError(f"tensor '{name}' has no known type and cannot be captured")
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        present.add(name)
    return exposed


# What `with_extremes` computes inside the graph for each tensor, in this order.
EXTREMES = ("ReduceMin", "ReduceMax", "ReduceSum", "Size")


def with_extremes(model: onnx.ModelProto, names: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """A copy of `model` that also outputs, per tensor of `names`, its min, max, sum and size.

    ONNX Runtime then reduces each activation where it is computed and hands back four scalars,
    instead of copying the whole tensor out: what min/max calibration needs, at a fraction of
    the cost. The sum is there to see NaN, which ReduceMin and ReduceMax skip.
    """
    reduced = onnx.ModelProto()
    reduced.CopyFrom(model)
    types = tensor_types(model)
    outputs: dict[str, tuple] = {}
    for index, name in enumerate(names):
        if name not in types:
            continue
        scalars = tuple(f"polaris_extreme_{index}_{op}" for op in EXTREMES)
        for op, out in zip(EXTREMES, scalars, strict=True):
            attrs = {} if op == "Size" else {"keepdims": 0}
            reduced.graph.node.append(onnx.helper.make_node(op, [name], [out], **attrs))
            elem_type = onnx.TensorProto.INT64 if op == "Size" else types[name]
            reduced.graph.output.append(onnx.helper.make_tensor_value_info(out, elem_type, []))
        outputs[name] = scalars
    return reduced, outputs


def stream_tensors(
    model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    names: Sequence[str],
    *,
    threads: int = 1,
    progress: Progress = no_progress,
    description: str = "calibrating",
    total: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield, for each batch, the values of `names` (graph inputs included) in one run.

    The session is built once; the caller must reduce each yielded dict before asking for the
    next, since the arrays are not kept here.
    """
    names = list(dict.fromkeys(names))
    session = make_session(with_outputs(model, names), threads=threads)
    runnable = {o.name for o in session.get_outputs()}
    fetched = [n for n in names if n in runnable]
    with progress(description, total) as advance:
        for batch in batches:
            # run([]) would return every output, not none: ask only when something is computed.
            computed = session.run(fetched, batch) if fetched else []
            values = dict(zip(fetched, computed, strict=True))
            for name in names:
                if name not in values and name in batch:
                    values[name] = batch[name]
            yield values
            # Drop this batch before the next run: holding it would double peak memory.
            del values
            advance(1)
