"""sparsify: structure, numbers against the dense model (through the lowering on ONNX Runtime and
through the ops' NumPy references), onnx.checker full_check, and the sparse storage for stock ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import MODELS, assert_same_outputs, op_counts, run_pass, zoo_source
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph, to_model
from polaris_opt.numerics import compare_outputs, make_session, run_model
from polaris_opt.ops import DOMAIN, attributes, register_schemas
from polaris_opt.ops.lowering import lower
from polaris_opt.ops.reference import REFERENCES
from polaris_opt.passes.prune import Prune
from polaris_opt.passes.sparsify import Sparsify
from polaris_opt.passes_api import PassContext, PassResult
from polaris_opt.pipeline import Pipeline

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------- helpers


def parse(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def sparse(*shape: int, sparsity: float = 0.9) -> np.ndarray:
    """Normal weights with exactly round(sparsity·size) zeros at random places."""
    w = RNG.standard_normal(shape).astype(np.float32)
    w.flat[RNG.permutation(w.size)[: round(sparsity * w.size)]] = 0
    return w


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def sparsify(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, PassResult]:
    """Run the pass on a copy of `model`; the result must pass onnx.checker's full check."""
    source = onnx.ModelProto()
    source.CopyFrom(model)
    graph = to_graph(source)
    result = Sparsify(**options).run(graph, PassContext())
    out = to_model(graph, source)
    register_schemas()
    onnx.checker.check_model(out, full_check=True)
    return out, result


def _polaris_op(op_type: str) -> type[OpRun]:
    def _run(self, *inputs, **_attributes):
        return (REFERENCES[op_type](list(inputs), attributes(self.onnx_node)),)

    return type(op_type, (OpRun,), {"op_domain": DOMAIN, "_run": _run})


POLARIS_OPS = [_polaris_op(op_type) for op_type in REFERENCES]


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`model` evaluated by ONNX's reference evaluator, the ai.polaris nodes by our NumPy references."""
    # The evaluator implements QuantizeLinear/DequantizeLinear from opset 19 only; for the uint8 and
    # int8 tensors of these models (no saturate, no block_size) 19 means what 17 does.
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)
    results = ReferenceEvaluator(model, new_ops=POLARIS_OPS).run(None, feeds)
    return dict(zip([o.name for o in model.graph.output], results, strict=True))


def assert_equals_dense(
    dense: onnx.ModelProto, out: onnx.ModelProto, feeds: dict, optimize: bool = True
) -> None:
    """`out` computes what `dense` does, lowered to standard ONNX on ORT and through the references."""
    expected = run_model(make_session(dense, optimize=optimize), feeds)
    lowered = run_model(make_session(lower(out), optimize=optimize), feeds)
    assert list(lowered) == list(expected)
    assert not compare_outputs(expected, lowered), compare_outputs(expected, lowered)
    assert not compare_outputs(expected, run_reference(out, feeds)), "references differ from dense"


def polaris_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == DOMAIN]


def attrs_of(node: onnx.NodeProto) -> dict:
    return attributes(node)


# ------------------------------------------------------------------------------- MatMul, Gemm

MLP = """
  g (float[batch,{k}] x) => (float[batch,{n}] y) <float[{k},{n}] w, float[{n}] b> {{
    m = MatMul(x, w)
    a = Add(m, b)
    y = Relu(a) }}"""


@pytest.mark.parametrize("profile", ["cpu", "polaris"])
@pytest.mark.parametrize("fmt", ["auto", "csr", "bsr", "sell"])
def test_matmul_add_relu_becomes_one_sparse_matmul(fmt, profile):
    model = parse(MLP.format(k=48, n=20), w=sparse(48, 20), b=floats(20))
    out, result = sparsify(model, format=fmt, profile=profile)
    assert op_counts(out) == {"ai.polaris.SparseMatMul": 1}
    (node,) = polaris_nodes(out)
    attrs = attrs_of(node)
    assert attrs["activation"] == "relu" and attrs["shape"] == (20, 48) and list(node.output) == ["y"]
    assert fmt == "auto" or attrs["format"] == fmt
    (row,) = result.details["layers"]
    assert row["fused"] == ["Add", "Relu"] and row["bias"] and row["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert row["bytes_before"] == 48 * 20 * 4
    assert_equals_dense(model, out, {"x": floats(3, 48)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (), (6,), (1, 6)])
def test_gemm_folds_alpha_into_w_and_beta_c_into_the_bias(trans_b, bias_shape):
    w_shape = "6,10" if trans_b else "10,6"
    bias_decl = "" if bias_shape is None else f", float[{','.join(map(str, bias_shape))}] c"
    bias_input = "" if bias_shape is None else ", c"
    model = parse(
        f"""
      g (float[4,10] x) => (float[4,6] y) <float[{w_shape}] w{bias_decl}> {{
        y = Gemm<transB = {trans_b}, alpha = 0.5, beta = 2.0>(x, w{bias_input}) }}""",
        w=sparse(*map(int, w_shape.split(",")), sparsity=0.7),
        **({} if bias_shape is None else {"c": floats(*bias_shape)}),
    )
    out, result = sparsify(model)
    assert op_counts(out) == {"ai.polaris.SparseMatMul": 1}
    assert result.details["layers"][0]["bias"] == (bias_shape is not None)
    assert_equals_dense(model, out, {"x": floats(4, 10)})


def test_a_gemm_bias_per_row_of_x_cannot_fold():
    model = parse(
        """
      g (float[4,10] x) => (float[4,6] y) <float[10,6] w, float[4,6] c> {
        y = Gemm(x, w, c) }""",
        w=sparse(10, 6),
        c=floats(4, 6),
    )
    out, result = sparsify(model)
    assert op_counts(out) == {"Gemm": 1}
    assert "not one value per output feature" in result.details["skipped"][0]["reason"]


def test_matmul_over_leading_batch_axes():
    model = parse(
        """
      g (float[2,5,32] x) => (float[2,5,16] y) <float[32,16] w, float[1,16] b> {
        m = MatMul(x, w)
        y = Add(b, m) }""",
        w=sparse(32, 16),
        b=floats(1, 16),
    )
    out, result = sparsify(model)
    assert op_counts(out) == {"ai.polaris.SparseMatMul": 1} and result.details["layers"][0]["fused"] == [
        "Add"
    ]
    assert_equals_dense(model, out, {"x": floats(2, 5, 32)})


def test_followers_another_node_can_see_are_not_fused():
    # m is also a graph output and a is read twice: neither the Add nor the Relu may join.
    model = parse(
        """
      g (float[3,32] x) => (float[3,16] m, float[3,16] y, float[3,16] z) <float[32,16] w, float[16] b> {
        m = MatMul(x, w)
        a = Add(m, b)
        y = Relu(a)
        z = Sigmoid(a) }""",
        w=sparse(32, 16),
        b=floats(16),
    )
    out, result = sparsify(model)
    assert op_counts(out) == {"ai.polaris.SparseMatMul": 1, "Add": 1, "Relu": 1, "Sigmoid": 1}
    assert result.details["layers"][0]["fused"] == [] and polaris_nodes(out)[0].output[0] == "m"
    assert_equals_dense(model, out, {"x": floats(3, 32)})


def test_a_bias_that_would_add_an_axis_is_not_fused():
    # [1, 1, N] on a [3, N] output broadcasts to [1, 3, N]: folding it into [N] would drop an axis.
    model = parse(
        """
      g (float[3,32] x) => (float[1,3,16] y) <float[32,16] w, float[1,1,16] b> {
        m = MatMul(x, w)
        y = Add(m, b) }""",
        w=sparse(32, 16),
        b=floats(1, 1, 16),
    )
    out, _ = sparsify(model)
    assert op_counts(out) == {"ai.polaris.SparseMatMul": 1, "Add": 1}
    assert_equals_dense(model, out, {"x": floats(3, 32)})


# ------------------------------------------------------------------------------------ Conv


@pytest.mark.parametrize(
    ("kernel", "attrs", "out_hw"),
    [
        (3, "pads = [1, 1, 1, 1]", 9),
        (3, "pads = [0, 1, 2, 1], strides = [2, 2]", 5),
        (3, "dilations = [2, 2]", 5),
        (1, "strides = [1, 1]", 9),
        (2, 'auto_pad = "VALID"', 8),
    ],
)
def test_conv_becomes_sparse_conv_with_bias_and_relu(kernel, attrs, out_hw):
    model = parse(
        f"""
      g (float[2,3,9,9] x) => (float[2,8,{out_hw},{out_hw}] y) <float[8,3,{kernel},{kernel}] w, float[8] b> {{
        c = Conv<{attrs}>(x, w, b)
        y = Relu(c) }}""",
        w=sparse(8, 3, kernel, kernel, sparsity=0.75),
        b=floats(8),
    )
    out, result = sparsify(model)
    assert op_counts(out) == {"ai.polaris.SparseConv": 1}
    node_attrs = attrs_of(polaris_nodes(out)[0])
    assert node_attrs["kernel_shape"] == (kernel, kernel) and node_attrs["activation"] == "relu"
    assert result.details["layers"][0]["shape"] == [8, 3 * kernel * kernel]
    assert_equals_dense(model, out, {"x": floats(2, 3, 9, 9)})


@pytest.mark.parametrize(
    ("weight", "conv", "reason"),
    [
        ("4,2,3,3", "group = 2, pads = [1, 1, 1, 1]", "group=2"),
        ("4,4,3,3", 'auto_pad = "SAME_UPPER"', "auto_pad=SAME_UPPER"),
    ],
)
def test_convs_sparse_conv_cannot_express_stay(weight, conv, reason):
    model = parse(
        f"""
      g (float[1,4,6,6] x) => (float[1,4,6,6] y) <float[{weight}] w> {{
        y = Conv<{conv}>(x, w) }}""",
        w=sparse(*map(int, weight.split(","))),
    )
    out, result = sparsify(model)
    assert op_counts(out) == {"Conv": 1} and reason in result.details["skipped"][0]["reason"]


# ---------------------------------------------------------------------------- which layers

TWO_LAYERS = """
  g (float[2,16] x) => (float[2,8] y) <float[16,12] w1, float[12,8] w2> {
    h = MatMul<>(x, w1)
    y = MatMul<>(h, w2) }"""


def test_layers_below_min_sparsity_are_untouched():
    model = parse(
        TWO_LAYERS.replace("<>", ""), w1=sparse(16, 12, sparsity=0.9), w2=sparse(12, 8, sparsity=0.3)
    )
    out, result = sparsify(model, min_sparsity=0.5)
    assert op_counts(out) == {"ai.polaris.SparseMatMul": 1, "MatMul": 1}
    dense_node = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert list(dense_node.input) == ["h", "w2"]
    assert "below min-sparsity 0.5" in result.details["skipped"][0]["reason"]
    assert_equals_dense(model, out, {"x": floats(2, 16)})
    out, _ = sparsify(model, min_sparsity=0.0)
    assert op_counts(out) == {"ai.polaris.SparseMatMul": 2}


def test_excluded_nodes_and_weights_stay():
    model = parse(TWO_LAYERS.replace("<>", ""), w1=sparse(16, 12), w2=sparse(12, 8))
    model.graph.node[0].name, model.graph.node[1].name = "/enc/fc", "/head/fc"
    for exclude in ("/head/*", "w2", "nothing;/head/fc"):
        out, result = sparsify(model, exclude=exclude)
        assert [n.op_type for n in out.graph.node] == ["SparseMatMul", "MatMul"]
        assert result.details["skipped"] == [{"name": "/head/fc", "op": "MatMul", "reason": "excluded"}]


def test_a_sparse_matmul_inside_an_if_branch():
    model = parse(
        """
      g (float[2,16] x, bool k) => (float[2,8] y) <float[16,8] w> {
        y = If(k) <
          then_branch = t () => (float[2,8] a) { m = MatMul(x, w)
                                                 a = Relu(m) },
          else_branch = e () => (float[2,8] b) { n = MatMul(x, w)
                                                 b = Neg(n) } > }""",
        w=sparse(16, 8),
    )
    out, result = sparsify(model)
    assert op_counts(out, recursive=True) == {"If": 1, "ai.polaris.SparseMatMul": 2, "Neg": 1}
    assert [row["fused"] for row in result.details["layers"]] == [["Relu"], []]
    for k in (True, False):
        assert_same_outputs(model, lower(out), {"x": floats(2, 16), "k": np.array(k)})


def test_layers_sharing_a_weight_share_its_sparse_arrays():
    model = parse(
        """
      g (float[2,16] x, float[2,16] z) => (float[2,8] y, float[2,8] u) <float[16,8] w> {
        y = MatMul(x, w)
        u = MatMul(z, w) }""",
        w=sparse(16, 8),
    )
    out, _ = sparsify(model)
    first, second = polaris_nodes(out)
    assert first.input[1:] == second.input[1:] and len(out.graph.initializer) == 3
    assert_equals_dense(model, out, {"x": floats(2, 16), "z": floats(2, 16)})


def test_fp16_weights_and_computed_weights_are_left_alone():
    model = parse(
        """
      g (float16[2,16] x, float[16,8] v, float[2,16] z) => (float16[2,8] y, float[2,8] u) <float16[16,8] w> {
        y = MatMul(x, w)
        u = MatMul(z, v) }""",
        w=sparse(16, 8).astype(np.float16),
    )
    out, result = sparsify(model)
    assert op_counts(out) == {"MatMul": 2}
    assert [row["reason"] for row in result.details["skipped"]] == [
        "weight is float16; SparseMatMul/SparseConv take a float32 constant weight"
    ]


# ------------------------------------------------------------------------------- value types


@pytest.mark.parametrize(("values", "floor_db"), [("fp16", 60.0), ("int8", 35.0)])
def test_narrow_values_follow_their_reference_and_stay_close_to_dense(values, floor_db):
    model = parse(MLP.format(k=64, n=32), w=sparse(64, 32), b=floats(32))
    out, result = sparsify(model, values=values)
    (node,) = polaris_nodes(out)
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert stored[node.input[1]].dtype == (np.float16 if values == "fp16" else np.int8)
    assert (values == "int8") == (len(node.input) == 6)  # the int8 per-row scale
    feeds = {"x": floats(16, 64)}
    reference = run_reference(out, feeds)["y"]
    lowered = run_model(lower(out), feeds)["y"]
    np.testing.assert_allclose(lowered, reference, rtol=1e-5, atol=1e-5)
    dense = run_model(model, feeds)["y"]
    sqnr = 10 * np.log10(np.sum(dense**2) / np.sum((dense - reference) ** 2))
    assert sqnr > floor_db
    assert result.details["layers"][0]["values"] == values


def test_ninety_percent_int8_weights_take_under_a_twelfth_of_dense_fp32():
    model = parse(MLP.format(k=1024, n=256), w=sparse(1024, 256), b=floats(256))
    _, result = sparsify(model, values="int8", profile="polaris")
    (row,) = result.details["layers"]
    assert row["index"] == "uint16" and row["bytes_after"] <= row["bytes_before"] / 12


def test_format_follows_the_cost_model():
    blocks = np.kron(RNG.random((8, 16)) < 0.15, np.ones((4, 4), bool))
    blocky = (floats(32, 64) + 3) * blocks  # [N, K] = [32, 64], whole 4x4 tiles
    even = np.zeros((64, 128), np.float32)  # [N, K]: 8 nonzeros in every row
    for row in even:
        row[RNG.choice(128, 8, replace=False)] = 1 + RNG.random(8)
    cases = [(blocky, "cpu", "bsr", {"block": (4, 4)}), (even, "polaris", "sell", {"slice_height": 64})]
    cases.append((even, "cpu", "csr", {}))
    for matrix, profile, fmt, expected in cases:
        n, k = matrix.shape
        model = parse(MLP.format(k=k, n=n), w=np.ascontiguousarray(matrix.T), b=floats(n))
        out, result = sparsify(model, profile=profile, min_sparsity=0.5)
        node_attrs = attrs_of(polaris_nodes(out)[0])
        assert node_attrs["format"] == fmt, result.details["layers"][0]["reason"]
        assert all(node_attrs[key] == value for key, value in expected.items())
        assert_equals_dense(model, out, {"x": floats(3, k)})


# ------------------------------------------------------------------------------------- zoo


def pruned(name: str, sparsity: float = 0.9) -> onnx.ModelProto:
    cleaned = run_pipeline(onnx.load(MODELS / f"{name}.onnx"), Pipeline.parse("cleanup")).model
    return run_pass(Prune(sparsity=sparsity), cleaned)


def test_pruned_digits_models_run_the_same_sparse():
    with np.load(MODELS / "digits_test.npz") as test:
        inputs = {"digits_mlp": test["x_mlp"][:64], "digits_cnn": test["x_cnn"][:64]}
    expected_ops = {
        "digits_mlp": {"ai.polaris.SparseMatMul": 3},
        "digits_cnn": {"ai.polaris.SparseConv": 2, "ai.polaris.SparseMatMul": 1, "MaxPool": 1, "Flatten": 1},
    }
    for name, x in inputs.items():
        model = pruned(name)
        out, result = sparsify(model)
        assert op_counts(out) == expected_ops[name]
        assert result.stats["sparse"] == 3 and result.stats["bytes_after"] < result.stats["bytes_before"] / 4
        assert_equals_dense(model, out, {"input": x})


# ------------------------------------------------------------------------------------ QDQ

QDQ_MATMUL = """
  g (float[3,16] x) => (float[3,8] y) <float s, uint8 zp, int8[16,8] wq, float[8] ws, float[8] b> {
    xq = QuantizeLinear(x, s, zp)
    xd = DequantizeLinear(xq, s, zp)
    wd = DequantizeLinear<axis = 1>(wq, ws)
    m = MatMul(xd, wd)
    a = Add(m, b)
    y = Relu(a) }"""


def qdq_weights(rows: int, cols: int) -> np.ndarray:
    return RNG.integers(-127, 128, (rows, cols)).astype(np.int8)


def qdq_matmul(text: str = QDQ_MATMUL, **overrides) -> onnx.ModelProto:
    params = {
        "s": np.array(0.05, np.float32),
        "zp": np.array(128, np.uint8),
        "wq": qdq_weights(16, 8),
        "ws": (RNG.random(8) * 0.01 + 0.001).astype(np.float32),
        "b": floats(8),
    }
    params = {key: value for key, value in (params | overrides).items() if value is not None}
    return parse(text, **params)


def test_qdq_matmul_becomes_qmatmul_and_its_qdq_goes():
    model = qdq_matmul()
    out, result = sparsify(model)
    assert op_counts(out) == {"ai.polaris.QMatMul": 1}
    (node,) = polaris_nodes(out)
    assert list(node.input)[0] == "x" and attrs_of(node)["activation"] == "relu"
    assert result.stats == {
        "sparse": 0,
        "quantized": 1,
        "skipped": 0,
        "bytes_before": 160,
        "bytes_after": 160,
    }
    # Unoptimized ORT runs the QDQ model as written (its fusions would round differently).
    assert_equals_dense(model, out, {"x": floats(3, 16) * 2}, optimize=False)


def test_qdq_without_zero_points_means_uint8_at_zero():
    text = QDQ_MATMUL.replace("(x, s, zp)", "(x, s)").replace("(xq, s, zp)", "(xq, s)")
    model = qdq_matmul(text.replace("uint8 zp, ", ""), zp=None)
    out, _ = sparsify(model)
    assert op_counts(out) == {"ai.polaris.QMatMul": 1}
    zero_point = next(t for t in out.graph.initializer if t.name.endswith("x_zero_point"))
    assert numpy_helper.to_array(zero_point).dtype == np.uint8 and numpy_helper.to_array(zero_point) == 0
    assert_equals_dense(model, out, {"x": floats(3, 16) + 3}, optimize=False)


def test_qgemm_keeps_alpha_and_dequantizes_the_int32_bias():
    model = parse(
        """
      g (float[4,16] x) => (float[4,8] y)
        <float s, uint8 zp, int8[8,16] wq, float ws, int32[8] bq, float[8] bs> {
        xq = QuantizeLinear(x, s, zp)
        xd = DequantizeLinear(xq, s, zp)
        wd = DequantizeLinear(wq, ws)
        bd = DequantizeLinear<axis = 0>(bq, bs)
        y = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(xd, wd, bd) }""",
        s=np.array(0.04, np.float32),
        zp=np.array(120, np.uint8),
        wq=qdq_weights(8, 16),
        ws=np.array(0.02, np.float32),  # one scale for the whole weight
        bq=RNG.integers(-500, 500, 8).astype(np.int32),
        bs=np.full(8, 0.0008, np.float32),
    )
    out, _ = sparsify(model)
    assert op_counts(out) == {"ai.polaris.QGemm": 1}
    assert attrs_of(polaris_nodes(out)[0])["alpha"] == 0.5
    assert_equals_dense(model, out, {"x": floats(4, 16)}, optimize=False)


def test_a_shared_activation_quantizer_stays_for_its_other_reader():
    text = QDQ_MATMUL.replace("=> (float[3,8] y)", "=> (float[3,8] y, float[3,16] r)").replace(
        "y = Relu(a) }", "y = Relu(a)\n    r = Neg(xd) }"
    )
    model = qdq_matmul(text)
    out, _ = sparsify(model)
    assert op_counts(out) == {"ai.polaris.QMatMul": 1, "QuantizeLinear": 1, "DequantizeLinear": 1, "Neg": 1}
    assert_equals_dense(model, out, {"x": floats(3, 16)}, optimize=False)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"zp": np.array(3, np.int8)}, "zero point is int8"),
        ({"wz": np.array(1, np.int8)}, "weight zero point is not 0"),
        (None, "weight-only QDQ"),
    ],
)
def test_qdq_layers_qmatmul_cannot_compute_exactly_stay(change, reason):
    text = QDQ_MATMUL
    if change is None:  # the MatMul reads x itself
        text = text.replace("m = MatMul(xd, wd)", "m = MatMul(x, wd)")
    elif "zp" in change:
        text = text.replace("uint8 zp", "int8 zp")
    else:
        text = text.replace("float[8] b>", "float[8] b, int8 wz>").replace("(wq, ws)", "(wq, ws, wz)")
    model = qdq_matmul(text, **(change or {}))
    out, result = sparsify(model)
    assert "ai.polaris.QMatMul" not in op_counts(out)
    assert reason in result.details["skipped"][0]["reason"]
    _, result = sparsify(model, qdq=False)
    assert result.details["skipped"] == []  # not asked to look at QDQ at all


def test_quantized_digits_mlp_becomes_qgemm_everywhere():
    source = onnx.load(MODELS / "digits_mlp.onnx")
    ctx = PassContext(calib=zoo_source("digits_mlp", 64))
    model = run_pipeline(source, Pipeline.parse("cleanup,calibrate,quantize"), ctx=ctx).model
    out, result = sparsify(model)
    assert op_counts(out) == {"ai.polaris.QGemm": 3} and result.stats["quantized"] == 3
    with np.load(MODELS / "digits_test.npz") as test:
        assert_equals_dense(model, out, {"input": test["x_mlp"][:64]}, optimize=False)


# ----------------------------------------------------------------------- target=onnxruntime


def test_onnxruntime_target_stores_sparse_weights_stock_ort_runs():
    model = pruned("digits_mlp")
    out, result = sparsify(model, target="onnxruntime")
    assert op_counts(out) == {"Constant": 3, "Gemm": 3, "Relu": 2}
    assert all(
        node.attribute[0].name == "sparse_value" for node in out.graph.node if node.op_type == "Constant"
    )
    assert not out.graph.initializer or all(t.name.endswith("bias") for t in out.graph.initializer)
    size_before, size_after = model.ByteSize(), out.ByteSize()
    assert size_after < 0.45 * size_before, (size_before, size_after)
    rows = result.details["layers"]
    assert [row["format"] for row in rows] == ["coo"] * 3
    assert sum(row["bytes_after"] for row in rows) == result.stats["bytes_after"]
    with np.load(MODELS / "digits_test.npz") as test:
        feeds = {"input": test["x_mlp"][:64]}
    expected, got = run_model(model, feeds), run_model(out, feeds)
    np.testing.assert_array_equal(got["logits"], expected["logits"])  # the same dense weights


def test_onnxruntime_target_keeps_weights_coo_would_not_shrink():
    model = parse(
        TWO_LAYERS.replace("<>", ""), w1=sparse(16, 12, sparsity=0.9), w2=sparse(12, 8, sparsity=0.6)
    )
    out, result = sparsify(model, target="onnxruntime")
    assert op_counts(out) == {"Constant": 1, "MatMul": 2}
    assert "COO (int64 indices) is larger than dense" in result.details["skipped"][0]["reason"]
    assert_same_outputs(model, out, {"x": floats(2, 16)})


def test_onnxruntime_target_leaves_a_weight_an_excluded_node_shares():
    model = parse(
        """
      g (float[2,16] x) => (float[2,8] y, float[2,8] z) <float[16,8] w> {
        y = MatMul(x, w)
        z = MatMul(x, w) }""",
        w=sparse(16, 8),
    )
    model.graph.node[1].name = "keep"
    out, result = sparsify(model, target="onnxruntime", exclude="keep")
    assert op_counts(out) == {"MatMul": 2} and len(result.details["skipped"]) == 2
    out, _ = sparsify(model, target="onnxruntime")
    assert op_counts(out) == {"Constant": 1, "MatMul": 2}
    assert_same_outputs(model, out, {"x": floats(2, 16)})


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_sparsity": -0.1}, "min-sparsity -0.1 is outside"),
        ({"min_sparsity": 1.5}, "min-sparsity 1.5 is outside"),
        ({"min_sparsity": float("nan")}, "min-sparsity nan is outside"),
        ({"profile": "gfx803"}, "unknown device profile 'gfx803'"),
        ({"format": "coo"}, "unknown format 'coo'"),
        ({"values": "int4"}, "unknown values 'int4'"),
        ({"target": "onnxruntime", "values": "int8"}, "values=int8 needs target=polaris"),
        ({"target": "onnxruntime", "format": "bsr"}, "format=bsr needs target=polaris"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(options, message):
    model = parse(MLP.format(k=8, n=4), w=sparse(8, 4), b=floats(4))
    with pytest.raises(BadInput, match=message):
        sparsify(model, **options)


def test_pipeline_text_refuses_an_unknown_format():
    with pytest.raises(BadInput, match="sparsify{format=coo}: expected one of auto, csr, bsr, sell"):
        Pipeline.parse("sparsify{format=coo}")
    assert (
        Pipeline.parse("sparsify{min-sparsity=0.7,values=int8}").text()
        == "sparsify{min-sparsity=0.7,values=int8}"
    )
