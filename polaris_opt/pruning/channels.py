"""Physical channel removal: which channels of a group go, and the rewrite that takes them out.

Selection: the round(sparsity · channels) lowest-importance channels of the group go (half
rounds up; ties go by channel index), but every member tensor keeps at least one channel, so
no layer is ever left with zero inputs or outputs.

Rewrite: every constant the group recorded (producer weight rows and biases, depthwise Conv
rows and biases, BatchNormalization/InstanceNormalization parameters, per-channel constants of
elementwise ops, consumer weight input slices, Gemm/MatMul rows of a Flatten block) keeps the
positions of the kept channels; a depthwise Conv's `group` and a Resize's `sizes` entry
become the kept count; the channel dimension of each member tensor's known shape is updated,
so `infer-shapes` and onnx.checker agree with the new sizes. Tensor names stay: a layer's
output is the same tensor, with fewer channels. A constant that a node outside the edit also
reads is copied under a new name instead of being changed under that node.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.pruning.groups import Group, Member
from polaris_opt.surgery import Names, constant_value


def channels_to_remove(group: Group, importance: np.ndarray, sparsity: float) -> np.ndarray:
    """Sorted group channels to remove: the lowest scores, each member keeping one channel."""
    wanted = min(math.floor(sparsity * group.channel_count + 0.5), group.channel_count - 1)
    remaining = [len(np.unique(m.channels)) for m in group.members.values()]
    holders = [set(m.channels.tolist()) for m in group.members.values()]
    removed: list[int] = []
    for channel in np.argsort(importance, kind="stable").tolist():
        if len(removed) >= wanted:
            break
        touched = [i for i, held in enumerate(holders) if channel in held]
        if any(remaining[i] == 1 for i in touched):
            continue  # the last channel of some tensor stays
        for i in touched:
            remaining[i] -= 1
        removed.append(channel)
    return np.array(sorted(removed), np.int64)


def kept_positions(member: Member, removed: np.ndarray) -> np.ndarray:
    """Positions along `member`'s channel axis whose channel stays."""
    return np.flatnonzero(~np.isin(member.channels, removed))


def remove_channels(group: Group, removed: np.ndarray, names: Names) -> tuple[int, int]:
    """Take `removed` out of every tensor and constant of `group`; (params before, after).

    The parameter counts are the elements of the constants this group's rewrite touches, just
    before and just after it.
    """
    kept = {name: kept_positions(member, removed) for name, member in group.members.items()}
    before = touched_elements(group)
    for edit in group.slices:
        values = constant_value(edit.node.inputs[edit.index])
        positions = kept[edit.member.tensor.name]
        _set_constant(edit.node, edit.index, np.take(values, positions, axis=edit.axis), names)
    for entry in group.sizes:
        sizes = constant_value(entry.node.inputs[entry.index]).copy()
        sizes[entry.entry] = len(kept[entry.member.tensor.name])
        _set_constant(entry.node, entry.index, sizes, names)
    for use in group.layers:
        if use.role == "depthwise":
            use.node.attrs["group"] = len(kept[use.member.tensor.name])
    for name, member in group.members.items():
        _set_channel_dim(member, len(kept[name]))
    return before, touched_elements(group)


def _set_constant(node: gs.Node, index: int, values: np.ndarray, names: Names) -> None:
    """Give input `index` of `node` the new values, copying a constant that others read too."""
    old = node.inputs[index]
    if len(old.outputs) > 1:
        node.inputs[index] = gs.Constant(names.fresh(f"{old.name}.pruned"), values)
    else:
        old.values = values


def _set_channel_dim(member: Member, count: int) -> None:
    shape = member.tensor.shape
    if shape is not None and len(shape) >= -member.axis:
        shape = list(shape)
        shape[member.axis] = count
        member.tensor.shape = shape


def touched_elements(group: Group) -> int:
    """Elements of the distinct constants the group's rewrite edits, as they are now."""
    slots = [(edit.node, edit.index) for edit in (*group.slices, *group.sizes)]
    tensors = {id(node.inputs[index]): node.inputs[index] for node, index in slots}
    return sum(int(np.prod(t.values.shape, dtype=np.int64)) for t in tensors.values())
