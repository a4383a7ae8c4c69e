"""The ai.polaris op set, version 1 (docs/OPS.md): its attributes, written once, and their reading.

Every op's attributes are declared here with their types and defaults; the ONNX schemas
(schemas.py), the NumPy references (reference.py), the lowering (lowering.py) and the OpenCL
launchers all read a node's attributes through `attributes(node)`, which fills the defaults and
refuses what the op cannot mean (an unknown sparse format, a block size that is no power of two),
so every consumer sees the same values and no one re-checks them.

Importing this package registers nothing: ONNX's schema registry is process-wide, so code that
checks or infers shapes of ai.polaris models calls `register_schemas()` (idempotent) first.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from polaris_opt.errors import BadInput

DOMAIN = "ai.polaris"
OPSET_VERSION = 1

SPARSE_FORMATS = ("csr", "bsr", "sell")
ACTIVATIONS = ("none", "relu")
MIN_INT4_BLOCK = 16  # MatMulNBits' smallest block; a power of two so a block is whole bytes


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute of an op: its ONNX kind, its default (None: required) and what it means."""

    name: str
    kind: str  # "int" | "ints" | "float" | "string"
    default: Any
    help: str


_SPARSE = (
    AttributeSpec("format", "string", None, "storage format of W: csr, bsr or sell"),
    AttributeSpec("shape", "ints", None, "[N, K]: the dense W, rows = output features"),
    AttributeSpec("block", "ints", (1, 1), "[R, C]: the block of bsr"),
    AttributeSpec("slice_height", "int", 0, "C: rows per slice of sell"),
    AttributeSpec("activation", "string", "none", "applied to the result: none or relu"),
)
_CONV = (
    AttributeSpec("kernel_shape", "ints", None, "[kh, kw]"),
    AttributeSpec("pads", "ints", (0, 0, 0, 0), "[top, left, bottom, right]"),
    AttributeSpec("strides", "ints", (1, 1), "[sh, sw]"),
    AttributeSpec("dilations", "ints", (1, 1), "[dh, dw]"),
)
_ACTIVATION = AttributeSpec("activation", "string", "none", "applied to the result: none or relu")

ATTRIBUTES: dict[str, tuple[AttributeSpec, ...]] = {
    "SparseMatMul": _SPARSE,
    "SparseConv": _SPARSE + _CONV,
    "QMatMul": (_ACTIVATION,),
    "QGemm": (AttributeSpec("alpha", "float", 1.0, "scales the product, as Gemm's alpha"), _ACTIVATION),
    "MatMulInt4": (
        AttributeSpec("K", "int", None, "reduction length of W"),
        AttributeSpec("N", "int", None, "output features of W"),
        AttributeSpec("block_size", "int", None, "weights per scale along K: a power of two >= 16"),
    ),
}
OP_TYPES = tuple(ATTRIBUTES)


def attributes(node) -> dict[str, Any]:
    """The attributes of an ai.polaris node (onnx.NodeProto or gs.Node), defaults filled, checked.

    ints come back as tuples, strings as str. BadInput names the node when something is wrong.
    """
    is_proto = hasattr(node, "attribute")
    op_type = node.op_type if is_proto else node.op  # graphsurgeon calls it `op`
    if (node.domain or "") != DOMAIN:
        raise BadInput(f"node '{node.name}' ({op_type}) is not in domain {DOMAIN}")
    raw = _proto_attributes(node) if is_proto else dict(node.attrs)
    return complete_attributes(op_type, raw, where=f"node '{node.name}'")


def complete_attributes(op_type: str, given: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """`given` with every default of `op_type` filled in, values normalized and checked.

    Idempotent: a completed dict completes to itself, so references accept either.
    """
    prefix = f"{where} ({op_type})" if where else op_type
    if op_type not in ATTRIBUTES:
        raise BadInput(f"{prefix}: not an {DOMAIN} op; known: {', '.join(OP_TYPES)}")
    specs = {spec.name: spec for spec in ATTRIBUTES[op_type]}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise BadInput(f"{prefix}: unknown attribute {unknown[0]!r}; known: {', '.join(specs)}")
    attrs = {}
    for name, spec in specs.items():
        if given.get(name) is None and spec.default is None:
            raise BadInput(f"{prefix}: attribute {name!r} is required ({spec.help})")
        attrs[name] = _normalized(spec, given.get(name, spec.default), prefix)
    problem = _CHECKS.get(op_type, lambda attrs: None)(attrs)
    if problem:
        raise BadInput(f"{prefix}: {problem}")
    return attrs


def register_schemas() -> None:
    """Register the op set with ONNX (checker, shape inference), once per process."""
    from polaris_opt.ops.schemas import register_all

    with _REGISTER_LOCK:
        register_all()


_REGISTER_LOCK = threading.Lock()


# ------------------------------------------------------------------------------ reading values


def _proto_attributes(node) -> dict[str, Any]:
    from onnx import helper

    values = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    return values


def _normalized(spec: AttributeSpec, value: Any, prefix: str) -> Any:
    try:
        if spec.kind == "ints":
            return tuple(_as_int(v) for v in value)
        if spec.kind == "int":
            return _as_int(value)
        if spec.kind == "float":
            if isinstance(value, str | bytes):
                raise TypeError
            return float(value)
        if isinstance(value, bytes):
            value = value.decode()
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise BadInput(f"{prefix}: attribute {spec.name!r} must be {spec.kind}; got {value!r}") from None


def _as_int(value: Any) -> int:
    if isinstance(value, float | str) or isinstance(value, bool):
        raise TypeError  # 2.5 or "3" is a mistake, not an int
    return int(value)


# ----------------------------------------------------------------------------------- checks


def _check_activation(attrs: dict) -> str | None:
    if attrs["activation"] not in ACTIVATIONS:
        return f"unknown activation {attrs['activation']!r}; expected {' or '.join(ACTIVATIONS)}"
    return None


def _check_sparse(attrs: dict) -> str | None:
    if attrs["format"] not in SPARSE_FORMATS:
        return f"unknown format {attrs['format']!r}; expected one of {', '.join(SPARSE_FORMATS)}"
    if len(attrs["shape"]) != 2 or min(attrs["shape"]) < 1:
        return f"shape must be [N, K] with N, K >= 1; got {list(attrs['shape'])}"
    if attrs["format"] == "bsr" and (len(attrs["block"]) != 2 or min(attrs["block"]) < 1):
        return f"bsr needs block [R, C] with R, C >= 1; got {list(attrs['block'])}"
    if attrs["format"] == "sell" and attrs["slice_height"] < 1:
        return f"sell needs slice_height >= 1; got {attrs['slice_height']}"
    return _check_activation(attrs)


def _check_conv(attrs: dict) -> str | None:
    problem = _check_sparse(attrs)
    if problem:
        return problem
    expected = {"kernel_shape": (2, 1), "pads": (4, 0), "strides": (2, 1), "dilations": (2, 1)}
    for name, (length, least) in expected.items():
        if len(attrs[name]) != length or min(attrs[name]) < least:
            return f"{name} must be {length} ints >= {least}; got {list(attrs[name])}"
    taps = math.prod(attrs["kernel_shape"])
    if attrs["shape"][1] % taps:
        return f"shape[1] = {attrs['shape'][1]} is not C·kh·kw for kernel_shape {list(attrs['kernel_shape'])}"
    return None


def _check_qgemm(attrs: dict) -> str | None:
    if not math.isfinite(attrs["alpha"]):
        return f"alpha must be finite; got {attrs['alpha']}"
    return _check_activation(attrs)


def _check_int4(attrs: dict) -> str | None:
    size = attrs["block_size"]
    if size < MIN_INT4_BLOCK or size & (size - 1):
        return f"block_size must be a power of two >= {MIN_INT4_BLOCK}; got {size}"
    if attrs["K"] < 1 or attrs["N"] < 1:
        return f"K and N must be >= 1; got K={attrs['K']}, N={attrs['N']}"
    return None


_CHECKS = {
    "SparseMatMul": _check_sparse,
    "SparseConv": _check_conv,
    "QMatMul": _check_activation,
    "QGemm": _check_qgemm,
    "MatMulInt4": _check_int4,
}
