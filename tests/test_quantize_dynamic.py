"""quantize-dynamic: MatMul/Gemm become com.microsoft.DynamicQuantizeMatMul with int8 weights.

Each rewrite is checked three ways: against a NumPy reference of the contrib op computed from
the int8 weights and scales the pass wrote (exact up to float rounding), against the float
model (SQNR bounds measured on the zoo), and against onnxruntime.quantization.quantize_dynamic
on the same model (the anchor: same weights, same run-time activation quantization).
"""

from __future__ import annotations

from pathlib import Path

import export_like
import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, op_counts, run_pass, run_pass_with_stats
from onnx import numpy_helper

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.fidelity import compare_models, overall, top1_accuracy
from polaris_opt.numerics import make_session, run_model
from polaris_opt.passes.lift_constants import LiftConstants
from polaris_opt.passes.quantize_dynamic import QuantizeDynamic
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline
from polaris_opt.quant_params import activation_params, quantize

MODELS = Path(__file__).resolve().parent.parent / "models"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
QDQ_MATMUL = "com.microsoft.DynamicQuantizeMatMul"
RNG = np.random.default_rng(0)

# Measured on this code (2-core x86 with AVX-512 VNNI, onnxruntime 1.31), 4 batches of 8 N(0, 1)
# inputs: transformer_s 36.5 dB per-channel / 35.1 dB per-tensor, digits_mlp on its test split
# 42.0 / 40.4 dB; onnxruntime's quantize_dynamic gives the same figures. Bounds leave ~2 dB.
TRANSFORMER_SQNR_DB = 34.0
MLP_SQNR_DB = 39.0
FP32_MLP_ACCURACY = 0.9778  # models/README.md: 440/450


def floats(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def parse(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def quantize_model(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    out, stats = run_pass_with_stats(QuantizeDynamic(**options), model)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def zoo(name: str) -> onnx.ModelProto:
    return onnx.load(MODELS / f"{name}.onnx")


def random_batches(input_name: str, shape: tuple[int, ...], count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{input_name: rng.standard_normal((8, *shape)).astype(np.float32)} for _ in range(count)]


def sqnr(reference: onnx.ModelProto, candidate: onnx.ModelProto, batches) -> float:
    return overall(compare_models(make_session(reference), make_session(candidate), batches)).sqnr_db


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def reference_dynamic_matmul(a, b, b_scale, b_zero_point, bias=None) -> np.ndarray:
    """NumPy DynamicQuantizeMatMul, as ONNX Runtime's CPU kernel computes it: A to uint8 over its own
    range widened to hold 0, integer product, then scaled by a_scale · b_scale (per column)."""
    a_params = activation_params(float(a.min()), float(a.max()))
    q_a = quantize(a, a_params).astype(np.int64) - int(a_params.zero_point)
    product = q_a @ (b.astype(np.int64) - b_zero_point.astype(np.int64))
    y = product.astype(np.float64) * (np.float64(a_params.scale) * b_scale.astype(np.float64))
    return (y + (bias if bias is not None else 0.0)).astype(np.float32)


def rewritten_inputs(model: onnx.ModelProto, node_index: int = 0) -> list[np.ndarray | None]:
    node = model.graph.node[node_index]
    assert f"{node.domain}.{node.op_type}" == QDQ_MATMUL
    values = initializers(model)
    return [values.get(name) for name in node.input[1:]]


# --- the zoo: fidelity, size, accuracy, against onnxruntime's quantizer ------------------------------


def test_transformer_matmuls_become_int8_and_stay_close():
    model = zoo("transformer_s")
    out, stats = quantize_model(model)
    # 12 projections with weights; the 4 attention products (Q·Kᵀ, P·V) multiply two activations.
    assert op_counts(out)[QDQ_MATMUL] == 12 and op_counts(out)["MatMul"] == 4
    assert stats["quantized"] == 12 and stats["kept_float"] == 4
    assert sqnr(model, out, random_batches("tokens", (16, 64))) >= TRANSFORMER_SQNR_DB
    size_ratio = out.ByteSize() / model.ByteSize()
    assert size_ratio < 0.35  # measured 0.328: 64x64 fp32 -> int8 plus 64 scales and zero points


def test_transformer_details_say_why_attention_products_stay_float():
    result = QuantizeDynamic().run(to_graph(zoo("transformer_s")), PassContext())
    rows = {row["name"]: row for row in result.details["layers"]}
    assert rows["/layers/0/self_attn/MatMul"] == {
        "name": "/layers/0/self_attn/MatMul",
        "op": "MatMul",
        "precision": "float",
        "reason": "weight is computed at run time",
    }
    q_proj = rows["/layers/0/self_attn/q_proj/MatMul"]
    assert (
        q_proj["precision"] == "int8"
        and q_proj["shape"] == [64, 64]
        and q_proj["granularity"] == "per-channel"
    )
    assert q_proj["weight_sqnr_db"] > 35  # 8-bit symmetric on He-initialized weights: ~40 dB


def test_digits_mlp_keeps_its_accuracy():
    model = zoo("digits_mlp")
    out, stats = quantize_model(model)
    assert op_counts(out) == {QDQ_MATMUL: 3, "Relu": 2} and stats["quantized"] == 3
    with np.load(MODELS / "digits_test.npz") as data:
        batches, labels = [{"input": data["x_mlp"]}], data["y"]
    accuracy = top1_accuracy(make_session(out), batches, labels)
    assert accuracy == pytest.approx(top1_accuracy(make_session(model), batches, labels), abs=1e-9)
    assert abs(accuracy - FP32_MLP_ACCURACY) <= 0.01  # measured: 97.78 %, unchanged
    assert sqnr(model, out, batches) >= MLP_SQNR_DB
    assert out.ByteSize() / model.ByteSize() < 0.35  # measured 0.316


@pytest.mark.parametrize("per_channel", [True, False])
def test_fidelity_matches_onnxruntime_quantize_dynamic(per_channel, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = zoo("transformer_s")
    theirs_path = tmp_path / "ort.onnx"
    quantize_dynamic(
        MODELS / "transformer_s.onnx", theirs_path, per_channel=per_channel, weight_type=QuantType.QInt8
    )
    ours, _ = quantize_model(model, per_channel=per_channel)
    batches = random_batches("tokens", (16, 64), count=2)
    ours_db, theirs_db = sqnr(model, ours, batches), sqnr(model, onnx.load(theirs_path), batches)
    assert ours_db >= theirs_db - 0.1  # measured: equal to 0.01 dB
    # Same int8 weights; onnxruntime writes DynamicQuantizeLinear, MatMulInteger, Cast and Muls per layer.
    assert ours.ByteSize() < theirs_path.stat().st_size


def test_dynamic_batch_is_kept():
    model = zoo("digits_mlp")
    out, _ = quantize_model(model)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = make_session(out)
    for batch in (1, 7):
        assert session.run(None, {"input": floats(batch, 64)})[0].shape == (batch, 10)


# --- the op as written: matches the NumPy reference --------------------------------------------------

MATMUL = """
  g (float[N,5,8] x) => (float[N,5,6] y) <float[8,6] w> {
    y = MatMul(x, w) }"""


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_weights_layout_and_numbers(per_channel):
    w = floats(8, 6) * np.linspace(0.1, 3.0, 6, dtype=np.float32)  # columns of very different ranges
    model = parse(MATMUL, w=w)
    out, _ = quantize_model(model, per_channel=per_channel)
    q, scale, zero_point = rewritten_inputs(out)
    assert q.dtype == np.int8 and q.shape == (8, 6) and q.min() >= -127
    assert scale.shape == ((6,) if per_channel else ()) and zero_point.shape == scale.shape
    assert zero_point.dtype == np.int8 and not zero_point.any()
    np.testing.assert_allclose(q * scale, w, atol=float(scale.max()) / 2 + 1e-7)  # within half a step
    x = floats(3, 5, 8)
    got = run_model(out, {"x": x})["y"]
    np.testing.assert_allclose(got, reference_dynamic_matmul(x, q, scale, zero_point), rtol=1e-5, atol=1e-5)


def test_per_channel_is_more_faithful_than_per_tensor_on_uneven_columns():
    w = floats(8, 6) * np.array([0.01, 0.02, 1, 2, 4, 8], dtype=np.float32)
    model = parse(MATMUL, w=w)
    batches = [{"x": floats(4, 5, 8)} for _ in range(3)]
    per_channel = sqnr(model, quantize_model(model)[0], batches)
    per_tensor = sqnr(model, quantize_model(model, per_channel=False)[0], batches)
    assert per_channel > per_tensor


GEMM = """
  g (float[4,8] x) => (float[4,6] y) <float[{w_shape}] w{c_decl}> {{
    y = Gemm<transB = {trans_b}, alpha = {alpha}, beta = {beta}>(x, w{c_input}) }}"""


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), (1,), ()])
def test_gemm_becomes_dynamic_matmul(trans_b, c_shape):
    w_shape = (6, 8) if trans_b else (8, 6)
    c = {"c": floats(*c_shape)} if c_shape is not None else {}
    text = GEMM.format(
        w_shape=",".join(map(str, w_shape)),
        trans_b=trans_b,
        alpha=0.5,
        beta=1.5,
        c_decl=f", float[{','.join(map(str, c_shape))}] c" if c_shape is not None else "",
        c_input=", c" if c_shape is not None else "",
    )
    w = floats(*w_shape)
    model = parse(text, w=w, **c)
    out, stats = quantize_model(model)
    assert op_counts(out) == {QDQ_MATMUL: 1} and stats["quantized"] == 1
    q, scale, zero_point, *bias = rewritten_inputs(out)
    # The op's weight is alpha·B as [K, N]; the bias beta·C, one value per column.
    expected_weight = 0.5 * (w.T if trans_b else w)
    assert q.shape == (8, 6)
    np.testing.assert_allclose(q * scale, expected_weight, atol=float(scale.max()) / 2 + 1e-7)
    if c_shape is None:
        assert bias == []
    else:
        np.testing.assert_allclose(bias[0], np.broadcast_to(1.5 * c["c"].reshape(-1), (6,)), rtol=1e-6)
    x = floats(4, 8)
    got = run_model(out, {"x": x})["y"]
    np.testing.assert_allclose(
        got, reference_dynamic_matmul(x, q, scale, zero_point, *bias), rtol=1e-5, atol=1e-5
    )
    assert sqnr(model, out, [{"x": floats(4, 8)} for _ in range(4)]) > 30


@pytest.mark.parametrize(
    ("text", "initializers", "reason"),
    [
        (  # one bias per row, with as many rows as columns: it must not pass for a per-column one
            """
          g (float[6,8] x) => (float[6,6] y) <float[8,6] w, float[6,1] c> {
            y = Gemm(x, w, c) }""",
            {"w": floats(8, 6), "c": floats(6, 1)},
            "Gemm bias C of shape [6, 1] is not one value per column",
        ),
        (
            """
          g (float[8,4] x) => (float[4,6] y) <float[8,6] w> {
            y = Gemm<transA = 1>(x, w) }""",
            {"w": floats(8, 6)},
            "Gemm with transA=1",
        ),
        (
            """
          g (float[2,5,8] x) => (float[2,5,6] y) <float[2,8,6] w> {
            y = MatMul(x, w) }""",
            {"w": floats(2, 8, 6)},
            "weight has rank 3; only 2-D weights are quantized",
        ),
        (
            """
          g (float[1,3,6,6] x) => (float[1,4,6,6] y) <float[4,3,3,3] w> {
            y = Conv<pads = [1, 1, 1, 1]>(x, w) }""",
            {"w": floats(4, 3, 3, 3)},
            "Conv stays float: dynamic quantization covers MatMul/Gemm",
        ),
    ],
    ids=["per-row-bias", "transA", "rank-3-weight", "conv"],
)
def test_ineligible_layers_stay_float_with_a_reason(text, initializers, reason):
    model = parse(text, **initializers)
    graph = to_graph(model)
    result = QuantizeDynamic().run(graph, PassContext())
    assert not result.modified and result.stats["quantized"] == 0
    assert [row["reason"] for row in result.details["layers"]] == [reason]
    assert op_counts(run_pass(QuantizeDynamic(), model)) == op_counts(model)


def test_a_weight_in_a_constant_node_is_quantized_once_lifted():
    model, feeds = export_like.paddle_like()
    graph = to_graph(model)
    rows = QuantizeDynamic().run(graph, PassContext()).details["layers"]
    matmul = next(row for row in rows if row["op"] == "MatMul")
    assert matmul["reason"] == "weight is held in a Constant node (run lift-constants first)"
    out = run_pass(QuantizeDynamic(), run_pass(LiftConstants(), model))
    assert op_counts(out)[QDQ_MATMUL] == 1 and op_counts(out)["Conv"] == 1
    reference, got = run_model(model, feeds), run_model(out, feeds)
    name = model.graph.output[0].name
    np.testing.assert_allclose(got[name], reference[name], atol=2e-3)  # softmax probabilities


def test_digits_cnn_conv_stays_float_and_gemm_is_quantized():
    out, stats = quantize_model(zoo("digits_cnn"))
    assert op_counts(out)["Conv"] == 2 and op_counts(out)[QDQ_MATMUL] == 1
    assert stats["kept_float"] == 2


# --- options ---------------------------------------------------------------------------------------


TWO_LAYERS = """
  g (float[N,8] x) => (float[N,4] y) <float[8,6] w1, float[6,4] w2> {
    h = MatMul(x, w1)
    y = MatMul(h, w2) }"""


def two_layers() -> onnx.ModelProto:
    model = parse(TWO_LAYERS, w1=floats(8, 6), w2=floats(6, 4))
    model.graph.node[0].name, model.graph.node[1].name = "first", "second"
    return model


def test_exclude_by_node_name():
    out, stats = quantize_model(two_layers(), exclude="first")
    assert [n.op_type for n in out.graph.node] == ["MatMul", "DynamicQuantizeMatMul"]
    assert out.graph.node[0].name == "first"
    assert (stats["quantized"], stats["kept_float"]) == (1, 1)


def test_exclude_by_op_type_and_several_entries():
    out, stats = quantize_model(two_layers(), exclude="MatMul")
    assert op_counts(out) == {"MatMul": 2} and stats["quantized"] == 0
    out, _ = quantize_model(two_layers(), exclude=" first ; second ")
    assert op_counts(out) == {"MatMul": 2}


def test_exclude_entries_that_match_nothing_are_reported():
    result = QuantizeDynamic(exclude="frist;MatMul").run(to_graph(two_layers()), PassContext())
    assert result.details["unmatched_exclude"] == ["frist"]


def test_a_shared_weight_is_stored_once():
    model = parse(
        """
      g (float[N,8] x, float[N,8] z) => (float[N,6] y, float[N,6] v) <float[8,6] w> {
        y = MatMul(x, w)
        v = MatMul(z, w) }""",
        w=floats(8, 6),
    )
    out, stats = quantize_model(model)
    assert op_counts(out) == {QDQ_MATMUL: 2} and stats["weights_int8"] == 1
    assert {t.data_type for t in out.graph.initializer} == {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT}
    assert len(out.graph.initializer) == 3  # int8 weight, scales, zero points: once


def test_nan_weight_is_bad_input_naming_the_node():
    w = floats(8, 6)
    w[2, 3] = np.nan
    model = two_layers()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    with pytest.raises(BadInput, match=r"node 'first' \(MatMul\): weight 'w1' holds NaN or Inf"):
        run_pass(QuantizeDynamic(), model)
    out, _ = quantize_model(model, exclude="first")  # the escape the message offers
    assert op_counts(out) == {"MatMul": 1, QDQ_MATMUL: 1}


def test_com_microsoft_is_declared_once():
    out, _ = quantize_model(two_layers())
    assert sorted((o.domain, o.version) for o in out.opset_import) == [("", 17), ("com.microsoft", 1)]


def test_runs_in_a_pipeline_with_verification():
    text = "cleanup,quantize-dynamic{per-channel=false,exclude=/fc3/Gemm}"
    result = run_pipeline(zoo("digits_mlp"), Pipeline.parse(text))
    assert op_counts(result.model) == {QDQ_MATMUL: 2, "Gemm": 1, "Relu": 2}
    assert result.reports[-1].stats["quantized"] == 2


# --- sub-graphs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [export_like.with_if, export_like.with_loop])
def test_control_flow_models_without_matmuls_are_left_alone(builder):
    model, feeds = builder()
    out, stats = quantize_model(model)
    assert stats["quantized"] == 0
    assert op_counts(out, recursive=True) == op_counts(model, recursive=True)
    assert_same_outputs(model, out, feeds)


def test_matmuls_inside_if_branches_read_one_int8_copy_of_an_outer_weight():
    model = parse(
        """
      g (float[N,8] x, bool k) => (float[N,6] y) <float[8,6] w> {
        y = If(k) <
          then_branch = t () => (float[N,6] a) { a = MatMul(x, w) },
          else_branch = e () => (float[N,6] b) { r = Relu(x)
                                                 b = MatMul(r, w) } > }""",
        w=floats(8, 6),
    )
    out, stats = quantize_model(model)
    assert op_counts(out, recursive=True) == {"If": 1, QDQ_MATMUL: 2, "Relu": 1}
    assert stats["weights_int8"] == 1
    assert {t.name for t in out.graph.initializer} == {"w.int8", "w.scale", "w.zero_point"}
    for k in (True, False):
        feeds = {"x": floats(3, 8), "k": np.array(k)}
        reference, got = run_model(model, feeds)["y"], run_model(out, feeds)["y"]
        assert np.max(np.abs(got - reference)) <= 0.05 * np.max(np.abs(reference))
