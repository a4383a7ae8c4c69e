"""Lowering: every ai.polaris op becomes standard ONNX that stock ONNX Runtime runs, with the
reference's results; the `lower` pass and the `polaris-opt lower` command around it."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from helpers import op_counts
from onnx import TensorProto, helper, numpy_helper
from test_cli_compile import one_line_error, polaris
from test_ops_reference import (
    FORMAT_LAYOUTS,
    Case,
    U,
    case_model,
    conv_case,
    int4_case,
    quant_case,
    sparse_case,
)

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.numerics import run_model
from polaris_opt.ops import DOMAIN, register_schemas
from polaris_opt.ops.lowering import lower
from polaris_opt.ops.reference import REFERENCES
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline

FP32_RELATIVE = 1e-5


def reference_for(case: Case, x: np.ndarray) -> np.ndarray:
    return REFERENCES[case.op_type]([x, *case.inputs[1:]], case.attrs)


def lowered_outputs(case: Case) -> tuple[onnx.ModelProto, list[tuple[np.ndarray, np.ndarray]]]:
    """The lowered model, and (ORT's Y, the reference's Y) for X at batch 1 and at full batch."""
    lowered = lower(case_model(case))
    x = case.inputs[0]
    pairs = [(run_model(lowered, {"X": batch})["Y"], reference_for(case, batch)) for batch in (x[:1], x)]
    return lowered, pairs


def assert_standard_and_valid(model: onnx.ModelProto) -> None:
    assert not [key for key in op_counts(model, recursive=True) if key.startswith(DOMAIN)]
    assert DOMAIN not in {opset.domain for opset in model.opset_import}
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    error = np.abs(got.astype(np.float64) - want)
    assert np.all(error <= bound + 1e-30), (
        f"worst error {error.max():.3g}, bound there {bound.flat[np.argmax(error)]:.3g}"
    )


# ------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("fmt, layout", FORMAT_LAYOUTS)
def test_lowered_sparse_matmul_equals_the_reference(fmt, layout, values):
    rng = np.random.default_rng(2)
    for n, k, sparsity, activation, bias in [(7, 13, 0.0, "relu", True), (33, 65, 0.99, "none", False)]:
        case = sparse_case(rng, fmt, layout, values, n, k, sparsity, (4,), bias=bias, activation=activation)
        lowered, pairs = lowered_outputs(case)
        assert_standard_and_valid(lowered)
        for got, want in pairs:
            assert_within(got, want, FP32_RELATIVE * case.magnitude[: len(got)])


@pytest.mark.parametrize(
    "conv",
    [
        {},
        {"kernel": (1, 1), "pads": (0, 0, 0, 0)},
        {"kernel": (3, 2), "pads": (2, 0, 1, 1), "strides": (2, 1)},
        {"kernel": (2, 3), "dilations": (2, 1), "size": (9, 8), "activation": "none"},
    ],
)
@pytest.mark.parametrize(
    "fmt, layout, values",
    [("csr", {}, "int8"), ("bsr", {"block": (4, 4)}, "fp32"), ("sell", {"slice_height": 2}, "fp16")],
)
def test_lowered_sparse_conv_equals_the_reference(fmt, layout, values, conv):
    case = conv_case(np.random.default_rng(4), fmt, layout, values, batch=3, **conv)
    lowered, pairs = lowered_outputs(case)
    assert_standard_and_valid(lowered)
    assert op_counts(lowered)["Conv"] == 1
    for got, want in pairs:
        assert_within(got, want, FP32_RELATIVE * case.magnitude[: len(got)])


@pytest.mark.parametrize("op_type", ["QMatMul", "QGemm"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_lowered_quantized_matmul_equals_the_reference_within_rounding(op_type, static):
    """Same x_q (Q/DQ or DynamicQuantizeLinear round like the reference), so Y differs only by
    float32 rounding: |ΔY| <= (K + 8)·u·(Σ_k |x_q − zp|·|w_q|·x_scale·w_scale + |bias|)."""
    rng = np.random.default_rng(6)
    for n, k, activation in [(1, 1, "none"), (9, 33, "relu"), (16, 100, "none")]:
        case = quant_case(
            rng, op_type, static, n, k, (5,), alpha=0.75 if op_type == "QGemm" else 1.0, activation=activation
        )
        lowered, pairs = lowered_outputs(case)
        assert_standard_and_valid(lowered)
        expected_ops = {"QuantizeLinear", "DequantizeLinear"} if static else {"DynamicQuantizeLinear"}
        assert expected_ops <= set(op_counts(lowered))
        scales = [list(t.dims) for t in lowered.graph.initializer if t.name.endswith("x_scale")]
        assert scales == ([[]] if static else [])  # a true scalar: per-tensor QuantizeLinear
        got, want = pairs[1]  # full batch: the case's magnitude is for it
        assert_within(got, want, (k + 8) * U * case.magnitude)
        small = quant_case(np.random.default_rng(k), op_type, static, n, k, (1,), activation=activation)
        got, want = lowered_outputs(small)[1][1]
        assert_within(got, want, (k + 8) * U * small.magnitude)


def test_lowered_dynamic_qmatmul_of_zeros_gives_the_bias():
    case = quant_case(np.random.default_rng(0), "QMatMul", False, 3, 8, (2,), x=np.zeros((2, 8), np.float32))
    _, [(got, want), _] = lowered_outputs(case)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, np.broadcast_to(case.inputs[3], (1, 3)))


@pytest.mark.parametrize("zero_points", [True, False])
def test_lowered_matmul_int4_equals_the_reference(zero_points):
    for n, k, block_size in [(5, 50, 16), (8, 64, 64), (1, 17, 32)]:
        case = int4_case(np.random.default_rng(n), n, k, block_size, (3, 2), zero_points=zero_points)
        lowered, pairs = lowered_outputs(case)
        assert_standard_and_valid(lowered)
        assert set(op_counts(lowered)) == {"MatMul", "Add"}
        for got, want in pairs:
            assert_within(got, want, FP32_RELATIVE * case.magnitude[: len(got)])


def test_lowered_nodes_and_weights():
    """SparseMatMul with bias and relu: MatMul on a float32 [K, N] weight, Add, Relu, output kept."""
    case = sparse_case(np.random.default_rng(0), "csr", {}, "fp16", 6, 10, 0.5, (2,), activation="relu")
    lowered = lower(case_model(case))
    assert [node.op_type for node in lowered.graph.node] == ["MatMul", "Add", "Relu"]
    assert lowered.graph.node[-1].output[0] == "Y" and lowered.graph.output[0].name == "Y"
    weight = numpy_helper.to_array(
        next(t for t in lowered.graph.initializer if t.name == lowered.graph.node[0].input[1])
    )
    assert weight.dtype == np.float32 and weight.shape == (10, 6)
    x = np.eye(10, dtype=np.float32)[None]  # X·Wᵀ with X = I reads back Wᵀ
    np.testing.assert_array_equal(
        weight, REFERENCES["SparseMatMul"]([x, *case.inputs[1:4]], {**case.attrs, "activation": "none"})[0]
    )


# ------------------------------------------------------------------------- whole models


def chained_model() -> tuple[onnx.ModelProto, dict[str, Case]]:
    """X → SparseMatMul(relu) → MatMulInt4 → g; If(flag): QMatMul(X) (dynamic) in one branch,
    g[:, :5] in the other; Y [batch, 5]. Lowered ops feed each other, and one sits in a sub-graph."""
    rng = np.random.default_rng(9)
    cases = {
        "sparse": sparse_case(rng, "bsr", {"block": (2, 4)}, "int8", 12, 20, 0.7, (3,), activation="relu")
    }
    x = cases["sparse"].inputs[0]
    cases["int4"] = int4_case(rng, 6, 12, 16, (3,))
    cases["quant"] = quant_case(rng, "QMatMul", False, 5, 20, (3,), x=x)
    model = case_model(cases["sparse"])
    graph = model.graph
    graph.node[0].output[0] = "h"
    int4_names = ["h"] + [
        _initializer(graph, f"int4_{i}", v) for i, v in enumerate(cases["int4"].inputs[1:], start=1)
    ]
    graph.node.append(
        helper.make_node("MatMulInt4", int4_names, ["g"], name="int4", domain=DOMAIN, **cases["int4"].attrs)
    )
    quant_inits = [
        numpy_helper.from_array(v, f"q_{i}") for i, v in enumerate(cases["quant"].inputs[1:4], start=1)
    ]
    quant_node = helper.make_node("QMatMul", ["X", "q_1", "q_2", "q_3"], ["yq"], name="q", domain=DOMAIN)
    then_branch = helper.make_graph(
        [quant_node], "then", [], [helper.make_tensor_value_info("yq", TensorProto.FLOAT, None)], quant_inits
    )
    else_branch = helper.make_graph(
        [helper.make_node("Slice", ["g", "zero", "five", "one"], ["ys"])],
        "else",
        [],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([v], np.int64), name)
            for name, v in (("zero", 0), ("five", 5), ("one", 1))
        ],
    )
    graph.node.append(
        helper.make_node("If", ["flag"], ["Y"], then_branch=then_branch, else_branch=else_branch)
    )
    graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 5]))
    return model, cases


def _initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def test_chained_ops_and_a_subgraph_are_lowered():
    model, cases = chained_model()
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    lowered = lower(model)
    assert model.SerializeToString() == before  # the input model is left as it was
    assert_standard_and_valid(lowered)
    x, quant = cases["sparse"].inputs[0], cases["quant"]
    got = run_model(lowered, {"X": x, "flag": np.array(True)})["Y"]
    assert_within(got, quant.reference(), (20 + 8) * U * quant.magnitude)
    h = cases["sparse"].reference()
    g = REFERENCES["MatMulInt4"]([h, *cases["int4"].inputs[1:]], cases["int4"].attrs)
    got = run_model(lowered, {"X": x, "flag": np.array(False)})["Y"]
    np.testing.assert_allclose(got, g[:, :5], rtol=1e-5, atol=1e-5 * np.abs(g).max())


def test_lower_pass_in_a_pipeline():
    model, cases = chained_model()
    result = run_pipeline(model, Pipeline.parse("lower"), ctx=PassContext())
    (report,) = result.reports
    assert report.modified and report.stats == {"lowered": 3}
    assert report.details == {"lowered": {"MatMulInt4": 1, "QMatMul": 1, "SparseMatMul": 1}}
    assert not result.warnings  # the verifier checked the input with the schemas registered
    assert_standard_and_valid(result.model)
    feeds = {"X": cases["sparse"].inputs[0], "flag": np.array(False)}
    np.testing.assert_array_equal(run_model(result.model, feeds)["Y"], run_model(lower(model), feeds)["Y"])


# ------------------------------------------------------------------------------ bad input


def bad_models() -> dict[str, tuple[onnx.ModelProto, str]]:
    case = sparse_case(np.random.default_rng(0), "csr", {}, "fp32", 8, 12, 0.5, (2,))
    unknown_format = case_model(case)
    next(a for a in unknown_format.graph.node[0].attribute if a.name == "format").s = b"coo"
    short_indptr = case_model(
        Case(case.op_type, case.inputs, {**case.attrs, "shape": [9, 12]}, case.expected, None)
    )
    computed = case_model(case)
    computed.graph.node.insert(0, helper.make_node("Identity", ["data"], ["data_copy"]))
    computed.graph.node[1].input[1] = "data_copy"
    no_x = case_model(case)
    no_x.graph.node[0].input[0] = ""
    extra = case_model(case)
    extra.graph.node[0].input.extend(["data"] * (7 - len(extra.graph.node[0].input)))
    return {
        "no X": (
            no_x,
            "node 'sparsematmul0' (SparseMatMul): the op needs an input X and exactly one output Y",
        ),
        "seven inputs": (extra, "7 inputs given; the op takes at most 6"),
        "unknown format": (unknown_format, "node 'sparsematmul0' (SparseMatMul): unknown format 'coo'"),
        "indptr": (
            short_indptr,
            "node 'sparsematmul0' (SparseMatMul): inconsistent csr matrix of shape (9, 12)",
        ),
        "computed": (computed, "input 1 ('data_copy') is computed at run time"),
    }


@pytest.mark.parametrize("which", ["unknown format", "indptr", "computed", "no X", "seven inputs"])
def test_lower_refuses_bad_nodes_with_one_clear_error(which):
    model, message = bad_models()[which]
    with pytest.raises(BadInput, match=re.escape(message)):
        lower(model)


# ------------------------------------------------------------------------------------ CLI


def test_cli_lowers_and_leaves_the_input_alone(tmp_path):
    model, cases = chained_model()
    source, out = tmp_path / "polaris.onnx", tmp_path / "standard.onnx"
    onnx.save(model, source)
    before = source.read_bytes()
    result = polaris("lower", source, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["lowered"] == {"MatMulInt4": 1, "QMatMul": 1, "SparseMatMul": 1}
    assert summary["output_bytes"] == out.stat().st_size
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["polaris.onnx", "standard.onnx"]  # no staging left
    written = onnx.load(out)
    assert_standard_and_valid(written)
    for flag in (True, False):
        feeds = {"X": cases["sparse"].inputs[0], "flag": np.array(flag)}
        np.testing.assert_array_equal(run_model(written, feeds)["Y"], run_model(lower(model), feeds)["Y"])
    assert {p.key: p.value for p in written.metadata_props}["polaris-opt.pipeline"] == "lower"


@pytest.mark.parametrize("which", ["unknown format", "indptr"])
def test_cli_bad_model_exits_2_and_writes_nothing(tmp_path, which):
    model, message = bad_models()[which]
    source, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    before = source.read_bytes()
    result = polaris("lower", source, "-o", out)
    assert result.returncode == 2
    assert message in one_line_error(result)
    assert not out.exists() and source.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_cli_usage_errors_exit_2(tmp_path):
    missing = polaris("lower", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx")
    assert missing.returncode == 2 and "no such file" in one_line_error(missing)
    source = tmp_path / "m.onnx"
    onnx.save(chained_model()[0], source)
    before = source.read_bytes()
    same = polaris("lower", source, "-o", source)
    assert same.returncode == 2 and "refusing to overwrite the input" in one_line_error(same)
    nowhere = polaris("lower", source, "-o", tmp_path / "no" / "such" / "dir.onnx")
    assert nowhere.returncode == 2 and "does not exist" in one_line_error(nowhere)
    assert source.read_bytes() == before
