"""quantize: structure (Q/DQ placement, int8/int32 codes), numerics against a NumPy QDQ reference and
ONNX Runtime, what ONNX Runtime's optimizer fuses, options, bad input and odd models.

Ranges come from min/max over calibration batches (capture.stream_tensors), as `calibrate{method=minmax}`
would leave them; models are cleaned first, as the CLI does.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from helpers import op_counts
from onnx import numpy_helper

from polaris_opt.calib_stats import CalibrationTable
from polaris_opt.capture import float_activations, stream_tensors
from polaris_opt.compiler import run_pipeline
from polaris_opt.export import to_graph, to_model
from polaris_opt.fidelity import sqnr_db
from polaris_opt.numerics import make_session, run_model
from polaris_opt.passes_api import PassContext, PassResult
from polaris_opt.pipeline import Pipeline
from polaris_opt.quant_params import activation_params, quantize, weight_params

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------- helpers


def parse(text: str, opset: int = 17, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>' + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def floats(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def cleaned(model: onnx.ModelProto) -> onnx.ModelProto:
    return run_pipeline(model, Pipeline.parse("cleanup")).model


def minmax_ranges(model: onnx.ModelProto, batches: list[dict]) -> dict[str, tuple[float, float]]:
    """Per float tensor of the main graph, (min, max) over `batches`: what calibrate{minmax} finds."""
    ranges: dict[str, tuple[float, float]] = {}
    for values in stream_tensors(model, batches, float_activations(model)):
        for name, value in values.items():
            low, high = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(low, float(value.min())), max(high, float(value.max())))
    return ranges


def quantized(
    model: onnx.ModelProto, batches: list[dict], ranges: dict | None = None, clean: bool = True, **options
) -> tuple[onnx.ModelProto, PassResult]:
    """Clean `model` (or only infer its shapes), calibrate it on `batches` (or take `ranges`), run the
    pass, check the result."""
    from polaris_opt.passes.quantize import Quantize

    model = cleaned(model) if clean else onnx.shape_inference.infer_shapes(model, strict_mode=True)
    table = CalibrationTable("minmax", ranges if ranges is not None else minmax_ranges(model, batches))
    graph = to_graph(model)
    result = Quantize(**options).run(graph, PassContext(calibration=table))
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def fused_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    """Op counts of the graph ONNX Runtime's CPU optimizer makes of `model` (QLinearConv, QGemm...)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node_feeding(model: onnx.ModelProto, op: str, index: int) -> onnx.NodeProto:
    """The node whose output is input `index` of the (first) `op` node."""
    target = next(n for n in model.graph.node if n.op_type == op)
    return next(n for n in model.graph.node if target.input[index] in n.output)


def layer(result: PassResult, name: str) -> dict:
    return next(row for row in result.details["layers"] if row["name"] == name)


MLP = """
  g (float[batch,8] x) => (float[batch,3] y) <float[6,8] w1, float[6] b1, float[6,3] w2, float[3] b2> {
    [fc1] h = Gemm<transB = 1>(x, w1, b1)
    [relu] r = Relu(h)
    [fc2] y = Gemm(r, w2, b2) }"""


def mlp() -> tuple[onnx.ModelProto, list[dict]]:
    model = parse(MLP, w1=floats(6, 8), b1=floats(6), w2=floats(6, 3), b2=floats(3))
    return model, [{"x": floats(64, 8)} for _ in range(2)]


def reference_mlp(model: onnx.ModelProto, ranges: dict, x: np.ndarray) -> np.ndarray:
    """QDQ semantics in NumPy: x and the Relu output through Q/DQ, int8 weights per channel, int32 biases."""
    w1, b1, w2, b2 = (initializer(model, n) for n in ("w1", "b1", "w2", "b2"))

    def fake(values, params):
        codes = quantize(values, params).astype(np.float32)
        return (codes - params.zero_point.astype(np.float32)) * params.broadcast(params.scale, values.ndim)

    px, pr = activation_params(*ranges["x"]), activation_params(*ranges["r"])
    pw1, pw2 = weight_params(w1, 0), weight_params(w2, 1)
    w1q = quantize(w1, pw1, narrow=True).astype(np.float32) * pw1.scale[:, None]
    w2q = quantize(w2, pw2, narrow=True).astype(np.float32) * pw2.scale[None, :]
    b1q = np.rint(b1 / (px.scale * pw1.scale)) * (px.scale * pw1.scale)
    b2q = np.rint(b2 / (pr.scale * pw2.scale)) * (pr.scale * pw2.scale)
    hidden = fake(fake(x, px) @ w1q.T + b1q, pr)  # the Relu is the Q's clamp at zero point 0
    return fake(hidden, pr) @ w2q + b2q


# ------------------------------------------------------------------------ structure and numbers


def test_mlp_matches_the_numpy_qdq_reference_and_fuses_to_qgemm(tmp_path):
    model, batches = mlp()
    out, result = quantized(model, batches)
    ranges = minmax_ranges(cleaned(model), batches)
    assert op_counts(out) == {"Gemm": 2, "QuantizeLinear": 2, "DequantizeLinear": 6}  # x, r; 2 W, 2 B
    assert result.stats == {
        "layers_quantized": 2,
        "layers_float": 0,
        "qdq_pairs": 2,
        "weights_quantized": 2,
        "biases_quantized": 2,
    }
    x = floats(16, 8, scale=0.5)  # inside the calibrated range: no clipping, only rounding
    literal = make_session(out, optimize=False).run(None, {"x": x})[0]  # Q, DQ and Gemm as written
    np.testing.assert_allclose(literal, reference_mlp(model, ranges, x), rtol=1e-5, atol=1e-5)
    assert fused_ops(out, tmp_path) == {"QuantizeLinear": 1, "QGemm": 2}
    assert sqnr_db(run_model(model, {"x": x})["y"], run_model(out, {"x": x})["y"]) > 30


def test_weights_are_int8_per_output_channel_and_biases_int32_at_input_times_weight_scale():
    model, batches = mlp()
    out, _ = quantized(model, batches)
    w1 = initializer(model, "w1")
    dq = node_feeding(out, "Gemm", 1)  # transB = 1: output channels are the rows of w1
    assert onnx.helper.get_attribute_value(dq.attribute[0]) == 0
    codes, scale = initializer(out, dq.input[0]), initializer(out, dq.input[1])
    assert codes.dtype == np.int8 and codes.min() >= -127 and scale.shape == (6,)
    np.testing.assert_array_equal(codes, quantize(w1, weight_params(w1, 0), narrow=True))
    bias_dq = node_feeding(out, "Gemm", 2)
    bias_codes, bias_scale = initializer(out, bias_dq.input[0]), initializer(out, bias_dq.input[1])
    input_scale = initializer(out, node_feeding(out, "Gemm", 0).input[1])
    assert bias_codes.dtype == np.int32
    np.testing.assert_allclose(bias_scale, input_scale * scale, rtol=1e-6)
    np.testing.assert_array_equal(bias_codes, np.rint(initializer(model, "b1") / bias_scale))


def test_per_tensor_gives_one_scale_and_no_axis():
    model, batches = mlp()
    out, result = quantized(model, batches, per_channel=False)
    for index in (1, 2):
        dq = node_feeding(out, "Gemm", index)
        assert not dq.attribute and initializer(out, dq.input[1]).shape == ()
    assert result.details["per_channel"] is False


CONV_RELU_CONV = """
  g (float[batch,3,h,w] x) => (float[batch,4,h,w] y) <float[8,3,3,3] w1, float[8] b1, float[4,8,1,1] w2> {
    [conv1] c = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    [relu] r = Relu(c)
    [conv2] y = Conv(r, w2) }"""


def conv_model() -> tuple[onnx.ModelProto, list[dict]]:
    model = parse(CONV_RELU_CONV, w1=floats(8, 3, 3, 3, scale=0.3), b1=floats(8), w2=floats(4, 8, 1, 1))
    return model, [{"x": floats(16, 3, 10, 10)}]


def test_conv_relu_conv_fuses_to_qlinearconv_with_no_qdq_between_conv_and_relu(tmp_path):
    model, batches = conv_model()
    out, result = quantized(model, batches)
    assert "Relu" not in op_counts(out)  # the Q after the Conv clamps at zero point 0
    relu_q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r")
    assert initializer(out, relu_q.input[2]) == 0
    assert [o.name for o in out.graph.output] == ["y"]  # the graph output keeps its name
    assert fused_ops(out, tmp_path)["QLinearConv"] == 2
    assert layer(result, "conv1")["reason"] == "Relu 'relu' absorbed: the output Q clamps"
    assert "relu" not in [row["name"] for row in result.details["layers"]]  # part of conv1 now
    x = floats(2, 3, 10, 10, scale=0.5)
    # Three roundings (x, r, y) on a small tensor: 25 dB leaves room for any seed.
    assert sqnr_db(run_model(model, {"x": x})["y"], run_model(out, {"x": x})["y"]) > 25


def test_without_quantized_outputs_the_last_conv_writes_the_graph_output_in_float(tmp_path):
    model, batches = conv_model()
    out, _ = quantized(model, batches, quantize_outputs=False)
    writer = next(n for n in out.graph.node if "y" in n.output)
    assert writer.op_type == "Conv"
    assert fused_ops(out, tmp_path)["QLinearConv"] == 1  # the first; the last one needs its Q to fuse


def test_int8_activations_are_symmetric_and_keep_the_relu_between_two_qdq_of_one_scale(tmp_path):
    model, batches = conv_model()
    out, result = quantized(model, batches, activations="int8")
    assert op_counts(out)["Relu"] == 1
    zero_points = [initializer(out, n.input[2]) for n in out.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 and z == 0 for z in zero_points)
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    before = next(n for n in out.graph.node if n.output[0] == relu.input[0])
    after = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0])
    assert initializer(out, before.input[1]) == initializer(out, after.input[1])  # Relu output's range
    assert result.details["activations"] == "int8"
    x = floats(2, 3, 10, 10, scale=0.5)
    assert sqnr_db(run_model(model, {"x": x})["y"], run_model(out, {"x": x})["y"]) > 25  # 7 bits a side


# ----------------------------------------------------------------------- choosing the layers


def test_exclude_by_name_and_by_op_type_and_include_one_layer():
    model, batches = mlp()
    _, result = quantized(model, batches, exclude="fc1")
    assert [row["precision"] for row in result.details["layers"] if row["op"] == "Gemm"] == ["float", "int8"]
    assert layer(result, "fc1")["reason"] == "excluded"
    assert result.stats["weights_quantized"] == 1
    by_type, result = quantized(model, batches, exclude="Gemm")
    assert op_counts(by_type) == op_counts(cleaned(model)) and not result.modified
    included, result = quantized(model, batches, include="fc2")
    assert layer(result, "fc1")["reason"] == "not in the include list"
    assert layer(result, "relu")["precision"] == "float"  # its producer is float: nothing to absorb it
    assert result.stats["layers_quantized"] == 1 and op_counts(included)["QuantizeLinear"] == 1


def test_pipeline_text_reaches_the_options():
    (step, pass_), *_ = Pipeline.parse("quantize{per-channel=false,activations=int8,exclude=a;Conv}").passes()
    assert step == "quantize{per-channel=false,activations=int8,exclude=a;Conv}"
    assert (pass_.per_channel, pass_.activations.value, pass_.exclude) == (False, "int8", "a;Conv")


OPS_BETWEEN = """
  g (float[batch,3,h,w] x) => (float[batch,4,H,W] y)
    <float[4,3,3,3] w1, float[4] b1, float[4,3,1,1] w2, float[0] roi, float[4] scales, float[8,4,2,2] wt,
     float lo, float hi> {
    [conv_a] a = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    [sigmoid] s = Sigmoid(a)
    [swish] m = Mul(a, s)
    [conv_b] b = Conv(x, w2)
    [concat] c = Concat<axis = 1>(m, b)
    [upsample] u = Resize<mode = "nearest">(c, roi, scales)
    [pool] p = AveragePool<kernel_shape = [2, 2], strides = [2, 2]>(u)
    [deconv] d = ConvTranspose<strides = [2, 2]>(p, wt)
    [clip] k = Clip(d, lo, hi)
    [hard_sigmoid] y = HardSigmoid(k) }"""


def test_the_ops_between_convs_run_int8_where_onnxruntime_has_kernels_for_them(tmp_path):
    model = parse(
        OPS_BETWEEN,
        w1=floats(4, 3, 3, 3, scale=0.3),
        b1=floats(4),
        w2=floats(4, 3, 1, 1),
        roi=np.zeros(0, np.float32),
        scales=np.array([1, 1, 2, 2], np.float32),
        wt=floats(8, 4, 2, 2, scale=0.3),
        lo=np.float32(-1.0),
        hi=np.float32(1.0),
    )
    out, result = quantized(model, [{"x": floats(8, 3, 12, 12)}])
    precision = {row["name"]: row["precision"] for row in result.details["layers"]}
    assert [name for name, p in precision.items() if p == "float"] == ["clip", "hard_sigmoid"]
    assert sum(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in out.graph.node) == 1  # shared
    ops = fused_ops(out, tmp_path)
    for op in ("QLinearSigmoid", "QLinearMul", "QLinearConcat", "QLinearAveragePool"):
        assert ops[op] == 1, op
    assert ops["QLinearConv"] == 2 and ops["ConvTranspose"] == 1  # no int8 ConvTranspose kernel on CPU
    x = floats(2, 3, 12, 12, scale=0.5)
    assert sqnr_db(run_model(model, {"x": x})["y"], run_model(out, {"x": x})["y"]) > 25
