"""correct-bias: the new bias against a NumPy reference, the per-channel mean error it leaves
(with the weights fake-quantized as quantize will), skipped layers, bad input, and the SQNR gain
on a zoo model after the real quantize pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ListSource
from onnx import numpy_helper

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph, to_model
from polaris_opt.fidelity import sqnr_db
from polaris_opt.numerics import run_model
from polaris_opt.passes.correct_bias import CorrectBias
from polaris_opt.passes_api import PassContext, PassResult
from polaris_opt.pipeline import Pipeline
from polaris_opt.quant_params import fake_quantize_weight, weight_axis

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
MODELS = Path(__file__).resolve().parent.parent / "models"
RNG = np.random.default_rng(0)


def parse(text: str, header: str = HEADER, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(header + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def floats(*shape: int, mean: float = 0.0) -> np.ndarray:
    return (RNG.standard_normal(shape) + mean).astype(np.float32)


def correct(model: onnx.ModelProto, batches, **options) -> tuple[onnx.ModelProto, PassResult]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = to_graph(copy)
    result = CorrectBias(**options).run(graph, PassContext(calib=ListSource(batches)))
    out = to_model(graph, copy)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def split(x: np.ndarray, name: str = "x", parts: int = 4) -> list[dict[str, np.ndarray]]:
    return [{name: part} for part in np.array_split(x, parts)]


def with_quantized_weights(model: onnx.ModelProto, per_channel: bool = True) -> onnx.ModelProto:
    """`model` with every Conv/Gemm/MatMul weight replaced by what int8 makes of it."""
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    weights = {t.name: t for t in quantized.graph.initializer}
    for node in quantized.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in weights:
            tensor = weights[node.input[1]]
            w = numpy_helper.to_array(tensor)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axis = weight_axis(node.op_type, attrs, w.ndim) if per_channel else None
            tensor.CopyFrom(numpy_helper.from_array(fake_quantize_weight(w, axis), tensor.name))
    return quantized


def channel_mean_error(reference, model, x: np.ndarray, axis: int, output: str = "y") -> np.ndarray:
    """Per output channel, the mean of (model − reference) over every other axis."""
    error = run_model(model, {"x": x})[output].astype(np.float64) - run_model(reference, {"x": x})[output]
    return np.moveaxis(error, axis, -1).reshape(-1, error.shape[axis]).mean(axis=0)


GEMM = """
  g (float[N,6] x) => (float[N,4] y) <float[4,6] w, float[4] b> {
    y = Gemm<transB = 1>(x, w, b) }"""


def test_gemm_bias_is_corrected_by_the_numpy_shift():
    w, b = floats(4, 6), floats(4)
    model = parse(GEMM, w=w, b=b)
    x = floats(64, 6, mean=3.0)  # a non-zero mean input makes the shift large
    out, result = correct(model, split(x))
    delta = fake_quantize_weight(w, 0).astype(np.float64) - w
    expected = b - delta @ x.astype(np.float64).mean(axis=0)
    new_bias = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name != "w"))
    np.testing.assert_allclose(new_bias, expected, rtol=1e-6, atol=1e-7)
    assert result.stats["corrected"] == 1 and result.modified

    # With the int8 weight, the per-channel mean error is gone; without correction it is not.
    before = channel_mean_error(model, with_quantized_weights(model), x, axis=1)
    after = channel_mean_error(model, with_quantized_weights(out), x, axis=1)
    assert np.max(np.abs(before)) > 1e-3
    assert np.max(np.abs(after)) < 1e-5

    # The SQNR figures in details are those of the layer output against the float output.
    y = x.astype(np.float64) @ w.T.astype(np.float64) + b
    error = x.astype(np.float64) @ delta.T
    row = result.details["layers"][0]
    assert row["sqnr_before_db"] == pytest.approx(10 * np.log10(np.sum(y**2) / np.sum(error**2)), abs=2e-3)
    centred = error - error.mean(axis=0)
    assert row["sqnr_after_db"] == pytest.approx(10 * np.log10(np.sum(y**2) / np.sum(centred**2)), abs=2e-3)
    assert result.stats["mean_sqnr_gain_db"] == pytest.approx(row["sqnr_after_db"] - row["sqnr_before_db"])


def test_gemm_alpha_beta_trans_a_and_a_missing_bias():
    model = parse(
        """
      g (float[6,N] x) => (float[N,4] y, float[N,4] z) <float[6,4] w, float[1,4] c, float[6,4] v> {
        y = Gemm<transA = 1, alpha = 2.0, beta = 0.5>(x, w, c)
        z = Gemm<transA = 1>(x, v) }""",
        w=floats(6, 4),
        c=floats(1, 4),
        v=floats(6, 4),
    )
    x = floats(6, 40, mean=-2.0)
    out, result = correct(model, [{"x": x}])  # the batch runs along axis 1 here: one batch
    assert result.stats["corrected"] == 2
    quantized = with_quantized_weights(out)
    for output in ("y", "z"):
        assert np.max(np.abs(channel_mean_error(model, quantized, x, 1, output))) < 1e-5
    gemm = next(n for n in out.graph.node if n.output[0] == "y")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}["beta"] == 1.0
    assert len(out.graph.node[1].input) == 3  # a bias appears where there was none


@pytest.mark.parametrize("group", [1, 2])
def test_pointwise_conv_shift_is_the_weight_error_times_the_channel_mean(group):
    # For a 1×1 Conv the measured shift is exactly ΔW·E[x] per group, E[x] over batch and space.
    w = floats(6, 4 // group, 1, 1)
    model = parse(
        f"""
      g (float[N,4,5,5] x) => (float[N,6,5,5] y) <float[6,{4 // group},1,1] w> {{
        y = Conv<group = {group}>(x, w) }}""",
        w=w,
    )
    x = floats(8, 4, 5, 5, mean=1.5)
    out, _ = correct(model, split(x))
    delta = (fake_quantize_weight(w, 0).astype(np.float64) - w).reshape(6, 4 // group)
    channel_mean = x.astype(np.float64).mean(axis=(0, 2, 3)).reshape(group, 4 // group)
    shift = np.einsum("oc,oc->o", delta, np.repeat(channel_mean, 6 // group, axis=0))
    bias = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name != "w"))
    np.testing.assert_allclose(bias, -shift, rtol=1e-5, atol=1e-7)


def test_padded_conv_mean_error_is_removed_per_channel():
    # Padding makes ΔW·E[x] approximate at the borders; the measured shift is exact on the data.
    model = parse(
        """
      g (float[N,3,6,6] x) => (float[N,5,6,6] y) <float[5,3,3,3] w, float[5] b> {
        y = Conv<pads = [1, 1, 1, 1]>(x, w, b) }""",
        w=floats(5, 3, 3, 3),
        b=floats(5),
    )
    x = floats(12, 3, 6, 6, mean=2.0)
    out, result = correct(model, split(x, parts=3))
    before = channel_mean_error(model, with_quantized_weights(model), x, axis=1)
    after = channel_mean_error(model, with_quantized_weights(out), x, axis=1)
    assert np.max(np.abs(after)) < 1e-5 < np.max(np.abs(before))
    row = result.details["layers"][0]
    assert row["sqnr_after_db"] > row["sqnr_before_db"]
    assert row["max_abs_shift"] == pytest.approx(np.max(np.abs(before)), rel=1e-4)


def test_matmul_bias_add_is_corrected_and_a_bare_matmul_is_skipped():
    model = parse(
        """
      g (float[N,5,8] x) => (float[N,5,4] y, float[N,5,4] z) <float[8,4] w, float[4] b, float[8,4] v> {
        m = MatMul(x, w)
        y = Add(b, m)
        z = MatMul(x, v) }""",
        w=floats(8, 4),
        b=floats(4),
        v=floats(8, 4),
    )
    x = floats(6, 5, 8, mean=1.0)
    out, result = correct(model, split(x, parts=2))
    assert (result.stats["corrected"], result.stats["skipped"]) == (1, 1)
    assert result.details["skipped"][0]["reason"].startswith("MatMul has no constant bias Add")
    quantized = with_quantized_weights(out)
    assert np.max(np.abs(channel_mean_error(model, quantized, x, -1, "y"))) < 1e-5
    # The bare MatMul keeps its error: nothing was changed on its path.
    np.testing.assert_array_equal(run_model(out, {"x": x})["z"], run_model(model, {"x": x})["z"])


def test_per_tensor_weights_use_one_scale():
    w, b = floats(4, 6), floats(4)
    model = parse(GEMM, w=w, b=b)
    x = floats(32, 6, mean=2.0)
    out, _ = correct(model, split(x), per_channel=False)
    after = channel_mean_error(model, with_quantized_weights(out, per_channel=False), x, axis=1)
    assert np.max(np.abs(after)) < 1e-5
    expected = b - (fake_quantize_weight(w, None).astype(np.float64) - w) @ x.astype(np.float64).mean(0)
    new_bias = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name != "w"))
    np.testing.assert_allclose(new_bias, expected, rtol=1e-6, atol=1e-7)


def test_below_opset_13_weights_are_per_tensor_as_quantize_makes_them():
    w, b = floats(4, 6), floats(4)
    model = parse(GEMM, header='<ir_version: 7, opset_import: ["" : 11]>', w=w, b=b)
    x = floats(32, 6, mean=2.0)
    out, _ = correct(model, split(x), per_channel=True)
    expected = b - (fake_quantize_weight(w, None).astype(np.float64) - w) @ x.astype(np.float64).mean(0)
    new_bias = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name != "w"))
    np.testing.assert_allclose(new_bias, expected, rtol=1e-6, atol=1e-7)


def test_excluded_layers_and_a_shared_bias_stay_as_they_were():
    model = parse(
        """
      g (float[N,6] x) => (float[N,4] y, float[N,4] z) <float[4,6] w, float[4,6] v, float[4] b> {
        y = Gemm<transB = 1>(x, w, b)
        z = Gemm<transB = 1>(x, v, b) }""",
        w=floats(4, 6),
        v=floats(4, 6),
        b=floats(4),
    )
    x = floats(16, 6, mean=1.0)
    model.graph.node[1].name = "second"
    out, result = correct(model, split(x), exclude="second")
    assert result.stats["corrected"] == 1 and result.details["skipped"][0]["reason"] == "excluded"
    ref, got = run_model(model, {"x": x}), run_model(out, {"x": x})
    np.testing.assert_array_equal(got["z"], ref["z"])  # still reads the original b
    assert not np.array_equal(got["y"], ref["y"])
    _, by_type = correct(model, split(x), exclude="Gemm")
    assert by_type.stats["corrected"] == 0 and not by_type.modified


def test_layers_inside_an_if_branch_are_left_alone():
    model = parse(
        """
      g (float[N,6] x, bool k) => (float[N,4] y) <float[4,6] w, float[4] b> {
        y = If(k) <
          then_branch = t () => (float[N,4] a) { a = Gemm<transB = 1>(x, w, b) },
          else_branch = e () => (float[N,4] o) { o = Gemm<transB = 1>(x, w) } > }""",
        w=floats(4, 6),
        b=floats(4),
    )
    batches = [{"x": floats(4, 6, mean=1.0), "k": np.array(True)}]
    out, result = correct(model, batches)
    assert not result.modified and result.stats["corrected"] == 0
    for k in (True, False):
        feeds = {"x": batches[0]["x"], "k": np.array(k)}
        np.testing.assert_array_equal(run_model(out, feeds)["y"], run_model(model, feeds)["y"])


def test_a_bias_computed_at_run_time_is_left_alone():
    model = parse(
        """
      g (float[N,6] x, float[4] b) => (float[N,4] y) <float[4,6] w> {
        y = Gemm<transB = 1>(x, w, b) }""",
        w=floats(4, 6),
    )
    _, result = correct(model, [{"x": floats(8, 6), "b": floats(4)}])
    assert not result.modified and result.details["skipped"][0]["reason"] == "bias is not a constant float32"


def test_no_calibration_data_is_bad_input():
    graph = to_graph(parse(GEMM, w=floats(4, 6), b=floats(4)))
    with pytest.raises(BadInput, match="correct-bias needs calibration data"):
        CorrectBias().run(graph, PassContext())


def test_quantized_zoo_model_gains_output_sqnr():
    # Measured: 41.8 dB without, 44.9 dB with bias correction on the 194 held-out digits.
    model = onnx.load(MODELS / "digits_mlp.onnx")
    x = np.load(MODELS / "digits_test.npz")["x_mlp"]
    calib, held_out = split(x[:256], "input", parts=8), x[256:]
    reference = run_model(model, {"input": held_out})["logits"]
    sqnr = {}
    for pipeline in (
        "cleanup,calibrate{method=minmax},quantize",
        "cleanup,calibrate{method=minmax},correct-bias,quantize",
    ):
        quantized = run_pipeline(
            model, Pipeline.parse(pipeline), ctx=PassContext(calib=ListSource(calib))
        ).model
        sqnr[pipeline] = sqnr_db(reference, run_model(quantized, {"input": held_out})["logits"])
    plain, corrected = sqnr.values()
    assert corrected > plain + 1.5, sqnr
