"""quantize on odd or bad input: missing ranges, unknown ops and domains, no calibration, NaN
weights, zero-width ranges, all-zero weights, int32 overflow, old opsets, dynamic dimensions,
models quantized already, exporter habits (Constant-node weights, Transpose/Cast), If/Loop."""

from __future__ import annotations

import numpy as np
import pytest
from export_like import paddle_like, tf2onnx_like, with_if, with_loop, with_unknown_domains
from helpers import op_counts
from test_quantize import (
    MLP,
    RNG,
    cleaned,
    conv_model,
    floats,
    initializer,
    layer,
    minmax_ranges,
    mlp,
    node_feeding,
    parse,
    quantized,
)

from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.fidelity import sqnr_db
from polaris_opt.numerics import run_model
from polaris_opt.passes_api import PassContext


def test_a_tensor_without_range_stays_float_and_is_reported():
    model, batches = mlp()
    ranges = minmax_ranges(cleaned(model), batches)
    del ranges["r"]
    out, result = quantized(model, batches, ranges=ranges)
    assert result.details["missing_ranges"] == ["r"]
    assert layer(result, "fc2") == {
        "name": "fc2",
        "op": "Gemm",
        "precision": "float",
        "reason": "no calibration range for 'r'",
    }
    assert op_counts(out)["Relu"] == 1  # nothing would clamp for it


def test_unsupported_ops_and_other_domains_are_left_and_listed():
    model, feeds = with_unknown_domains()
    runnable, _ = with_unknown_domains(custom=False)  # ONNX Runtime cannot run my.custom.Foo
    out, result = quantized(model, [], ranges=minmax_ranges(cleaned(runnable), [feeds]))
    assert op_counts(out) == op_counts(model) and not result.modified
    assert result.details["float_ops"] == {"FusedMatMul": 1, "Gelu": 1, "Relu": 1, "Foo": 1}
    assert layer(result, "Foo_0")["reason"] == "domain 'my.custom' is left as it is"
    softmax = parse(
        """
      g (float[batch,8] x) => (float[batch,4] y) <float[8,4] w> {
        m = MatMul(x, w)
        y = Softmax(m) }""",
        w=floats(8, 4),
    )
    _, result = quantized(softmax, [{"x": floats(4, 8)}])
    assert result.details["float_ops"] == {"Softmax": 1}


# ---------------------------------------------------------------------------- bad or odd input


def test_no_calibration_is_a_clear_bad_input():
    from polaris_opt.passes.quantize import Quantize

    with pytest.raises(BadInput, match=r"put calibrate\{method=...\} before it"):
        Quantize().run(to_graph(mlp()[0]), PassContext())


def test_nan_weight_is_a_bad_input_naming_the_node():
    model = parse(MLP, w1=floats(6, 8), b1=floats(6), w2=np.full((6, 3), np.nan, np.float32), b2=floats(3))
    with pytest.raises(BadInput, match="weight 'w2' of Gemm node 'fc2' holds NaN or Inf"):
        quantized(model, [{"x": floats(4, 8)}])


def test_constant_activation_and_all_zero_weights_give_valid_scales_and_finite_outputs():
    model = parse(MLP, w1=np.zeros((6, 8), np.float32), b1=floats(6), w2=floats(6, 3), b2=floats(3))
    out, _ = quantized(model, [{"x": np.zeros((4, 8), np.float32)}])  # x and h: zero-width ranges
    scales = [initializer(out, n.input[1]) for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)
    # All-zero weight rows get scales that keep their int32 bias to float32 precision.
    bias_dq = node_feeding(out, "Gemm", 2)
    stored = initializer(out, bias_dq.input[0]) * initializer(out, bias_dq.input[1])
    np.testing.assert_allclose(stored, initializer(model, "b1"), rtol=1e-6)
    x = floats(3, 8)
    expected = run_model(model, {"x": x})["y"]  # w1 = 0: the output does not depend on x
    got = run_model(out, {"x": x})["y"]
    assert np.all(np.isfinite(got)) and sqnr_db(expected, got) > 30


def test_a_bias_that_would_overflow_int32_stays_float():
    model = parse(
        """
      g (float[batch,4] x) => (float[batch,2] y) <float[4,2] w, float[2] b> {
        y = Gemm(x, w, b) }""",
        w=np.full((4, 2), 1e-4, np.float32),
        b=np.array([1e3, -1e3], np.float32),
    )
    out, result = quantized(model, [{"x": np.full((2, 4), 1e-4, np.float32)}])
    assert "int32 codes would overflow" in result.details["layers"][0]["reason"]
    assert result.stats["biases_quantized"] == 0
    x = np.full((1, 4), 1e-4, np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-4)


def test_opset_10_falls_back_to_per_tensor_and_absorbs_a_clip_with_attributes():
    # Before opset 11 Clip held min and max as attributes; before 13 DequantizeLinear had no axis.
    text = MLP.replace("Relu(h)", "Clip<min = 0.0, max = 6.0>(h)")
    model = parse(text, opset=10, w1=floats(6, 8), b1=floats(6), w2=floats(6, 3), b2=floats(3))
    out, result = quantized(model, [{"x": floats(64, 8)}])
    assert result.details["per_channel"] is False and "opset 13" in result.details["notes"][0]
    assert all(not n.attribute for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert "Clip" not in op_counts(out)
    x = floats(8, 8, scale=0.5)
    assert sqnr_db(run_model(model, {"x": x})["y"], run_model(out, {"x": x})["y"]) > 25


def test_opset_9_has_no_quantizelinear():
    model = parse(MLP, opset=9, w1=floats(6, 8), b1=floats(6), w2=floats(6, 3), b2=floats(3))
    with pytest.raises(BadInput, match="QuantizeLinear needs 10 or later"):
        quantized(model, [{"x": floats(4, 8)}])


def test_dynamic_batch_and_spatial_dimensions_are_kept():
    model, batches = conv_model()  # x: [batch, 3, h, w], calibrated at 10x10
    out, _ = quantized(model, batches)
    for values in (out.graph.input, out.graph.output):
        assert [d.dim_param for d in values[0].type.tensor_type.shape.dim] == ["batch", "", "h", "w"]
    for shape in ((1, 3, 10, 10), (7, 3, 5, 13)):
        x = floats(*shape, scale=0.5)
        got = run_model(out, {"x": x})["y"]
        assert got.shape == (shape[0], 4, *shape[2:])
        assert sqnr_db(run_model(model, {"x": x})["y"], got) > 25


def test_a_model_already_in_qdq_is_left_as_it_is():
    # Quantization-aware training output: every Conv input already comes through a DQ.
    model = parse(
        """
      g (float[batch,3,6,6] x) => (float[batch,4,6,6] y)
        <int8[4,3,3,3] wq, float[4] ws, int8[4] wz, int32[4] bq, float[4] bs, int32[4] bz,
         float xs, uint8 xz, float ys, uint8 yz> {
        xq = QuantizeLinear(x, xs, xz)
        xd = DequantizeLinear(xq, xs, xz)
        wd = DequantizeLinear<axis = 0>(wq, ws, wz)
        bd = DequantizeLinear<axis = 0>(bq, bs, bz)
        c = Conv<pads = [1, 1, 1, 1]>(xd, wd, bd)
        cq = QuantizeLinear(c, ys, yz)
        y = DequantizeLinear(cq, ys, yz) }""",
        wq=RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8),
        ws=np.full(4, 0.01, np.float32),
        wz=np.zeros(4, np.int8),
        bq=RNG.integers(-100, 100, 4).astype(np.int32),
        bs=np.full(4, 1e-4, np.float32),
        bz=np.zeros(4, np.int32),
        xs=np.float32(0.02),
        xz=np.uint8(128),
        ys=np.float32(0.05),
        yz=np.uint8(128),
    )
    out, result = quantized(model, [{"x": floats(2, 3, 6, 6)}])
    assert not result.modified and op_counts(out) == op_counts(model)
    assert result.details["layers"][0]["reason"] == "already quantized in the input model"


def test_weights_in_constant_nodes_are_quantized_after_cleanup_and_the_file_shrinks():
    model, feeds = paddle_like()
    out, result = quantized(model, [feeds])
    assert result.stats["weights_quantized"] == 2 and op_counts(out)["Conv"] == 1
    weights = sum(t.ByteSize() for t in out.graph.initializer)
    float_weights = sum(t.ByteSize() for t in cleaned(model).graph.initializer)
    assert weights <= 0.35 * float_weights
    # The whole file: 2.7k parameters are too few for the Q/DQ nodes' names not to count (0.48x).
    assert out.ByteSize() <= 0.5 * model.ByteSize()
    assert (
        sqnr_db(
            run_model(model, feeds)[model.graph.output[0].name],
            run_model(out, feeds)[model.graph.output[0].name],
        )
        > 25
    )


def test_weights_behind_transpose_and_cast_are_quantized_after_cleanup():
    model, feeds = tf2onnx_like()
    out, result = quantized(model, [feeds])
    conv = next(row for row in result.details["layers"] if row["op"] == "Conv")
    assert conv["precision"] == "int8" and result.stats["biases_quantized"] == 1
    output = model.graph.output[0].name
    assert sqnr_db(run_model(model, feeds)[output], run_model(out, feeds)[output]) > 25


@pytest.mark.parametrize("build", [with_if, with_loop])
def test_if_and_loop_models_are_left_whole(build):
    model, feeds = build()
    out, result = quantized(model, [feeds])
    assert op_counts(out, recursive=True) == op_counts(cleaned(model), recursive=True)
    expected, got = run_model(model, feeds), run_model(out, feeds)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert any("control flow" in row["reason"] for row in result.details["layers"])


def test_a_quantized_tensor_read_inside_an_if_branch_still_runs_both_branches():
    model = parse(
        """
      g (float[batch,8] x, bool k) => (float[batch,4] y) <float[8,4] w, float[4] b> {
        m = MatMul(x, w)
        a = Add(m, b)
        y = If(k) <
          then_branch = t () => (float[batch,4] p) { p = Relu(m) },
          else_branch = e () => (float[batch,4] q) { q = Neg(a) } > }""",
        w=floats(8, 4),
        b=floats(4),
    )
    batches = [{"x": floats(64, 8), "k": np.array(True)}]
    # Not `cleanup`: its infer-shapes forgets the types of main-graph tensors a branch reads.
    out, result = quantized(model, batches, clean=False)
    assert result.stats["layers_quantized"] == 1  # the MatMul; the If and its branches stay float
    assert op_counts(out.graph.node[-1].attribute[0].g) == {"Relu": 1}
    for k in (True, False):
        feeds = {"x": floats(64, 8, scale=0.5), "k": np.array(k)}  # inside the calibrated range
        assert sqnr_db(run_model(model, feeds)["y"], run_model(out, feeds)["y"]) > 25


def test_a_weight_quantized_by_the_model_is_kept_and_its_scale_used_for_the_bias():
    wq = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    model = parse(
        """
      g (float[batch,3,6,6] x) => (float[batch,4,6,6] y)
        <int8[4,3,3,3] wq, float[4] ws, int8[4] wz, float[4] b> {
        wd = DequantizeLinear<axis = 0>(wq, ws, wz)
        [conv] y = Conv<pads = [1, 1, 1, 1]>(x, wd, b) }""",
        wq=wq,
        ws=np.full(4, 0.01, np.float32),
        wz=np.zeros(4, np.int8),
        b=floats(4),
    )
    out, result = quantized(model, [{"x": floats(32, 3, 6, 6)}])
    assert result.stats["weights_quantized"] == 0 and result.stats["biases_quantized"] == 1
    assert op_counts(out) == {"Conv": 1, "QuantizeLinear": 2, "DequantizeLinear": 4}  # x, y; w, b
    x = floats(2, 3, 6, 6, scale=0.5)  # inside the calibrated range
    assert sqnr_db(run_model(model, {"x": x})["y"], run_model(out, {"x": x})["y"]) > 30


def test_an_absorbed_clip_caps_its_output_range_at_its_bounds():
    # A range wider than the Clip (percentile or entropy calibration can give one) must not
    # widen the Q that now does the clamping: Clip(0, 6) means [0, 6] at most.
    text = MLP.replace("Relu(h)", "Clip(h, lo, hi)").replace(
        "float[3] b2>", "float[3] b2, float lo, float hi>"
    )
    model = parse(
        text,
        w1=floats(6, 8),
        b1=floats(6),
        w2=floats(6, 3),
        b2=floats(3),
        lo=np.float32(0.0),
        hi=np.float32(6.0),
    )
    batches = [{"x": floats(16, 8)}]
    ranges = minmax_ranges(cleaned(model), batches) | {"r": (-1.0, 10.0)}
    out, _ = quantized(model, batches, ranges=ranges)
    assert "Clip" not in op_counts(out)
    q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r")
    assert initializer(out, q.input[1]) == np.float32(6.0 / 255) and initializer(out, q.input[2]) == 0


@pytest.mark.parametrize("build", [mlp, conv_model])
def test_quantizing_a_quantized_model_again_changes_nothing(build):
    model, batches = build()
    once, _ = quantized(model, batches)
    twice, result = quantized(once, batches)
    assert not result.modified and op_counts(twice) == op_counts(once)
    assert result.stats["layers_quantized"] == sum(
        op in ("Gemm", "Conv") for op in op_counts(once).elements()
    )
