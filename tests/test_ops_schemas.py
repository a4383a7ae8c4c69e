"""The ai.polaris schemas: onnx.checker (full_check) and strict shape inference accept every op,
infer Y's shape, and refuse contradictions; `attributes(node)` fills defaults and checks."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_ops_reference import case_model, conv_case, int4_case, quant_case, sparse_case

from polaris_opt.errors import BadInput
from polaris_opt.ops import (
    ATTRIBUTES,
    DOMAIN,
    OP_TYPES,
    OPSET_VERSION,
    attributes,
    complete_attributes,
    register_schemas,
)


def cases():
    rng = np.random.default_rng(0)
    yield sparse_case(rng, "csr", {}, "fp32", 7, 13, 0.5, (3, 2))
    yield sparse_case(rng, "bsr", {"block": (4, 4)}, "fp16", 9, 10, 0.5, (1,), bias=False)
    yield sparse_case(rng, "sell", {"slice_height": 4}, "int8", 9, 10, 0.5, (2,), index=np.uint16)
    yield conv_case(rng, "csr", {}, "int8", strides=(2, 1), pads=(1, 0, 1, 0), size=(8, 5))
    yield conv_case(rng, "bsr", {"block": (2, 2)}, "fp32", kernel=(2, 3), dilations=(2, 1), size=(9, 9))
    yield quant_case(rng, "QMatMul", True, 5, 12, (2, 3))
    yield quant_case(rng, "QMatMul", False, 5, 12, (4,), bias=False)
    yield quant_case(rng, "QGemm", True, 6, 8, (3,), alpha=2.0)
    yield int4_case(rng, 4, 40, 16, (2, 5))
    yield int4_case(rng, 4, 40, 32, (1,), zero_points=False, bias=False)


CASES = list(cases())


def with_hidden_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the op writing 'inner' and an Identity copying it to Y: inference must find
    inner's shape itself, as it is declared nowhere."""
    model.graph.node[0].output[0] = "inner"
    model.graph.node.append(helper.make_node("Identity", ["inner"], ["Y"]))
    return model


def inferred_dims(model: onnx.ModelProto, name: str = "inner") -> list:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (info,) = [v for v in inferred.graph.value_info if v.name == name]
    assert info.type.tensor_type.elem_type == TensorProto.FLOAT
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


def test_register_schemas_is_idempotent_and_complete():
    register_schemas()
    register_schemas()
    for op_type in OP_TYPES:
        schema = onnx.defs.get_schema(op_type, OPSET_VERSION, DOMAIN)
        assert schema.has_type_and_shape_inference_function
        declared = {spec.name for spec in ATTRIBUTES[op_type]}
        assert set(schema.attributes) == declared
    assert onnx.defs.get_schema("SparseMatMul", 1, DOMAIN).attributes["activation"].default_value.s == b"none"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.op_type)
def test_checker_and_strict_inference_accept_each_op(case):
    register_schemas()
    model = case_model(case)
    onnx.checker.check_model(model, full_check=True)
    hidden = with_hidden_output(case_model(case))
    onnx.checker.check_model(hidden, full_check=True)
    expected = ["batch", *case.expected.shape[1:]]
    assert inferred_dims(hidden) == expected


@pytest.mark.parametrize(
    "conv",
    [{"size": (7, 6)}, {"strides": (3, 2), "size": (10, 7)}, {"kernel": (1, 1), "pads": (0, 0, 0, 0)}],
)
def test_inferred_conv_shape_is_the_references(conv):
    register_schemas()
    case = conv_case(np.random.default_rng(1), "sell", {"slice_height": 3}, "fp16", **conv)
    assert inferred_dims(with_hidden_output(case_model(case, batch_names=False))) == list(
        case.reference().shape
    )


def _edited(case, edit) -> onnx.ModelProto:
    model = case_model(case)
    edit(model.graph)
    return model


def _attribute(graph, name, value):
    node = graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])


def _initializer(graph, name, value):
    for index, tensor in enumerate(graph.initializer):
        if tensor.name == name:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(value, name))


def _only_x_scale(graph):
    """A dynamic QMatMul given an x_scale but no x_zero_point."""
    graph.node[0].input.extend(["", "x_scale"])
    graph.initializer.append(numpy_helper.from_array(np.array(0.1, np.float32), "x_scale"))


SPARSE = CASES[0]  # csr, N = 7, K = 13
INT8_SELL = CASES[2]


@pytest.mark.parametrize(
    "case, edit, message",
    [
        (
            SPARSE,
            lambda g: _attribute(g, "shape", [8, 13]),
            "indptr's length for csr with shape [8, 13] is 8",
        ),
        (SPARSE, lambda g: _attribute(g, "shape", [7, 12]), "X's last axis is 13; the attributes need 12"),
        (SPARSE, lambda g: _attribute(g, "format", "coo"), "unknown format 'coo'"),
        (SPARSE, lambda g: _attribute(g, "activation", "tanh"), "unknown activation 'tanh'"),
        (INT8_SELL, lambda g: g.node[0].input.pop(), "a per-row scale input goes with int8 data"),
        (INT8_SELL, lambda g: _attribute(g, "slice_height", 0), "sell needs slice_height >= 1"),
        (CASES[3], lambda g: _attribute(g, "kernel_shape", [3, 3, 1]), "kernel_shape must be 2 ints"),
        (CASES[5], lambda g: _initializer(g, "w_scale", np.ones(4, np.float32)), "w_scale's length is 4"),
        (CASES[6], lambda g: _only_x_scale(g), "x_scale and x_zero_point go together"),
        (CASES[8], lambda g: _attribute(g, "block_size", 8), "block_size must be a power of two >= 16"),
        (CASES[8], lambda g: _attribute(g, "N", 5), "w_packed's axis 0 is 4; the attributes need 5"),
    ],
)
def test_contradictions_fail_inference_naming_the_node(case, edit, message):
    register_schemas()
    model = _edited(case, edit)
    with pytest.raises(onnx.shape_inference.InferenceError, match=re.escape(message)):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(model, full_check=True)


def test_checker_refuses_wrong_types_and_missing_attributes():
    register_schemas()
    wrong_type = _edited(SPARSE, lambda g: _initializer(g, "data", SPARSE.inputs[1].astype(np.float64)))
    with pytest.raises(
        (onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match="tensor.double"
    ):
        onnx.checker.check_model(wrong_type, full_check=True)
    no_shape = _edited(
        SPARSE,
        lambda g: g.node[0].attribute.remove(next(a for a in g.node[0].attribute if a.name == "shape")),
    )
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match="shape"):
        onnx.checker.check_model(no_shape, full_check=True)
    qgemm_3d = case_model(quant_case(np.random.default_rng(0), "QGemm", True, 3, 4, (2, 5)))
    with pytest.raises(onnx.shape_inference.InferenceError, match="X must be 2-D"):
        onnx.shape_inference.infer_shapes(qgemm_3d, strict_mode=True)


# ------------------------------------------------------------------------------ attributes()


def test_attributes_fill_defaults_alike_for_proto_and_graphsurgeon_nodes():
    proto = helper.make_node(
        "SparseConv",
        ["x", "d", "i", "p"],
        ["y"],
        name="c",
        domain=DOMAIN,
        format="csr",
        shape=[4, 18],
        kernel_shape=[3, 3],
    )
    node = gs.Node(
        "SparseConv", "c", attrs={"format": "csr", "shape": [4, 18], "kernel_shape": [3, 3]}, domain=DOMAIN
    )
    expected = {
        "format": "csr",
        "shape": (4, 18),
        "block": (1, 1),
        "slice_height": 0,
        "activation": "none",
        "kernel_shape": (3, 3),
        "pads": (0, 0, 0, 0),
        "strides": (1, 1),
        "dilations": (1, 1),
    }
    assert attributes(proto) == expected
    assert attributes(node) == expected
    assert complete_attributes("SparseConv", expected) == expected  # idempotent
    qgemm = helper.make_node("QGemm", ["x", "w", "s"], ["y"], domain=DOMAIN)
    assert attributes(qgemm) == {"alpha": 1.0, "activation": "none"}


@pytest.mark.parametrize(
    "op_type, attrs, message",
    [
        ("SparseMatMul", {"format": "csr", "shape": [2, 2], "block": 4}, "attribute 'block' must be ints"),
        ("SparseMatMul", {"format": "csr", "shape": [2.5, 2]}, "attribute 'shape' must be ints"),
        ("SparseMatMul", {"format": "csr", "shape": [0, 2]}, "shape must be [N, K] with N, K >= 1"),
        (
            "SparseConv",
            {"format": "csr", "shape": [2, 10], "kernel_shape": [3, 3]},
            "shape[1] = 10 is not C·kh·kw",
        ),
        ("QGemm", {"alpha": float("inf")}, "alpha must be finite"),
        ("MatMulInt4", {"K": 16, "N": 2}, "attribute 'block_size' is required"),
        ("Gemm", {}, "not an ai.polaris op"),
    ],
)
def test_bad_attributes_are_one_clear_error(op_type, attrs, message):
    node = gs.Node(op_type, "bad_node", attrs=attrs, domain=DOMAIN)
    with pytest.raises(BadInput, match=re.escape(message)) as raised:
        attributes(node)
    assert "node 'bad_node'" in str(raised.value)


def test_attributes_of_another_domain_are_refused():
    with pytest.raises(BadInput, match="is not in domain ai.polaris"):
        attributes(helper.make_node("QGemm", ["x"], ["y"], name="n"))
