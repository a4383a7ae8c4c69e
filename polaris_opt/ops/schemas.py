"""ONNX schemas of the ai.polaris ops, so `onnx.checker` (full_check) and strict shape inference
accept models that use them (docs/OPS.md is the specification).

Each schema declares inputs, outputs, type constraints and attributes (defaults from
polaris_opt.ops.ATTRIBUTES) and carries a Python type-and-shape inference function: Y is float32,
X's leading axes pass through, the last becomes N. Where input shapes are known (weights are
initializers, so theirs always are) the function also checks them against the attributes, and
a contradiction, such as an indptr too short for `shape`, fails inference with a message that
names the node.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from polaris_opt.errors import BadInput
from polaris_opt.ops import ATTRIBUTES, DOMAIN, OP_TYPES, OPSET_VERSION, complete_attributes

_Param = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_ATTR_TYPES = {
    "int": OpSchema.AttrType.INT,
    "ints": OpSchema.AttrType.INTS,
    "float": OpSchema.AttrType.FLOAT,
    "string": OpSchema.AttrType.STRING,
}
_FLOAT = "tensor(float)"

# The same six inputs for both sparse ops.
_SPARSE_INPUTS = (
    _Param("X", _FLOAT, "activations: [..., K] (SparseMatMul) or [B, C, H, W] (SparseConv)"),
    _Param("data", "T_values", "stored values of W (layout per `format`)"),
    _Param("indices", "T_index", "column (csr, sell) or block-column (bsr) of each stored value"),
    _Param("indptr", "tensor(int32)", "row (csr), block-row (bsr) or slice (sell) offsets into indices"),
    _Param("bias", _FLOAT, "[N], added to each output row", param_option=_OPTIONAL),
    _Param(
        "scale",
        _FLOAT,
        "[N], per-row scale of int8 values (required iff data is int8)",
        param_option=_OPTIONAL,
    ),
)
_SPARSE_TYPES = (
    ("T_values", ["tensor(float)", "tensor(float16)", "tensor(int8)"], "stored value type"),
    ("T_index", ["tensor(int32)", "tensor(uint16)"], "index type"),
)
_QUANT_INPUTS = (
    _Param("X", _FLOAT, "activations [..., K] (QGemm: [M, K])"),
    _Param("w_q", "tensor(int8)", "[N, K] int8 weight, rows = output features"),
    _Param("w_scale", _FLOAT, "[N] per-output-channel weight scale"),
    _Param("bias", _FLOAT, "[N]", param_option=_OPTIONAL),
    _Param("x_scale", _FLOAT, "scalar: static activation scale (absent: dynamic)", param_option=_OPTIONAL),
    _Param("x_zero_point", "tensor(uint8)", "scalar: static activation zero point", param_option=_OPTIONAL),
)
_INT4_INPUTS = (
    _Param("X", _FLOAT, "activations [..., K]"),
    _Param(
        "w_packed", "tensor(uint8)", "[N, ceil(K/block_size), block_size/2] 4-bit codes, low nibble first"
    ),
    _Param("scales", _FLOAT, "[N, ceil(K/block_size)] one scale per block"),
    _Param(
        "zero_points",
        "tensor(uint8)",
        "[N, ceil(blocks/2)] packed 4-bit zero points (absent: 8)",
        param_option=_OPTIONAL,
    ),
    _Param("bias", _FLOAT, "[N]", param_option=_OPTIONAL),
)
_INPUTS = {
    "SparseMatMul": (_SPARSE_INPUTS, _SPARSE_TYPES),
    "SparseConv": (_SPARSE_INPUTS, _SPARSE_TYPES),
    "QMatMul": (_QUANT_INPUTS, ()),
    "QGemm": (_QUANT_INPUTS, ()),
    "MatMulInt4": (_INT4_INPUTS, ()),
}
_DOCS = {
    "SparseMatMul": "Y = act(X·Wᵀ + bias) with W [N, K] stored sparse (csr, bsr or sell).",
    "SparseConv": "Y = act(Conv(X, W) + bias), group 1, W seen as [O, C·kh·kw] and stored sparse.",
    "QMatMul": "Y = act(acc·x_scale·w_scale + bias), acc = Σ (x_q − zp)·w_q in int32; X quantized to uint8.",
    "QGemm": "QMatMul for 2-D X with Gemm's alpha: Y = act(alpha·acc·x_scale·w_scale + bias).",
    "MatMulInt4": "Y = X·Wᵀ + bias with W block-wise INT4 (MatMulNBits layout).",
}


def register_all() -> None:
    """Register each schema unless this process already has it (the registry is global)."""
    for op_type in OP_TYPES:
        if not onnx.defs.has(op_type, OPSET_VERSION, DOMAIN):
            onnx.defs.register_schema(build_schema(op_type))


def build_schema(op_type: str) -> OpSchema:
    inputs, types = _INPUTS[op_type]
    schema = OpSchema(
        op_type,
        DOMAIN,
        OPSET_VERSION,
        _DOCS[op_type] + " See docs/OPS.md.",
        inputs=list(inputs),
        outputs=[_Param("Y", _FLOAT, "float32 result: X's leading axes, then N")],
        type_constraints=list(types),
        attributes=[_schema_attribute(spec) for spec in ATTRIBUTES[op_type]],
    )
    schema.set_type_and_shape_inference_function(_inference(op_type, _SHAPES[op_type]))
    return schema


def _schema_attribute(spec) -> OpSchema.Attribute:
    if spec.default is None:
        return OpSchema.Attribute(spec.name, _ATTR_TYPES[spec.kind], spec.help, required=True)
    default = list(spec.default) if spec.kind == "ints" else spec.default
    return OpSchema.Attribute(spec.name, helper.make_attribute(spec.name, default), spec.help)


# ------------------------------------------------------------------------------ inference

Dims = list  # of TensorShapeProto.Dimension, or None where the shape is unknown


class _Context:
    """What an inference function reads: input shapes and the completed attributes."""

    def __init__(self, ctx, op_type: str):
        self.ctx, self.op_type = ctx, op_type
        self.name = ctx.get_display_name()
        raw = {}
        for spec in ATTRIBUTES[op_type]:
            attr = ctx.get_attribute(spec.name)
            if attr is not None:
                value = helper.get_attribute_value(attr)
                raw[spec.name] = value.decode() if isinstance(value, bytes) else value
        try:
            self.attrs = complete_attributes(op_type, raw)
        except BadInput as error:
            self.fail(str(error).split(": ", 1)[-1])

    def dims(self, index: int) -> Dims | None:
        if index >= self.ctx.get_num_inputs() or not self.ctx.has_input(index):
            return None
        tensor_type = self.ctx.get_input_type(index).tensor_type
        return list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None

    def elem_type(self, index: int) -> int | None:
        if index >= self.ctx.get_num_inputs() or not self.ctx.has_input(index):
            return None
        return self.ctx.get_input_type(index).tensor_type.elem_type

    def fail(self, message: str) -> None:
        # The display name reads "node SparseMatMul[ai.polaris] (name)".
        raise onnx.shape_inference.InferenceError(f"{self.name}: {message}")

    def expect(self, index: int, axis: int, value: int, what: str) -> None:
        """Fail if input `index`'s `axis` is known and differs from `value`."""
        dims = self.dims(index)
        if dims is None or not -len(dims) <= axis < len(dims):
            return
        if dims[axis].HasField("dim_value") and dims[axis].dim_value != value:
            self.fail(f"{what} is {dims[axis].dim_value}; the attributes need {value}")


def _inference(op_type: str, output_dims: Callable[[_Context], Dims | None]):
    def infer(ctx) -> None:
        output = onnx.TypeProto()
        output.tensor_type.elem_type = TensorProto.FLOAT
        dims = output_dims(_Context(ctx, op_type))
        if dims is not None:
            output.tensor_type.shape.dim.extend(dims)
        ctx.set_output_type(0, output)

    return infer


def _dim(value: int | None) -> onnx.TensorShapeProto.Dimension:
    dim = onnx.TensorShapeProto.Dimension()
    if value is not None:
        dim.dim_value = value
    return dim


def _known(dim) -> int | None:
    return dim.dim_value if dim.HasField("dim_value") else None


def _rows_then(c: _Context, x_dims: Dims | None, n: int | None) -> Dims | None:
    """X's leading axes, then N."""
    if x_dims is None:
        return None
    if not x_dims:
        c.fail("X must have at least one axis")
    return [*x_dims[:-1], _dim(n)]


def _check_sparse_weight(c: _Context) -> None:
    n, k = c.attrs["shape"]
    fmt = c.attrs["format"]
    height = {"csr": 1, "bsr": c.attrs["block"][0], "sell": c.attrs["slice_height"]}[fmt]
    c.expect(3, 0, -(-n // height) + 1, f"indptr's length for {fmt} with shape [{n}, {k}]")
    int8 = c.elem_type(1) == TensorProto.INT8
    if int8 != (c.elem_type(5) is not None):
        c.fail("a per-row scale input goes with int8 data, and only with it")
    for index, what in ((4, "bias"), (5, "scale")):
        c.expect(index, 0, n, f"{what}'s length")


def _sparse_matmul(c: _Context) -> Dims | None:
    _check_sparse_weight(c)
    n, k = c.attrs["shape"]
    c.expect(0, -1, k, "X's last axis")
    return _rows_then(c, c.dims(0), n)


def _sparse_conv(c: _Context) -> Dims | None:
    _check_sparse_weight(c)
    dims = c.dims(0)
    if dims is None:
        return None
    if len(dims) != 4:
        c.fail(f"X must be [B, C, H, W]; it has {len(dims)} axes")
    out_channels, reduction = c.attrs["shape"]
    kh, kw = c.attrs["kernel_shape"]
    c.expect(0, 1, reduction // (kh * kw), "X's channel count")
    pads, strides, dilations = c.attrs["pads"], c.attrs["strides"], c.attrs["dilations"]
    spatial = []
    for axis in range(2):
        size = _known(dims[2 + axis])
        if size is not None:
            span = size + pads[axis] + pads[axis + 2] - dilations[axis] * (c.attrs["kernel_shape"][axis] - 1)
            if span < 1:
                c.fail(f"the kernel does not fit axis {2 + axis} of X ({size} with pads)")
            size = (span - 1) // strides[axis] + 1
        spatial.append(_dim(size))
    return [dims[0], _dim(out_channels), *spatial]


def _quantized(c: _Context) -> Dims | None:
    weight = c.dims(1)
    n = _known(weight[0]) if weight and len(weight) == 2 else None
    if weight is not None and len(weight) != 2:
        c.fail(f"w_q must be [N, K]; it has {len(weight)} axes")
    if weight is not None and _known(weight[1]) is not None:
        c.expect(0, -1, _known(weight[1]), "X's last axis")
    if n is not None:
        for index, what in ((2, "w_scale"), (3, "bias")):
            c.expect(index, 0, n, f"{what}'s length")
    if (c.elem_type(4) is None) != (c.elem_type(5) is None):
        c.fail("x_scale and x_zero_point go together (both: static, neither: dynamic)")
    x_dims = c.dims(0)
    if c.op_type == "QGemm" and x_dims is not None and len(x_dims) != 2:
        c.fail(f"X must be 2-D [M, K]; it has {len(x_dims)} axes")
    return _rows_then(c, x_dims, n)


def _matmul_int4(c: _Context) -> Dims | None:
    k, n, size = c.attrs["K"], c.attrs["N"], c.attrs["block_size"]
    blocks = -(-k // size)
    c.expect(0, -1, k, "X's last axis")
    for axis, value in enumerate((n, blocks, size // 2)):
        c.expect(1, axis, value, f"w_packed's axis {axis}")
    for axis, value in enumerate((n, blocks)):
        c.expect(2, axis, value, f"scales' axis {axis}")
    for axis, value in enumerate((n, -(-blocks // 2))):
        c.expect(3, axis, value, f"zero_points' axis {axis}")
    c.expect(4, 0, n, "bias's length")
    return _rows_then(c, c.dims(0), n)


_SHAPES = {
    "SparseMatMul": _sparse_matmul,
    "SparseConv": _sparse_conv,
    "QMatMul": _quantized,
    "QGemm": _quantized,
    "MatMulInt4": _matmul_int4,
}
