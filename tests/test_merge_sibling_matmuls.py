"""merge-sibling-matmuls: structure (op counts), numerics against the input on ORT, onnx.checker,
and each case where merging would be unsound left alone with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, op_counts, run_pass, run_pass_with_stats
from onnx import numpy_helper

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.numerics import relative_error, run_model
from polaris_opt.passes.merge_sibling_matmuls import MergeSiblingMatMuls, joined_name
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>'
RNG = np.random.default_rng(0)

# Q, K and V projections of one normalised input, each MatMul + bias Add, as torch.onnx writes them.
QKV = """
  g (float[N,5,8] x) => (float[N,5,6] q, float[N,5,6] k, float[N,5,4] v) <{decls}> {{
    n = Relu(x)
    q_mm = MatMul(n, wq)
    q = Add(q_mm, bq)
    k_mm = MatMul(n, wk)
    k = Add(bk, k_mm)
    v_mm = MatMul(n, wv)
    v = Add(v_mm, bv) }}"""
QKV_DECLS = "float[8,6] wq, float[6] bq, float[8,6] wk, float[6] bk, float[8,4] wv, float[4] bv"


def parse(text: str, opset: int = 17, check: bool = True, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER.format(opset=opset) + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def floats(*shape: int, sparsity: float = 0.0) -> np.ndarray:
    values = RNG.standard_normal(shape).astype(np.float32)
    values[RNG.random(shape) < sparsity] = 0
    return values


def qkv_weights(sparsity: float = 0.0) -> dict[str, np.ndarray]:
    shapes = {"wq": (8, 6), "bq": (6,), "wk": (8, 6), "bk": (6,), "wv": (8, 4), "bv": (4,)}
    return {
        name: floats(*shape, sparsity=sparsity if name[0] == "w" else 0) for name, shape in shapes.items()
    }


def feeds(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": floats(batch, 5, 8)}


def merge(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    out, stats = run_pass_with_stats(MergeSiblingMatMuls(**options), model)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def details(model: onnx.ModelProto, **options) -> dict:
    return MergeSiblingMatMuls(**options).run(to_graph(model), PassContext()).details


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_qkv_with_biases_become_one_matmul_one_add_and_a_split(opset):
    model = parse(QKV.format(decls=QKV_DECLS), opset=opset, **qkv_weights())
    out, stats = merge(model)
    assert op_counts(out) == {"Relu": 1, "MatMul": 1, "Add": 1, "Split": 1}
    assert stats == {"merged": 3, "into": 1}
    split = next(node for node in out.graph.node if node.op_type == "Split")
    assert list(split.output) == ["q", "k", "v"]  # the names the caller reads stay
    assert len(split.input) == (2 if opset >= 13 else 1)  # sizes: an input from opset 13
    assert_same_outputs(model, out, feeds())
    assert_same_outputs(model, out, feeds(batch=1))


def test_the_merged_names_say_what_was_merged():
    names = ["/attn/q_proj/MatMul", "/attn/k_proj/MatMul", "/attn/v_proj/MatMul"]
    assert joined_name(names, "/") == "/attn/q_proj+k_proj+v_proj/MatMul"
    assert joined_name(["l.q.weight", "l.k.weight"], ".") == "l.q+k.weight"
    assert joined_name(["a", "b"], "/") == "a+b"
    assert joined_name(["x", ""], "/") == ""
    model = parse(QKV.format(decls=QKV_DECLS), **qkv_weights())
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    for node, name in zip(matmuls, names, strict=True):
        node.name = name
    out, _ = merge(model)
    merged = next(node for node in out.graph.node if node.op_type == "MatMul")
    assert merged.name == "/attn/q_proj+k_proj+v_proj/MatMul" and merged.input[1] == "wq+wk+wv"
    assert details(model)["groups"] == [
        {"name": merged.name, "nodes": names, "widths": [6, 6, 4], "bias": True}
    ]


def test_without_a_bias_on_every_sibling_the_adds_stay_after_the_split():
    text = QKV.format(decls=QKV_DECLS).replace("v = Add(v_mm, bv)", "v = Relu(v_mm)")
    weights = qkv_weights()
    del weights["bv"]
    model = parse(text.replace(", float[4] bv", ""), **weights)
    out, _ = merge(model)
    assert op_counts(out) == {"Relu": 2, "MatMul": 1, "Split": 1, "Add": 2}
    assert_same_outputs(model, out, feeds())


def test_a_sibling_whose_output_is_a_graph_output_still_merges():
    text = """
      g (float[N,8] x) => (float[N,3] a, float[N,5] b) <float[8,3] wa, float[8,5] wb> {
        a = MatMul(x, wa)
        b = MatMul(x, wb) }"""
    model = parse(text, wa=floats(8, 3), wb=floats(8, 5))
    out, stats = merge(model)
    assert op_counts(out) == {"MatMul": 1, "Split": 1} and stats["merged"] == 2
    assert [o.name for o in out.graph.output] == ["a", "b"]
    assert_same_outputs(model, out, {"x": floats(3, 8)})


def test_a_weight_that_is_not_a_constant_stays_and_the_rest_merge():
    text = """
      g (float[N,8] x, float[8,2] wc) => (float[N,3] a, float[N,5] b, float[N,2] c)
        <float[8,3] wa, float[8,5] wb> {
        a = MatMul(x, wa)
        b = MatMul(x, wb)
        c = MatMul(x, wc) }"""
    model = parse(text, wa=floats(8, 3), wb=floats(8, 5))
    out, stats = merge(model)
    assert op_counts(out) == {"MatMul": 2, "Split": 1} and stats["merged"] == 2
    assert_same_outputs(model, out, {"x": floats(3, 8), "wc": floats(8, 2)})
    skipped = details(model)["skipped"]
    assert [row["reason"] for row in skipped] == ["its weight is not a constant"]


def test_an_input_read_as_the_second_operand_is_left_alone():
    text = """
      g (float[4,8] x) => (float[4,3] a, float[4,5] b, float[2,8] t)
        <float[8,3] wa, float[8,5] wb, float[2,4] wt> {
        a = MatMul(x, wa)
        b = MatMul(x, wb)
        t = MatMul(wt, x) }"""
    model = parse(text, wa=floats(8, 3), wb=floats(8, 5), wt=floats(2, 4))
    out, _ = merge(model)
    assert op_counts(out) == {"MatMul": 2, "Split": 1}
    assert_same_outputs(model, out, {"x": floats(4, 8)})
    assert [row["reason"] for row in details(model)["skipped"]] == [
        "reads the shared input as its second operand"
    ]


def test_batched_weights_are_left_alone():
    text = """
      g (float[2,4,8] x) => (float[2,4,3] a, float[2,4,5] b) <float[2,8,3] wa, float[2,8,5] wb> {
        a = MatMul(x, wa)
        b = MatMul(x, wb) }"""
    model = parse(text, wa=floats(2, 8, 3), wb=floats(2, 8, 5))
    out, stats = merge(model)
    assert op_counts(out) == {"MatMul": 2} and stats["merged"] == 0
    reasons = {row["reason"] for row in details(model)["skipped"]}
    assert reasons == {
        "its weight is float32 [2, 8, 3], not a 2-D float matrix",
        "its weight is float32 [2, 8, 5], not a 2-D float matrix",
    }


def test_weights_of_another_type_or_reduction_size_are_grouped_apart():
    """ONNX Runtime would refuse this graph (MatMul's operands share one type and K), so only the
    structure is checked: a pass must never concatenate such weights, even in a broken model."""
    text = """
      g (float[N,8] x) => (float[N,3] a, float[N,5] b, double[N,2] c, float[N,4] d)
        <float[8,3] wa, float[8,5] wb, double[8,2] wc, float[6,4] wd> {
        a = MatMul(x, wa)
        b = MatMul(x, wb)
        c = MatMul(x, wc)
        d = MatMul(x, wd) }"""
    model = parse(
        text,
        check=False,
        wa=floats(8, 3),
        wb=floats(8, 5),
        wc=floats(8, 2).astype(np.float64),
        wd=floats(6, 4),
    )
    out, stats = run_pass_with_stats(MergeSiblingMatMuls(), model)
    assert op_counts(out) == {"MatMul": 3, "Split": 1} and stats == {"merged": 2, "into": 1}
    merged = next(t for t in out.graph.initializer if t.name == "wa+wb")
    assert numpy_helper.to_array(merged).dtype == np.float32
    reasons = [row["reason"] for row in details(model)["skipped"]]
    assert reasons == ["no other MatMul of this input has its reduction size and weight type"] * 2


def test_exclude_and_min_sparsity_keep_layers_out():
    sparse = qkv_weights(sparsity=0.9)
    sparse["wv"] = floats(8, 4)  # dense: sparsify would leave it alone, so it must not join
    model = parse(QKV.format(decls=QKV_DECLS), **sparse)
    out, stats = merge(model, min_sparsity=0.5)
    assert stats["merged"] == 2 and op_counts(out)["MatMul"] == 2
    assert_same_outputs(model, out, feeds())
    out, stats = merge(model, exclude="wq;nothing*")
    assert stats["merged"] == 2 and op_counts(out)["MatMul"] == 2
    with pytest.raises(BadInput, match="min-sparsity 1.5 is outside"):
        MergeSiblingMatMuls(min_sparsity=1.5).run(to_graph(model), PassContext())


def test_siblings_inside_an_if_branch_merge_there():
    branch = onnx.parser.parse_graph("""
      then_g () => (float[N,5] ta, float[N,3] tb) {
        ta = MatMul(x, wa)
        tb = MatMul(x, wb) }""")
    else_g = onnx.parser.parse_graph("""
      else_g () => (float[N,5] ea, float[N,3] eb) {
        ea = Neg(x5)
        eb = Neg(x3) }""")
    text = """
      g (float[N,8] x, bool c, float[N,5] x5, float[N,3] x3) => (float[N,5] a, float[N,3] b) {
        a, b = If(c) }"""
    model = parse(text, check=False)
    model.graph.node[0].attribute.extend(
        [onnx.helper.make_attribute("then_branch", branch), onnx.helper.make_attribute("else_branch", else_g)]
    )
    weights = {"wa": floats(8, 5), "wb": floats(8, 3)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    out, stats = merge(model)
    assert stats["merged"] == 2 and op_counts(out, recursive=True)["Split"] == 1
    for taken in (True, False):
        x = {"x": floats(2, 8), "c": np.array(taken), "x5": floats(2, 5), "x3": floats(2, 3)}
        assert_same_outputs(model, out, x)


def test_no_siblings_no_change():
    model = parse(QKV.format(decls=QKV_DECLS), **qkv_weights())
    once = run_pass(MergeSiblingMatMuls(), model)
    again, stats = run_pass_with_stats(MergeSiblingMatMuls(), once)
    assert stats == {"merged": 0, "into": 0}
    assert op_counts(again) == op_counts(once)


def test_merged_then_sparsified_is_one_sparse_matmul_with_its_bias_fused():
    """What `polaris-opt sparsify` runs: the three projections become one SparseMatMul whose
    outputs, through the runtime, equal the unmerged dense model's."""
    from polaris_opt.runtime import Session

    model = parse(QKV.format(decls=QKV_DECLS), **qkv_weights(sparsity=0.8))
    result = run_pipeline(model, Pipeline.parse("merge-sibling-matmuls{min-sparsity=0.5},sparsify"))
    counts = op_counts(result.model)
    assert counts["ai.polaris.SparseMatMul"] == 1 and counts["Split"] == 1 and "Add" not in counts
    x = feeds(3)
    expected = run_model(model, x)
    for placement in ("host", "auto"):
        got = Session(result.model, placement=placement).run(None, x)
        for name, value in zip(expected, got, strict=True):
            assert relative_error(expected[name], value) <= 1e-5, (placement, name)


@pytest.mark.parametrize("merge", [True, False])
def test_polaris_opt_sparsify_merges_first_unless_told_not_to(tmp_path, capsys, merge):
    import json

    from polaris_opt.cli import main

    source, out = tmp_path / "qkv.onnx", tmp_path / "qkv.polaris.onnx"
    onnx.save(parse(QKV.format(decls=QKV_DECLS), **qkv_weights(sparsity=0.8)), source)
    flags = [] if merge else ["--no-merge"]
    assert main(["sparsify", str(source), "-o", str(out), "--exclude", "nothing", "--json", *flags]) == 0
    document = json.loads(capsys.readouterr().out)
    step = "merge-sibling-matmuls{min-sparsity=0.5,exclude=nothing},"
    assert document["pipeline"] == f"cleanup,{step if merge else ''}sparsify{{exclude=nothing}}"
    assert op_counts(onnx.load(out))["ai.polaris.SparseMatMul"] == (1 if merge else 3)
