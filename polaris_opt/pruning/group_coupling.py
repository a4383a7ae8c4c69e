"""Channel coupling by the ops between weight layers: which inputs and outputs share a group's channels.

GroupBuilder (polaris_opt.pruning.group_search) calls the rule of every node that produces or
reads a member; a rule here joins the tensors the node couples, records the constants a
rewrite slices, or marks the group unsafe with a reason. An op with no rule (here or the
weight-layer rule in group_search) makes the group unsafe.

- unary elementwise ops (Relu, Clip, Sigmoid, Erf, Cast, Dropout, ...): input and output coupled.
- BatchNormalization, InstanceNormalization: coupled, per-channel parameters sliced.
- pooling, Pad of spatial axes, Resize/Upsample with channel scale 1: coupled.
- Add/Sub/Mul/Div/Max/Min/Sum/Mean/Pow/PRelu: inputs that carry the channels couple (a
  residual Add couples both branches' producers); a constant that carries them is sliced, one
  that broadcasts along them stays.
- Concat: along the channels, ids side by side; along another axis, inputs coupled.
- Flatten at the channel axis: each channel becomes a block of features.
- Slice, Split, Softmax along another axis: coupled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.pruning.groups import Member, SizeEntry, node_label
from polaris_opt.surgery import constant_value

if TYPE_CHECKING:
    # Annotations only: group_search imports this module for its rules.
    from polaris_opt.pruning.group_search import GroupBuilder

# Ops that compute each element from the element at the same place alone.
UNARY_OPS = frozenset(
    "Relu Clip Sigmoid Tanh LeakyRelu HardSigmoid HardSwish Dropout Identity Cast Erf Gelu Elu Selu "
    "Celu Softplus Softsign Mish Neg Abs Sqrt Exp Log Reciprocal ThresholdedRelu Floor Ceil Round "
    "Sign Sin Cos".split()
)
POOL_OPS = frozenset("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
ELEMENTWISE_OPS = frozenset("Add Sub Mul Div Max Min Sum Mean Pow PRelu".split())
NORM_OPS = ("BatchNormalization", "InstanceNormalization")


def _unary(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    if b.data_only(node, member) and not b.extra_outputs_used(node):
        b.like(node.inputs[0], member)
        b.like(node.outputs[0], member)


def _spatial(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    # Pooling and normalization treat axis 1 as the channels: the member's axis must be it.
    if b.channel_axis(node, member) not in (None, 1):
        b.unsafe(f"{node.op} '{node_label(node)}' takes axis 1 as channels, not axis {member.absolute_axis}")
        return
    if member.absolute_axis == 1:
        _unary(b, node, member)


def _norm(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    if node.attrs.get("training_mode", 0):
        b.unsafe(f"{node.op} '{node_label(node)}' runs in training mode")
        return
    _spatial(b, node, member)
    out = b.group.members.get(node.outputs[0].name)
    if out is None:
        return
    for index in range(1, len(node.inputs)):
        value = constant_value(node.inputs[index])
        if value is None or value.shape != (out.size,):
            b.unsafe(
                f"parameter '{node.inputs[index].name}' of {node.op} '{node_label(node)}' is not per channel"
            )
        else:
            b.slice(node, index, 0, out)


def _elementwise(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    """Inputs with the member's channels couple (constants are sliced); broadcasting ones stay."""
    axis, size = member.axis, member.size
    coupled, constants, ranks = [], [], [member.rank]
    for index, tensor in enumerate(node.inputs):
        if tensor.is_empty() or tensor is member.tensor:
            continue
        known = b.group.members.get(tensor.name)
        if known is not None:
            coupled.append((tensor, known.rank))
            ranks.append(known.rank)
            continue
        dims = b.dims(tensor)
        if dims is None:
            b.unsafe(f"the shape of '{tensor.name}' at {node.op} '{node_label(node)}' is unknown")
            continue
        ranks.append(len(dims))
        dim = dims[axis] if len(dims) >= -axis else 1
        if dim == size:
            if isinstance(tensor, gs.Constant):
                constants.append(index)
            else:
                coupled.append((tensor, len(dims)))
        elif dim != 1:
            b.unsafe(
                f"'{tensor.name}' has {dim} entries along the channels of {node.op} '{node_label(node)}'"
            )
    out_rank = None if None in ranks or member.tensor is node.outputs[0] else max(ranks)
    out = b.join(node.outputs[0], axis, member.ids, out_rank)
    for tensor, rank in coupled:
        b.join(tensor, axis, member.ids, rank)
    for index in constants:
        if out is not None:
            b.slice(node, index, axis, out)


def _concat(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    channel_axis = b.channel_axis(node, member)
    if channel_axis is None:
        return
    axis = node.attrs.get("axis", 0)
    if (axis + member.rank if axis < 0 else axis) != channel_axis:
        _elementwise(b, node, member)  # along another axis every input carries the same channels
        return
    out_member = b.group.members.get(node.outputs[0].name)
    pieces, offset = [], 0
    for tensor in node.inputs:
        ids = _concat_piece(b, node, tensor, member, out_member, offset)
        if ids is None:
            return
        pieces.append((tensor, ids))
        offset += len(ids)
    for tensor, ids in pieces:
        b.join(tensor, member.axis, ids, member.rank)
    b.join(node.outputs[0], member.axis, np.concatenate([ids for _, ids in pieces]), member.rank)


def _concat_piece(b, node, tensor, member, out_member, offset) -> np.ndarray | None:
    """The ids of one Concat input: its own, its slice of the output's, or new ones."""
    if isinstance(tensor, gs.Constant):
        b.unsafe(f"Concat '{node_label(node)}' joins constant '{tensor.name}' along the channels")
        return None
    known = b.group.members.get(tensor.name)
    if known is not None:
        return known.ids
    dims = b.dims(tensor)
    count = dims[member.axis] if dims is not None and len(dims) >= -member.axis else None
    if count is None:
        b.unsafe(f"the channel count of '{tensor.name}' at Concat '{node_label(node)}' is unknown")
        return None
    if out_member is not None and offset + count <= out_member.size:
        return out_member.ids[offset : offset + count]
    return b.group.fresh(count)


def _flatten(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    source, out = node.inputs[0], node.outputs[0]
    dims = b.dims(source)
    if dims is None:
        b.unsafe(f"the shape of '{source.name}' before Flatten '{node_label(node)}' is unknown")
        return
    rank = len(dims)
    axis = node.attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    trailing = dims[axis + 1 :]
    expected = (axis - rank) if member.tensor is source else -1
    if member.axis != expected or axis >= rank or any(d is None for d in trailing):
        b.unsafe(f"Flatten '{node_label(node)}' mixes the channels with other axes or has dynamic sizes")
        return
    known = b.group.members.get(source.name)
    ids = known.ids if known is not None else (b.group.fresh(dims[axis]) if dims[axis] else None)
    if ids is None:
        b.unsafe(f"the channel count of '{source.name}' is unknown")
        return
    b.join(source, axis - rank, ids, rank)
    b.join(out, -1, np.repeat(ids, int(np.prod(trailing, dtype=np.int64))), 2)


def _pad(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    channel_axis = b.channel_axis(node, member)
    if channel_axis is None or not b.data_only(node, member):
        return
    if len(node.inputs) > 1:
        pads = constant_value(node.inputs[1])
        axes = _optional_constant(node, 3)
    else:
        pads, axes = np.asarray(node.attrs.get("pads", [])), None
    if pads is None or (axes is None and len(node.inputs) > 3 and not node.inputs[3].is_empty()):
        b.unsafe(f"the pads of Pad '{node_label(node)}' are computed")
        return
    entry = _entry(axes, channel_axis, member.rank)
    half = len(pads) // 2
    if entry is not None and (pads[entry] != 0 or pads[entry + half] != 0):
        b.unsafe(f"Pad '{node_label(node)}' pads the channel axis")
        return
    _unary(b, node, member)


def _resize(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    channel_axis = b.channel_axis(node, member)
    if channel_axis is None or not b.data_only(node, member):
        return
    entry = _entry(node.attrs.get("axes"), channel_axis, member.rank)
    scales_at = 1 if node.op == "Upsample" or b.graph.opset < 11 else 2
    scales = _optional_constant(node, scales_at)
    if scales is None and "scales" in node.attrs:
        scales = np.asarray(node.attrs["scales"])
    sizes = _optional_constant(node, 3) if scales_at == 2 else None
    computed = [i for i in (scales_at, 3) if _present(node, i) and _optional_constant(node, i) is None]
    if computed:
        b.unsafe(f"the scales or sizes of {node.op} '{node_label(node)}' are computed")
        return
    if entry is not None and scales is not None and scales.size and scales[entry] != 1:
        b.unsafe(f"{node.op} '{node_label(node)}' scales the channel axis")
        return
    _unary(b, node, member)
    out = b.group.members.get(node.outputs[0].name)
    if entry is None or sizes is None or not sizes.size or out is None:
        return
    if sizes[entry] != out.size:
        b.unsafe(f"{node.op} '{node_label(node)}' resizes the channel axis")
    elif b.first(("size", id(node))):
        b.group.sizes.append(SizeEntry(node, 3, entry, out))


def _along_other_axis(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    """Softmax, Slice and Split keep channels apart unless they work along the channel axis."""
    channel_axis = b.channel_axis(node, member)
    if channel_axis is None or not b.data_only(node, member):
        return
    axes = _working_axes(b, node, member.rank)
    if axes is None:
        b.unsafe(f"the axes of {node.op} '{node_label(node)}' are computed")
    elif channel_axis in axes:
        b.unsafe(f"{node.op} '{node_label(node)}' works along the channel axis")
    else:
        b.like(node.inputs[0], member)
        for tensor in node.outputs:
            b.like(tensor, member)


def _working_axes(b: GroupBuilder, node: gs.Node, rank: int) -> set[int] | None:
    if node.op == "Split":
        axes = [node.attrs.get("axis", 0)]
    elif node.op == "Slice":
        starts = _optional_constant(node, 1) if len(node.inputs) > 1 else np.asarray(node.attrs["starts"])
        axes = _optional_constant(node, 3) if len(node.inputs) > 1 else node.attrs.get("axes")
        if starts is None or (axes is None and _present(node, 3)):
            return None
        axes = list(range(len(starts))) if axes is None else list(np.asarray(axes))
    elif b.graph.opset >= 13:
        axes = [node.attrs.get("axis", -1)]
    else:  # before opset 13 Softmax flattens every axis from `axis` on into one
        start = node.attrs.get("axis", 1)
        start = start + rank if start < 0 else start
        axes = list(range(start, rank))
    return {int(a) + rank if a < 0 else int(a) for a in axes}


# ---------------------------------------------------------------------------- helpers


def _present(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and not node.inputs[index].is_empty()


def _optional_constant(node: gs.Node, index: int) -> np.ndarray | None:
    return constant_value(node.inputs[index]) if _present(node, index) else None


def _entry(axes, channel_axis: int, rank: int) -> int | None:
    """Where the channel axis sits in a per-axis list (pads, scales): None when it is not listed."""
    if axes is None:
        return channel_axis
    normalized = [int(a) + rank if a < 0 else int(a) for a in np.asarray(axes).ravel()]
    return normalized.index(channel_axis) if channel_axis in normalized else None


Rule = Callable[["GroupBuilder", gs.Node, Member], None]
COUPLING_RULES: dict[str, Rule] = {
    **{op: _unary for op in UNARY_OPS},
    **{op: _spatial for op in POOL_OPS},
    **{op: _norm for op in NORM_OPS},
    **{op: _elementwise for op in ELEMENTWISE_OPS},
    **{op: _along_other_axis for op in ("Softmax", "LogSoftmax", "Hardmax", "Slice", "Split")},
    "Concat": _concat,
    "Flatten": _flatten,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
}
