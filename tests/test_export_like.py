"""The exporter-like test models are valid ONNX, deterministic, and run in ONNX Runtime."""

from __future__ import annotations

import math

import export_like
import numpy as np
import onnx
import pytest
from helpers import op_counts

from polaris_opt.numerics import run_model


def without_custom_op(seed: int = 0):
    return export_like.with_unknown_domains(seed, custom=False)


RUNNABLE = {
    "pytorch_like": export_like.pytorch_like,
    "paddle_like": export_like.paddle_like,
    "tf2onnx_like": export_like.tf2onnx_like,
    "with_if": export_like.with_if,
    "with_loop": export_like.with_loop,
    "with_unknown_domains(custom=False)": without_custom_op,
}
ALL = {**RUNNABLE, "with_unknown_domains": export_like.with_unknown_domains}


@pytest.mark.parametrize("build", ALL.values(), ids=ALL.keys())
def test_valid_and_deterministic(build):
    model, feeds = build()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    again, feeds_again = build()
    assert model.SerializeToString() == again.SerializeToString()
    assert all(np.array_equal(feeds[k], feeds_again[k]) for k in feeds)


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("build", RUNNABLE.values(), ids=RUNNABLE.keys())
def test_runs_with_finite_outputs(build, batch):
    model, feeds = build()
    # Only tensors with a batch axis grow; the If condition is a scalar.
    feeds = {k: np.resize(v, (batch, *v.shape[1:])) if v.ndim else v for k, v in feeds.items()}
    outputs = run_model(model, feeds)
    assert outputs
    for value in outputs.values():
        assert np.isfinite(value).all()
        assert batch in value.shape


def test_pytorch_like_has_torch_flatten_chain_and_dead_branch():
    model, _ = export_like.pytorch_like()
    counts = op_counts(model)
    for op in ("Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "BatchNormalization"):
        assert counts[op] == 1, op
    assert counts["Identity"] == 2
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n.name for n in model.graph.node if not set(n.output) & used]
    assert dead == ["/aux/Sigmoid"]


def test_paddle_like_keeps_weights_in_constant_nodes():
    model, _ = export_like.paddle_like()
    assert len(model.graph.initializer) == 0
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    assert set(conv.input[1:]) <= constants
    assert matmul.input[1] in constants and reshape.input[1] in constants


def test_tf2onnx_like_structure():
    model, _ = export_like.tf2onnx_like()
    counts = op_counts(model)
    assert counts["Transpose"] == 3 and counts["Cast"] == 2 and counts["Identity"] == 2
    assert counts["Squeeze"] == 1 and "BatchNormalization" not in counts


@pytest.mark.parametrize("cond", [True, False])
def test_with_if_takes_each_branch(cond):
    model, feeds = export_like.with_if()
    assert feeds["cond"].dtype == np.bool_ and feeds["cond"]
    bias = onnx.numpy_helper.to_array(model.graph.initializer[0])
    x = feeds["x"]
    expected = np.maximum(x + bias + 1.0 if cond else (x + bias) * 2.0, 0.0)
    y = run_model(model, {**feeds, "cond": np.array(cond)})["y"]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    for branch in model.graph.node[0].attribute:
        assert [n.op_type for n in branch.g.node] == [
            "Identity",
            "Constant",
            "Add",
            "Add" if branch.name == "then_branch" else "Mul",
        ]
        assert not branch.g.initializer  # "bias" comes from the outer scope


def test_with_loop_accumulates_three_times():
    model, feeds = export_like.with_loop()
    outputs = run_model(model, feeds)
    np.testing.assert_allclose(outputs["y"], feeds["x"] + 1.5, rtol=1e-6, atol=1e-6)
    assert outputs["trace"].shape == (3, *feeds["x"].shape)


def test_unknown_domains_numerics_and_custom_op():
    model, feeds = without_custom_op()
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    mm = feeds["x"] @ w.T
    gelu = 0.5 * mm * (1.0 + np.vectorize(math.erf)(mm / math.sqrt(2.0)))
    np.testing.assert_allclose(run_model(model, feeds)["y"], np.maximum(gelu, 0.0), rtol=1e-5, atol=1e-6)

    model, _ = export_like.with_unknown_domains()
    domains = {n.op_type: n.domain for n in model.graph.node}
    assert domains["FusedMatMul"] == domains["Gelu"] == "com.microsoft"
    assert domains["Foo"] == "my.custom"
    with pytest.raises(Exception, match="Foo"):  # no runtime knows it: structure checks only
        run_model(model, feeds)
