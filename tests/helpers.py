"""Shared test helpers: run one pass on a model, count ops, compare outputs with ONNX Runtime.

Every pass test follows the same shape (STYLE.md): a model from ONNX text, `run_pass`, then
structure (`op_counts`), numerics (`assert_same_outputs`) and `onnx.checker`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from polaris_opt.calib_data import CalibrationSource
from polaris_opt.export import to_graph, to_model
from polaris_opt.numerics import compare_outputs, run_model
from polaris_opt.passes_api import Pass, PassContext
from polaris_opt.proto import proto_nodes


def run_pass(p: Pass, model: onnx.ModelProto, ctx: PassContext | None = None) -> onnx.ModelProto:
    """Run pass `p` once on a copy of `model` and export the result (its new graph if it made one)."""
    return run_pass_with_stats(p, model, ctx)[0]


def run_pass_with_stats(
    p: Pass, model: onnx.ModelProto, ctx: PassContext | None = None
) -> tuple[onnx.ModelProto, dict]:
    """`run_pass`, also returning the pass's stats.

    The copy matters: graphsurgeon keeps references to the model's TensorProtos and export may
    rename them, so running on `model` itself could change the reference a test compares with.
    """
    source = onnx.ModelProto()
    source.CopyFrom(model)
    graph = to_graph(source)
    result = p.run(graph, ctx or PassContext())
    return to_model(result.graph if result.graph is not None else graph, source), result.stats


def op_counts(model: onnx.ModelProto | onnx.GraphProto, recursive: bool = False) -> Counter:
    """Counter of op types in the top-level graph, or in every sub-graph too when `recursive`.

    Ops of a domain other than the default ONNX one are counted as "domain.OpType", so a test
    can tell `com.microsoft.FusedGelu` from a standard op of the same name.
    """
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    nodes = proto_nodes(graph) if recursive else iter(graph.node)
    return Counter(_op_key(node) for node in nodes)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def assert_same_outputs(
    reference_model: onnx.ModelProto, model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> None:
    """Both models give the same outputs on `feeds`, within numerics' per-dtype tolerances.

    Output names must match too: a pass must not rename what the user reads.
    """
    expected = run_model(reference_model, feeds)
    got = run_model(model, feeds)
    assert list(got) == list(expected), f"output names {list(got)}, expected {list(expected)}"
    mismatches = compare_outputs(expected, got)
    assert not mismatches, "outputs differ:\n" + "\n".join(str(m) for m in mismatches)


MODELS = Path(__file__).resolve().parent.parent / "models"


class ListSource(CalibrationSource):
    """Calibration batches from a list of feeds, restartable like every source."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = batches

    def batches(self):
        return iter(self._batches)

    @property
    def num_batches(self) -> int:
        return len(self._batches)


def zoo_source(name: str, samples: int, batch: int = 32) -> ListSource:
    """The first `samples` rows of a zoo model's calibration set, in batches of `batch`."""
    with np.load(MODELS / f"{name}.calib.npz") as archive:
        key, data = archive.files[0], archive[archive.files[0]][:samples]
    return ListSource([{key: data[i : i + batch]} for i in range(0, samples, batch)])
