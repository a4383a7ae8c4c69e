"""The pipeline driver: verification between passes names the pass that broke the graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import PassFailed
from polaris_opt.passes import PASSES
from polaris_opt.passes_api import Pass, PassResult
from polaris_opt.pipeline import Pipeline
from polaris_opt.verify import VerifyMode

MODELS = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Crash(Pass):
    name: ClassVar[str] = "crash"

    def run(self, graph, ctx):
        raise ZeroDivisionError("oops")


@dataclass(frozen=True)
class DanglingInput(Pass):
    """Points the first node at a tensor nobody produces: structurally invalid."""

    name: ClassVar[str] = "dangling-input"

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs

        graph.nodes[0].inputs[0] = gs.Variable("nobody_makes_this", dtype=np.float32)
        return PassResult(modified=True)


@dataclass(frozen=True)
class DoubleFirstWeight(Pass):
    """Valid structure, different numbers: only numeric verification can catch it."""

    name: ClassVar[str] = "double-first-weight"

    def run(self, graph, ctx):
        weight = next(t for t in graph.tensors().values() if t.__class__.__name__ == "Constant")
        weight.values = weight.values * 2
        return PassResult(modified=True, stats={"doubled": 1})


@pytest.fixture(autouse=True)
def register_test_passes(monkeypatch):
    for cls in (Crash, DanglingInput, DoubleFirstWeight):
        monkeypatch.setitem(PASSES, cls.name, f"{__name__}:{cls.__name__}")


def mlp() -> onnx.ModelProto:
    return onnx.load(MODELS / "digits_mlp.onnx")


def test_a_crashing_pass_is_named():
    with pytest.raises(PassFailed, match="pass 'crash' failed: ZeroDivisionError: oops"):
        run_pipeline(mlp(), Pipeline.parse("eliminate-identity,crash"))


def test_a_pass_that_breaks_structure_is_named():
    with pytest.raises(
        PassFailed, match="pass 'dangling-input' failed: the graph no longer passes onnx.checker"
    ):
        run_pipeline(mlp(), Pipeline.parse("eliminate-identity,dangling-input,infer-shapes"))


def test_numeric_verification_catches_changed_outputs():
    pipeline = Pipeline.parse("double-first-weight")
    run_pipeline(mlp(), pipeline, verify=VerifyMode.STRUCTURE)  # structure alone cannot see it
    with pytest.raises(PassFailed, match="pass 'double-first-weight' failed: outputs changed"):
        run_pipeline(mlp(), pipeline, verify=VerifyMode.NUMERIC)


def test_reports_time_and_node_counts_per_pass():
    result = run_pipeline(
        onnx.load(MODELS / "resnet_s.onnx"), Pipeline.parse("cleanup"), verify=VerifyMode.NUMERIC
    )
    assert len(result.reports) == 6
    fold = next(r for r in result.reports if r.step == "fold-batchnorm")
    assert fold.modified and fold.nodes_after < fold.nodes_before
    assert all(r.seconds >= 0 and r.verify_seconds > 0 for r in result.reports)
    onnx.checker.check_model(result.model, full_check=True)


def test_numeric_verification_is_skipped_with_a_warning_when_the_input_cannot_run():
    graph = helper.make_graph(
        [helper.make_node("Foo", ["x"], ["y"], domain="my.custom")],
        "custom",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "unused")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.custom", 1)]
    )
    result = run_pipeline(model, Pipeline.parse("cleanup"), verify=VerifyMode.NUMERIC)
    assert result.verify is VerifyMode.STRUCTURE
    assert any("numeric verification skipped" in w for w in result.warnings)
    assert [n.op_type for n in result.model.graph.node] == ["Foo"]
