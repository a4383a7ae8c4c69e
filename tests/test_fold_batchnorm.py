"""fold-batchnorm: structure (op counts), numerics against the input on ORT, onnx.checker."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from export_like import bn_params, paddle_like, pytorch_like
from helpers import assert_same_outputs, op_counts, run_pass, run_pass_with_stats
from onnx import numpy_helper

from polaris_opt.numerics import compare_outputs, run_model
from polaris_opt.passes.fold_batchnorm import FoldBatchNorm
from polaris_opt.passes.lift_constants import LiftConstants

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)
BN_NAMES = ("s", "b", "m", "v")


def parse(
    text: str, channels: int, dtype=np.float32, header: str = HEADER, **initializers: np.ndarray
) -> onnx.ModelProto:
    """A model from ONNX text, with non-trivial BN parameters s, b, m, v of `channels`."""
    model = onnx.parser.parse_model(header + text)
    params = dict(zip(BN_NAMES, bn_params(RNG, channels), strict=True)) | initializers
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(dtype), k) for k, v in params.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    out, stats = run_pass_with_stats(FoldBatchNorm(), model)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


CONV = """
  g (float[2,{c_in},6,6] x) => (float[2,{c_out},6,6] y) <{decls}> {{
    c = Conv<pads = [1, 1, 1, 1], group = {group}>(x, {conv_inputs})
    y = BatchNormalization<epsilon = 0.001>(c, s, b, m, v) }}"""


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("c_in", "c_out", "group"), [(3, 4, 1), (4, 6, 2), (4, 4, 4)])  # depthwise last
def test_conv_bn_folds_into_conv(bias, c_in, c_out, group):
    decls = f"float[{c_out},{c_in // group},3,3] w" + (f", float[{c_out}] wb" if bias else "")
    text = CONV.format(c_in=c_in, c_out=c_out, group=group, decls=decls, conv_inputs="w, wb" if bias else "w")
    weights = {"w": floats(c_out, c_in // group, 3, 3)} | ({"wb": floats(c_out)} if bias else {})
    model = parse(text, c_out, **weights)
    out, stats = fold(model)
    assert op_counts(out) == {"Conv": 1} and stats == {"folded": 1, "skipped": 0}
    assert len(out.graph.node[0].input) == 3  # a bias appears when there was none
    assert_same_outputs(model, out, {"x": floats(2, c_in, 6, 6)})


@pytest.mark.parametrize(("c_in", "c_out", "group"), [(3, 4, 1), (4, 6, 2), (6, 9, 3)])
def test_conv_transpose_bn_folds_per_group(c_in, c_out, group):
    # Weight [C_in, C_out/group, k, k]: the output channels are axis 1 within each group.
    model = parse(
        f"""
      g (float[2,{c_in},5,5] x) => (float[2,{c_out},10,10] y) <float[{c_in},{c_out // group},2,2] w> {{
        c = ConvTranspose<strides = [2, 2], group = {group}>(x, w)
        y = BatchNormalization(c, s, b, m, v) }}""",
        c_out,
        w=floats(c_in, c_out // group, 2, 2),
    )
    out, _ = fold(model)
    assert op_counts(out) == {"ConvTranspose": 1}
    assert_same_outputs(model, out, {"x": floats(2, c_in, 5, 5)})


GEMM = """
  g (float[3,5] x) => (float[3,4] y) <float[{w_shape}] w{bias_decl}> {{
    c = Gemm<transB = {trans_b}, alpha = 0.7, beta = 1.3>(x, w{bias_input})
    y = BatchNormalization(c, s, b, m, v) }}"""


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (4,), (1,), (3, 1), (3, 4)])
def test_gemm_bn_folds_into_gemm(trans_b, bias_shape):
    w_shape = (4, 5) if trans_b else (5, 4)
    bias_decl = f", float[{','.join(map(str, bias_shape))}] cb" if bias_shape else ""
    text = GEMM.format(
        w_shape=",".join(map(str, w_shape)),
        trans_b=trans_b,
        bias_decl=bias_decl,
        bias_input=", cb" if bias_shape else "",
    )
    bias = {"cb": floats(*bias_shape)} if bias_shape else {}
    model = parse(text, 4, w=floats(*w_shape), **bias)
    out, _ = fold(model)
    assert op_counts(out) == {"Gemm": 1}
    assert_same_outputs(model, out, {"x": floats(3, 5)})


def test_float16_weights_fold_in_float64_and_stay_float16():
    model = parse(
        CONV.format(c_in=3, c_out=4, group=1, decls="float16[4,3,3,3] w", conv_inputs="w").replace(
            "float[", "float16["
        ),
        4,
        dtype=np.float16,
        w=floats(4, 3, 3, 3),
    )
    out, _ = fold(model)
    assert op_counts(out) == {"Conv": 1}
    assert {t.data_type for t in out.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert_same_outputs(model, out, {"x": floats(2, 3, 6, 6).astype(np.float16)})


def test_a_second_reader_of_the_conv_output_blocks_the_fold():
    model = parse(
        """
      g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] r) <float[4,3,3,3] w> {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        y = BatchNormalization(c, s, b, m, v)
        r = Relu(c) }""",
        4,
        w=floats(4, 3, 3, 3),
    )
    out, stats = fold(model)
    assert op_counts(out) == op_counts(model) and stats == {"folded": 0, "skipped": 1}


def test_a_conv_output_that_is_a_graph_output_blocks_the_fold():
    model = parse(
        """
      g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] c) <float[4,3,3,3] w> {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        y = BatchNormalization(c, s, b, m, v) }""",
        4,
        w=floats(4, 3, 3, 3),
    )
    assert op_counts(fold(model)[0])["BatchNormalization"] == 1


def test_computed_bn_parameters_block_the_fold():
    model = parse(
        """
      g (float[1,3,6,6] x, float[4] mean) => (float[1,4,6,6] y) <float[4,3,3,3] w> {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        y = BatchNormalization(c, s, b, mean, v) }""",
        4,
        w=floats(4, 3, 3, 3),
    )
    out, stats = fold(model)
    assert op_counts(out)["BatchNormalization"] == 1 and stats["skipped"] == 1


def test_training_mode_blocks_the_fold():
    # Training mode normalizes with the batch's own statistics, not the stored ones.
    model = parse(
        """
      g (float[1,3,6,6] x) => (float[1,4,6,6] y) <float[4,3,3,3] w> {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        y, running_mean, running_var = BatchNormalization<training_mode = 1>(c, s, b, m, v) }""",
        4,
        w=floats(4, 3, 3, 3),
    )
    assert op_counts(fold(model)[0])["BatchNormalization"] == 1


def test_a_weight_shared_with_another_conv_is_not_changed_under_it():
    model = parse(
        """
      g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z) <float[4,3,3,3] w> {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        y = BatchNormalization(c, s, b, m, v)
        z = Conv<pads = [1, 1, 1, 1]>(x, w) }""",
        4,
        w=floats(4, 3, 3, 3),
    )
    out, _ = fold(model)
    assert op_counts(out) == {"Conv": 2}
    assert_same_outputs(model, out, {"x": floats(1, 3, 6, 6)})


def test_a_chain_of_two_batchnorms_folds_completely():
    model = parse(
        """
      g (float[1,3,6,6] x) => (float[1,4,6,6] y) <float[4,3,3,3] w> {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        d = BatchNormalization(c, s, b, m, v)
        y = BatchNormalization(d, v, m, b, s) }""",
        4,
        w=floats(4, 3, 3, 3),
    )
    out, stats = fold(model)
    assert op_counts(out) == {"Conv": 1} and stats["folded"] == 2
    assert_same_outputs(model, out, {"x": floats(1, 3, 6, 6)})


def test_folds_inside_an_if_branch():
    model = parse(
        """
      g (float[1,3,6,6] x, bool k) => (float[1,4,6,6] y) <float[4,3,3,3] w> {
        y = If(k) <
          then_branch = t () => (float[1,4,6,6] a) { c = Conv<pads = [1, 1, 1, 1]>(x, w)
                                                     a = BatchNormalization(c, s, b, m, v) },
          else_branch = e () => (float[1,4,6,6] o) { o = Conv<pads = [1, 1, 1, 1]>(x, w) } > }""",
        4,
        w=floats(4, 3, 3, 3),
    )
    out, _ = fold(model)
    assert op_counts(out, recursive=True) == {"If": 1, "Conv": 2}
    for k in (True, False):
        assert_same_outputs(model, out, {"x": floats(1, 3, 6, 6), "k": np.array(k)})


def test_a_producer_of_another_domain_is_left_alone():
    model = parse(
        """
      g (float[1,3,6,6] x) => (float[1,4,6,6] y) <float[4,3,3,3] w> {
        c = com.microsoft.FusedConv<pads = [1, 1, 1, 1], activation = "Relu">(x, w)
        y = BatchNormalization(c, s, b, m, v) }""",
        4,
        header='<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>',
        w=floats(4, 3, 3, 3),
    )
    assert op_counts(fold(model)[0]) == op_counts(model)


def test_pytorch_like_conv_bn_relu():
    model, feeds = pytorch_like()
    out, stats = fold(model)
    assert op_counts(out)["BatchNormalization"] == 0 and stats["folded"] == 1
    assert_same_outputs(model, out, feeds)


def test_paddle_like_folds_once_constants_are_lifted():
    model, feeds = paddle_like()
    assert op_counts(fold(model)[0])["BatchNormalization"] == 1  # parameters are Constant nodes
    out = run_pass(FoldBatchNorm(), run_pass(LiftConstants(), model))
    assert op_counts(out)["BatchNormalization"] == 0
    assert_same_outputs(model, out, feeds)


def test_folded_numbers_are_close_in_relative_terms():
    # Large weights and tiny variances stress the fold; fp32 must stay within 1e-4 relative.
    model = parse(
        CONV.format(c_in=3, c_out=4, group=1, decls="float[4,3,3,3] w", conv_inputs="w"),
        4,
        w=floats(4, 3, 3, 3) * 50,
        v=np.full(4, 1e-3, np.float32),
    )
    out, _ = fold(model)
    feeds = {"x": floats(2, 3, 6, 6)}
    assert not compare_outputs(run_model(model, feeds), run_model(out, feeds))
