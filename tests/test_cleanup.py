"""The `cleanup` alias end to end: on every zoo model and on models shaped like real exports,
outputs stay equal (rel. error ≤ 1e-4 fp32), the checker passes, dynamic dims stay dynamic,
sub-graphs stay valid and unknown-domain nodes are left exactly as they were."""

from __future__ import annotations

import json
from pathlib import Path

import export_like
import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, op_counts

from polaris_opt.compiler import run_pipeline
from polaris_opt.numerics import relative_error, run_model
from polaris_opt.pipeline import Pipeline
from polaris_opt.verify import VerifyMode

MODELS = Path(__file__).resolve().parent.parent / "models"
ZOO = json.loads((MODELS / "zoo.json").read_text())["models"]
EXPORTS = ["pytorch_like", "paddle_like", "tf2onnx_like", "with_if", "with_loop"]


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    return run_pipeline(model, Pipeline.parse("cleanup"), verify=VerifyMode.STRUCTURE).model


def zoo_model(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    with np.load(MODELS / ZOO[name]["sample_input"]) as archive:
        return onnx.load(MODELS / ZOO[name]["file"]), {k: archive[k] for k in archive.files}


def dims(values) -> list[list]:
    return [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] for value in values]


def assert_cleaned_well(model: onnx.ModelProto, out: onnx.ModelProto, feeds) -> None:
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out, feeds)
    reference, got = run_model(model, feeds), run_model(out, feeds)
    for name in reference:
        assert relative_error(reference[name], got[name]) <= 1e-4, name
    assert dims(out.graph.input) == dims(model.graph.input)
    assert dims(out.graph.output) == dims(model.graph.output)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_cleanup_keeps_every_zoo_model_equal(name):
    model, feeds = zoo_model(name)
    out = cleanup(model)
    assert_cleaned_well(model, out, feeds)
    assert "BatchNormalization" not in op_counts(out)
    assert len(out.graph.node) <= len(model.graph.node)


def test_cleanup_keeps_a_batch_of_other_size_equal():
    model, feeds = zoo_model("resnet_s")
    batch = {name: np.repeat(value, 3, axis=0) for name, value in feeds.items()}  # batch 6, not 2
    assert_same_outputs(model, cleanup(model), batch)


@pytest.mark.parametrize("builder", EXPORTS)
def test_cleanup_keeps_exporter_shaped_models_equal(builder):
    model, feeds = getattr(export_like, builder)()
    out = cleanup(model)
    assert_cleaned_well(model, out, feeds)
    assert not {"Constant", "Identity", "BatchNormalization"} & set(op_counts(out))


def test_pytorch_flatten_chain_keeps_its_dynamic_batch():
    model, feeds = export_like.pytorch_like()
    out = cleanup(model)
    # Shape(x)[0] is the dynamic batch: it must still be computed at run time.
    assert op_counts(out)["Shape"] >= 1 and op_counts(out)["Reshape"] == 1
    bigger = {name: np.repeat(value, 3, axis=0) for name, value in feeds.items()}
    assert_same_outputs(model, out, bigger)


def test_tf2onnx_weights_end_up_as_plain_initializers():
    model, _ = export_like.tf2onnx_like()
    out = cleanup(model)
    initializers = {tensor.name for tensor in out.graph.initializer}
    conv = next(node for node in out.graph.node if node.op_type == "Conv")
    assert conv.input[1] in initializers  # no Transpose/Cast left between weight and Conv


def test_paddle_constant_weights_become_initializers():
    model, _ = export_like.paddle_like()
    out = cleanup(model)
    initializers = {tensor.name for tensor in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type in ("Conv", "MatMul"):
            assert node.input[1] in initializers, node.name


@pytest.mark.parametrize("cond", [True, False])
def test_both_if_branches_stay_valid(cond):
    model, feeds = export_like.with_if()
    out = cleanup(model)
    assert op_counts(out)["If"] == 1
    assert_same_outputs(
        model, out, {**feeds, next(k for k in feeds if feeds[k].dtype == bool): np.array(cond)}
    )


def test_unknown_domain_nodes_are_untouched():
    model, _ = export_like.with_unknown_domains()
    out = cleanup(model)
    foreign = lambda m: [n for n in m.graph.node if n.domain not in ("", "ai.onnx")]  # noqa: E731
    assert [n.SerializeToString() for n in foreign(out)] == [n.SerializeToString() for n in foreign(model)]
    onnx.checker.check_model(out)


def test_runnable_unknown_domain_model_keeps_its_outputs():
    model, feeds = export_like.with_unknown_domains(custom=False)
    assert_cleaned_well(model, cleanup(model), feeds)
