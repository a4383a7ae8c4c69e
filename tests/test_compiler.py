"""The pipeline driver: verification between passes names the pass that broke the graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from polaris_opt import verify
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import PassFailed
from polaris_opt.export import tensor_problem
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


@dataclass(frozen=True)
class TruncateFirstWeight(Pass):
    """Stores the first layer's weight one value short: a malformed initializer."""

    name: ClassVar[str] = "truncate-first-weight"

    def run(self, graph, ctx):
        weight = graph.tensors()["fc1.weight"]
        proto = numpy_helper.from_array(weight.values, weight.name)
        proto.raw_data = proto.raw_data[:-4]
        weight.values = LazyValues(proto)
        return PassResult(modified=True)


@dataclass(frozen=True)
class NarrowFirstWeight(Pass):
    """Gives the first layer's weight a shape its Gemm cannot take: strict shape inference sees it."""

    name: ClassVar[str] = "narrow-first-weight"

    def run(self, graph, ctx):
        graph.tensors()["fc1.weight"].values = np.ones((32, 64), np.float32)
        return PassResult(modified=True)


@dataclass(frozen=True)
class NudgeFirstWeight(DoubleFirstWeight):
    """A lossy pass that rounds well (adds 1% to one weight) — or badly, when it doubles it."""

    name: ClassVar[str] = "nudge-first-weight"
    lossy: ClassVar[bool] = True
    factor: float = 1.01

    def run(self, graph, ctx):
        weight = next(t for t in graph.tensors().values() if t.__class__.__name__ == "Constant")
        weight.values = weight.values * self.factor
        return PassResult(modified=True)


@pytest.fixture(autouse=True)
def register_test_passes(monkeypatch):
    for cls in (Crash, DanglingInput, DoubleFirstWeight, TruncateFirstWeight, NarrowFirstWeight):
        monkeypatch.setitem(PASSES, cls.name, f"{__name__}:{cls.__name__}")
    for cls in (NudgeFirstWeight,):
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


@pytest.mark.parametrize(
    "step, problem",
    [
        ("truncate-first-weight", "'fc1.weight' holds 16380 bytes of raw_data; its dims and type need 16384"),
        ("narrow-first-weight", "ShapeInferenceError"),
    ],
)
def test_structure_verification_catches_a_malformed_or_misshapen_weight(step, problem):
    # fc1.weight is big enough that structure is checked without its payload.
    with pytest.raises(PassFailed, match=f"pass '{step}' failed: the graph no longer passes") as failure:
        run_pipeline(mlp(), Pipeline.parse(f"eliminate-identity,{step}"))
    assert problem in failure.value.reason


def test_each_weight_payload_is_measured_once(monkeypatch):
    measured = []

    def measure(tensor):
        measured.append(tensor.name)
        return tensor_problem(tensor)

    monkeypatch.setattr(verify, "tensor_problem", measure)
    run_pipeline(mlp(), Pipeline.parse("cleanup"))
    assert sorted(measured) == ["fc1.weight", "fc2.weight"]  # fc3.weight is small: checked whole


def test_an_input_failing_strict_inference_relaxes_the_check_with_a_warning():
    model = mlp()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 11  # inference says 10
    result = run_pipeline(model, Pipeline.parse("eliminate-identity"))
    assert any("the input fails strict shape inference" in w for w in result.warnings)


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


def test_dumps_hold_the_whole_graph_after_every_pass(tmp_path):
    result = run_pipeline(mlp(), Pipeline.parse("cleanup"), dump_dir=tmp_path)
    dumps = sorted(tmp_path.iterdir())
    assert [p.name for p in dumps][-1] == "06-infer-shapes.onnx" and len(dumps) == 6
    for dump in dumps:
        onnx.checker.check_model(onnx.load(dump), full_check=True)
    assert onnx.load(dumps[-1]).SerializeToString() == result.model.SerializeToString()


def test_models_above_the_protobuf_limit_keep_structure_checks(monkeypatch):
    import polaris_opt.verify as verify

    monkeypatch.setattr(verify, "PROTOBUF_LIMIT", 1000)  # digits_mlp's weights are ~26 kB
    result = run_pipeline(mlp(), Pipeline.parse("eliminate-identity"), verify=VerifyMode.NUMERIC)
    assert result.verify is VerifyMode.STRUCTURE
    assert any("numeric verification skipped" in w for w in result.warnings)
    with pytest.raises(PassFailed, match="dangling-input"):
        run_pipeline(mlp(), Pipeline.parse("dangling-input"), verify=VerifyMode.NUMERIC)


def test_numeric_verification_holds_lossy_passes_to_an_sqnr_floor():
    # 1% on one weight is a change float tolerances refuse but a lossy pass may make; the next
    # (lossless) pass is then held to the nudged model's outputs.
    result = run_pipeline(mlp(), Pipeline.parse("nudge-first-weight,cleanup"), verify=VerifyMode.NUMERIC)
    assert [r.step for r in result.reports][0] == "nudge-first-weight"
    with pytest.raises(PassFailed, match=r"nudge-first-weight.*SQNR .* dB is below 10 dB"):
        run_pipeline(mlp(), Pipeline.parse("nudge-first-weight{factor=-1}"), verify=VerifyMode.NUMERIC)
