"""convert-fp16: float16 weights and compute, float32 where an op, a domain or a range needs it.

Every converted model must pass onnx.checker with strict shape inference (a Cast missing or a
stale float32 annotation fails it), run on ONNX Runtime, and stay within float16's precision of
the float32 model (SQNR bounds measured on the zoo).
"""

from __future__ import annotations

from pathlib import Path

import export_like
import numpy as np
import onnx
import pytest
from helpers import op_counts, run_pass, run_pass_with_stats
from onnx import TensorProto, numpy_helper

from polaris_opt.calib_stats import CalibrationTable
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.fidelity import sqnr_db
from polaris_opt.numerics import make_session, run_model
from polaris_opt.passes.convert_fp16 import ConvertFp16
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline

MODELS = Path(__file__).resolve().parent.parent / "models"
ZOO = ["digits_mlp", "digits_cnn", "resnet_s", "mobilenetv2_s", "transformer_s"]
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16

# Measured on each zoo model's sample input (onnxruntime 1.31, x86 CPU): 57.4 dB (mobilenetv2_s,
# BatchNormalization unfolded) to 75 dB; file sizes 0.51x to 0.58x (names and graph stay).
SQNR_DB = 50.0


def floats(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def parse(text: str, header: str = HEADER, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(header + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def convert(
    model: onnx.ModelProto, ctx: PassContext | None = None, **options
) -> tuple[onnx.ModelProto, dict]:
    out, stats = run_pass_with_stats(ConvertFp16(**options), model, ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def details(model: onnx.ModelProto, ctx: PassContext | None = None, **options) -> dict:
    return ConvertFp16(**options).run(to_graph(model), ctx or PassContext()).details


def as_fp16(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}


def min_sqnr(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    return min(sqnr_db(reference[name], got[name].astype(np.float32)) for name in reference)


def io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of each intermediate tensor, as ONNX shape inference finds it."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def zoo(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    with np.load(MODELS / f"{name}.input.npz") as archive:
        return onnx.load(MODELS / f"{name}.onnx"), {k: archive[k] for k in archive.files}


# --- the zoo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_converts_runs_and_stays_close(name):
    model, feeds = zoo(name)
    out, stats = convert(model)
    assert io_types(out) == io_types(model) == [FLOAT, FLOAT]
    float_weights = [t for t in model.graph.initializer if t.data_type == FLOAT]
    assert stats["initializers_converted"] == len(float_weights)
    assert set(initializer_types(out).values()) <= {FLOAT16, TensorProto.INT64}
    assert stats["casts_inserted"] == 2 and stats["nodes_float32"] == 0  # one Cast in, one out
    assert min_sqnr(run_model(model, feeds), run_model(out, feeds)) >= SQNR_DB
    assert 0.5 <= out.ByteSize() / model.ByteSize() <= 0.6


def test_float16_interface_when_io_types_are_not_kept():
    model, feeds = zoo("transformer_s")
    out, stats = convert(model, keep_io_types=False)
    assert io_types(out) == [FLOAT16, FLOAT16] and stats["casts_inserted"] == 0
    got = run_model(out, as_fp16(feeds))["hidden"]
    assert got.dtype == np.float16
    assert sqnr_db(run_model(model, feeds)["hidden"], got.astype(np.float32)) >= SQNR_DB
    # The dynamic batch stays dynamic.
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_runs_after_cleanup_in_a_verified_pipeline():
    model, feeds = zoo("mobilenetv2_s")
    result = run_pipeline(model, Pipeline.parse("cleanup,convert-fp16"))
    assert result.reports[-1].stats["casts_inserted"] == 2
    assert min_sqnr(run_model(model, feeds), run_model(result.model, feeds)) >= SQNR_DB


# --- Casts at the borders ------------------------------------------------------------------------


def test_one_cast_per_tensor_is_shared_by_its_readers():
    model = parse("""
      g (float[N,4] x) => (float[N,4] y) {
        a = Relu(x)
        b = Sigmoid(x)
        y = Add(a, b) }""")
    out, stats = convert(model)
    assert stats["casts_inserted"] == 2
    assert [n.op_type for n in out.graph.node] == ["Cast", "Relu", "Sigmoid", "Add", "Cast"]
    assert out.graph.node[-1].output == ["y"]  # the graph output keeps its name
    feeds = {"x": floats(3, 4)}
    np.testing.assert_allclose(run_model(out, feeds)["y"], run_model(model, feeds)["y"], rtol=2e-3)


def test_already_float16_model_is_left_alone():
    model = parse(
        """
      g (float16[N,4] x) => (float16[N,3] y) <float16[4,3] w> {
        h = MatMul(x, w)
        y = Relu(h) }""",
        w=floats(4, 3).astype(np.float16),
    )
    graph = to_graph(model)
    result = ConvertFp16().run(graph, PassContext())
    assert not result.modified and result.stats["casts_inserted"] == 0
    assert op_counts(run_pass(ConvertFp16(), model)) == op_counts(model)


def test_integer_only_model_is_left_alone():
    model = parse("""
      g (int64[N,4] x) => (int64[N,4] y) {
        y = Add(x, x) }""")
    assert not ConvertFp16().run(to_graph(model), PassContext()).modified


# --- what stays float32 --------------------------------------------------------------------------


def test_resize_scales_stay_float32_as_its_schema_requires():
    model = parse(
        """
      g (float[1,2,4,4] x) => (float[1,2,8,8] y) <float[4] scales> {
        r = Resize<mode = "linear">(x, , scales)
        y = Relu(r) }""",
        scales=np.array([1, 1, 2, 2], np.float32),
    )
    out, stats = convert(model)
    assert initializer_types(out) == {"scales": FLOAT}
    assert stats["nodes_float16"] == 2 and stats["nodes_float32"] == 0
    feeds = {"x": floats(1, 2, 4, 4)}
    assert min_sqnr(run_model(model, feeds), run_model(out, feeds)) >= SQNR_DB


def test_keep_ops_compute_in_float32_with_casts_around_them():
    model, feeds = zoo("transformer_s")
    out, stats = convert(model, keep_ops="Softmax;LayerNormalization")
    assert stats["nodes_float32"] == 2 + 5
    float32_made = {n.output[0] for n in out.graph.node if n.op_type == "Cast" and n.attribute[0].i == FLOAT}
    float32_made.add("tokens")  # the graph input, float32 with keep-io-types
    for node in out.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert node.input[0] in float32_made, node.name
    assert min_sqnr(run_model(model, feeds), run_model(out, feeds)) >= SQNR_DB


def test_keep_ops_that_are_not_op_types_are_bad_input():
    model, _ = zoo("digits_mlp")
    with pytest.raises(BadInput, match=r"keep-ops names 'Sofmax', not ONNX op types"):
        run_pass(ConvertFp16(keep_ops="Relu;Sofmax"), model)


def test_a_weight_read_in_both_types_keeps_a_float32_version_beside_a_float16_copy():
    model = parse(
        """
      g (float[N,4] x) => (float[N,4] y) <float[4] w> {
        a = Add(x, w)
        b = Sub(x, w)
        y = Mul(a, b) }""",
        w=floats(4),
    )
    out, _ = convert(model, keep_ops="Sub")
    assert initializer_types(out) == {"w": FLOAT, "w_fp16": FLOAT16}
    feeds = {"x": floats(2, 4)}
    assert min_sqnr(run_model(model, feeds), run_model(out, feeds)) >= SQNR_DB


def test_a_weight_beyond_float16_keeps_its_reader_float32():
    model = parse(
        """
      g (float[N,4] x) => (float[N,4] y) <float[4] w> {
        a = Mul(x, w)
        y = Div(a, w) }""",
        w=np.array([1e5, 2.0, 3.0, 7e4], np.float32),
    )
    out, stats = convert(model)
    assert initializer_types(out) == {"w": FLOAT}
    assert stats["nodes_float32"] == 2
    reasons = [row["reason"] for row in details(model)["kept_float32"]]
    assert reasons == ["constant 'w' reaches 100000 > 65504"] * 2
    feeds = {"x": floats(2, 4)}
    np.testing.assert_allclose(run_model(out, feeds)["y"], feeds["x"], rtol=1e-6)


OVERFLOW = """
  g (float[N,64] x) => (float[N,4] y) <float[64,4] w> {
    d = Constant<value_float = 0.001>()
    h = MatMul(x, w)
    s = Mul(h, d)
    y = Relu(s) }"""


def test_calibrated_overflow_keeps_the_node_float32_and_outputs_finite():
    w = np.full((64, 4), 100.0, np.float32)
    model = parse(OVERFLOW, w=w)
    feeds = {"x": np.abs(floats(2, 64)) + 20.0}
    assert np.all(feeds["x"] @ w > 65504)  # h ≈ 64 · 21 · 100: beyond float16
    reference = run_model(model, feeds)["y"]

    # Without data h is stored float16, which cannot hold it. (ONNX Runtime's CPU provider hides
    # that: it has no float16 MatMul or Mul and runs both in float32, dropping the Casts between.)
    uncalibrated, _ = convert(model)
    assert value_types(uncalibrated)["h"] == FLOAT16

    table = CalibrationTable(
        method="minmax", ranges={"x": (20.0, 25.0), "h": (0.0, 1.6e5), "y": (0.0, 160.0)}
    )
    out, stats = convert(model, PassContext(calibration=table))
    kept = details(model, PassContext(calibration=table))["kept_float32"]
    assert [(row["op"], row["reason"]) for row in kept] == [
        ("MatMul", "calibrated range of 'h' reaches 160000 > 65504"),
        ("Mul", "calibrated range of 'h' reaches 160000 > 65504"),
    ]
    assert stats["nodes_float16"] == 1  # Relu
    assert value_types(out)["h"] == FLOAT
    got = run_model(make_session(out, optimize=False), feeds)["y"]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference, rtol=2e-3)


def test_nodes_of_other_domains_stay_float32_between_casts():
    model, feeds = export_like.with_unknown_domains(custom=False)
    out, stats = convert(model, keep_io_types=False)
    assert op_counts(out)["com.microsoft.FusedMatMul"] == 1
    kept = {row["node"]: row["reason"] for row in details(model, keep_io_types=False)["kept_float32"]}
    assert kept["FusedMatMul_0"] == kept["Gelu_0"] == "op of domain 'com.microsoft'"
    assert initializer_types(out) == {"w": FLOAT}
    assert min_sqnr(run_model(model, feeds), run_model(out, as_fp16(feeds))) >= SQNR_DB


def test_sequence_ops_stay_float32_and_the_model_valid():
    # SequenceAt's output type follows its sequence's element type, which no type variable says.
    model = parse("""
      g (float[4,3] x) => (float[1,3] y) {
        s = SplitToSequence<keepdims = 1>(x)
        zero = Constant<value_int = 0>()
        e = SequenceAt(s, zero)
        y = Relu(e) }""")
    out, stats = convert(model)
    assert stats["nodes_float16"] == 1 and stats["nodes_float32"] == 2
    reasons = {row["op"]: row["reason"] for row in details(model)["kept_float32"]}
    assert (
        reasons["SequenceAt"] == "types of SequenceAt's tensors are unknown (untyped, sequence or optional)"
    )
    x = floats(4, 3)
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], np.maximum(x[:1], 0), rtol=1e-3)


# --- attributes that carry types or values -------------------------------------------------------


def test_attributes_naming_float32_name_float16():
    model = parse("""
      g (float[2,3] x, int64[2,3] k, int64[2] s) => (float[2,3] y, float[3,3] e) {
        kf = Cast<to = 1>(k)
        c = ConstantOfShape<value = float[1] {2.5}>(s)
        h = Constant<value_float = 0.5>()
        a = Add(x, kf)
        b = Mul(a, c)
        y = Mul(b, h)
        x3 = Constant<value = float[3,3] {1, 2, 3, 4, 5, 6, 7, 8, 9}>()
        e0 = EyeLike<dtype = 1>(x3)
        e = Add(e0, x3) }""")
    out, stats = convert(model)
    attributes = {
        n.op_type: onnx.helper.get_attribute_value(n.attribute[0]) for n in out.graph.node if n.attribute
    }
    assert attributes["EyeLike"] == FLOAT16
    assert attributes["ConstantOfShape"].data_type == FLOAT16
    assert [n.attribute[0].i for n in out.graph.node if n.op_type == "Cast"] == [
        FLOAT16,
        FLOAT16,
        FLOAT,
        FLOAT,
    ]
    assert stats["constants_converted"] == 2
    feeds = {"x": floats(2, 3), "k": np.arange(6).reshape(2, 3), "s": np.array([2, 3])}
    assert min_sqnr(run_model(model, feeds), run_model(out, feeds)) >= SQNR_DB


# --- exporters and control flow ------------------------------------------------------------------


def test_paddle_like_constant_node_weights_become_float16():
    model, feeds = export_like.paddle_like()
    out, stats = convert(model)
    constants = [n for n in out.graph.node if n.op_type == "Constant"]
    float_constants = [n for n in constants if n.attribute[0].t.data_type in (FLOAT, FLOAT16)]
    assert {n.attribute[0].t.data_type for n in float_constants} == {FLOAT16}
    assert stats["constants_converted"] == len(float_constants) == 8
    assert min_sqnr(run_model(model, feeds), run_model(out, feeds)) >= SQNR_DB


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_if_stays_float32_and_its_branches_read_float32(keep_io_types):
    model, feeds = export_like.with_if()
    out, stats = convert(model, keep_io_types=keep_io_types)
    branches = {a.name: a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute}
    original = {a.name: a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute}
    for name, branch in branches.items():  # bodies untouched but for the outer tensor they read
        assert [n.op_type for n in branch.node] == [n.op_type for n in original[name].node]
    assert initializer_types(out) == {"bias": FLOAT}  # read only inside the branches
    if not keep_io_types:  # x is float16 now: the branches read a float32 Cast of it by name
        reads = {i for branch in branches.values() for n in branch.node for i in n.input}
        assert "x_fp32" in reads and "x" not in reads
    assert stats["nodes_float16"] == 1 and stats["nodes_float32"] == 1  # Relu; If
    for cond in (True, False):
        run_feeds = feeds | {"cond": np.array(cond)}
        got = run_model(out, run_feeds if keep_io_types else as_fp16(run_feeds))
        assert min_sqnr(run_model(model, run_feeds), got) >= SQNR_DB


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_loop_stays_float32_and_correct(keep_io_types):
    model, feeds = export_like.with_loop()
    out, stats = convert(model, keep_io_types=keep_io_types)
    assert op_counts(out, recursive=True)["Add"] == 1
    assert stats["nodes_float32"] == 1 and stats["casts_inserted"] == (0 if keep_io_types else 3)
    got = run_model(out, feeds if keep_io_types else as_fp16(feeds))
    assert min_sqnr(run_model(model, feeds), got) >= SQNR_DB
