"""Channel dependency groups: which channels of which tensors go away together.

Removing output channel c of a Conv removes channel c from every tensor that carries it: the
BatchNormalization and activations after it, both sides of the residual Add it meets, and the
input columns of every layer that reads it. A *group* is that coupled set of (tensor, channel
axis) pairs, grown from one layer's output until it reaches, on every path, a layer that
reduces over the channels (a consumer) or a layer that makes them (a producer).

Channel ids. Each member tensor holds, per position along its channel axis, the id of the
group channel found there. Coupling two tensors (a residual Add) unites their ids position by
position (union-find), so the group's channels are the distinct roots and "remove channel k"
means "remove every position whose id has root k", in every member at once. This also covers:

- Concat along the channel axis: the output's ids are its inputs' ids side by side; inputs
  reached through the Concat get new ids, so the group's channel count is the output's.
- Flatten after a spatial tensor: channel c of [N, C, H, W] becomes features c·H·W ... c·H·W +
  H·W − 1, so the Flatten output repeats each channel's id H·W times (static H·W needed).

Rules, op by op:

- Conv and ConvTranspose (group 1), Gemm, MatMul with a 2-D constant weight: on the output a
  producer (weight rows and bias entries go), on the data input a consumer (weight input
  slices go).
- depthwise Conv (group = C_in = C_out): input and output coupled; its weight rows and bias
  entries go with the channel and its group count shrinks.
- unary elementwise ops (Relu, Clip, Sigmoid, Erf, Cast, Dropout, ...): input and output coupled.
- BatchNormalization, InstanceNormalization: coupled, per-channel parameters sliced.
- pooling, Pad of spatial axes, Resize/Upsample with channel scale 1: coupled.
- Add/Sub/Mul/Div/Max/Min/Sum/Mean/Pow/PRelu: inputs that carry the channels couple (a
  residual Add couples both branches' producers); a constant that carries them is sliced, one
  that broadcasts along them stays.
- Concat: along the channels, ids side by side; along another axis, inputs coupled.
- Flatten at the channel axis: each channel becomes a block of features.
- Slice, Split, Softmax along another axis: coupled.

Anything else that touches a member makes the whole group *unsafe*: a graph input or output,
Reshape or Transpose, Softmax/Slice/Split along the channels, a grouped Conv with
1 < group < C, an op of another domain, a reader inside an If/Loop/Scan body, a computed
weight. An unsafe group is reported with its reasons and never changed. Only the main graph
is grouped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.pruning.targets import weight_of
from polaris_opt.shape_info import TensorInfo, infer_tensor_info
from polaris_opt.surgery import (
    constant_value,
    consumers,
    is_graph_output,
    is_standard_domain,
    producer,
)

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that compute each element from the element at the same place alone.
UNARY_OPS = frozenset(
    "Relu Clip Sigmoid Tanh LeakyRelu HardSigmoid HardSwish Dropout Identity Cast Erf Gelu Elu Selu "
    "Celu Softplus Softsign Mish Neg Abs Sqrt Exp Log Reciprocal ThresholdedRelu Floor Ceil Round "
    "Sign Sin Cos".split()
)
POOL_OPS = frozenset("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
ELEMENTWISE_OPS = frozenset("Add Sub Mul Div Max Min Sum Mean Pow PRelu".split())
NORM_OPS = ("BatchNormalization", "InstanceNormalization")


@dataclass(eq=False)
class Member:
    """A tensor of the group: its channel axis (negative, counted from the last) and ids."""

    tensor: gs.Variable
    axis: int
    rank: int | None
    ids: np.ndarray
    # Filled when the group is finished: the group channel (0 .. count-1) at each position.
    channels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def absolute_axis(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis


@dataclass(eq=False)
class LayerUse:
    """A weight layer of the group. Its weight's `weight_axis` runs along `member`'s channels:
    output rows of a producer or depthwise Conv, input slices of a consumer."""

    node: gs.Node
    role: str  # "producer" | "consumer" | "depthwise"
    member: Member
    weight_axis: int


@dataclass(eq=False)
class ConstantSlice:
    """Constant input `index` of `node` keeps, along `axis`, the positions `member` keeps."""

    node: gs.Node
    index: int
    axis: int
    member: Member


@dataclass(eq=False)
class SizeEntry:
    """Entry `entry` of the 1-D constant input `index` of `node` (Resize sizes) is `member`'s count."""

    node: gs.Node
    index: int
    entry: int
    member: Member


@dataclass(eq=False)
class Group:
    """A set of coupled channel tensors, what rewriting them touches, and why it may be unsafe."""

    members: dict[str, Member] = field(default_factory=dict)
    layers: list[LayerUse] = field(default_factory=list)
    slices: list[ConstantSlice] = field(default_factory=list)
    sizes: list[SizeEntry] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    channel_count: int = 0

    @property
    def name(self) -> str:
        """The seed layer's name (its output's name when it has none)."""
        producers = self.nodes("producer")
        return _label(producers[0]) if producers else next(iter(self.members))

    @property
    def safe(self) -> bool:
        return not self.reasons

    def nodes(self, role: str) -> list[gs.Node]:
        return [use.node for use in self.layers if use.role == role]

    # Union-find over channel ids; the smaller id stays the root, so the seed layer's output
    # channels keep their own numbers as group channels.
    def fresh(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def finish(self) -> None:
        """Number the group channels 0..count-1 and give every member its channel per position."""
        roots = {name: np.array([self.find(i) for i in m.ids], np.int64) for name, m in self.members.items()}
        distinct = np.unique(np.concatenate(list(roots.values()))) if roots else np.zeros(0, np.int64)
        self.channel_count = len(distinct)
        for name, member in self.members.items():
            member.channels = np.searchsorted(distinct, roots[name])


def find_groups(graph: gs.Graph) -> list[Group]:
    """Every channel group of the main graph, safe or not, each seeded by a layer's output."""
    shapes = infer_tensor_info(graph)
    main_nodes = {id(node) for node in graph.nodes}
    covered: set[str] = set()
    groups = []
    for node in graph.nodes:
        layout = _seed_layout(node)
        if layout is None or node.outputs[0].name in covered:
            continue
        group = _Builder(graph, shapes, main_nodes).grow(node, *layout)
        covered.update(group.members)
        groups.append(group)
    return groups


def _seed_layout(node: gs.Node) -> tuple[int, int, int | None] | None:
    """(output channels, channel axis, output rank) of a layer that makes channels; None for
    other nodes. A MatMul's output rank is its input's, which shape inference may know."""
    if node.op not in LAYER_OPS or weight_of(node) is None or node.attrs.get("group", 1) != 1:
        return None
    weight = constant_value(node.inputs[1])
    rank = {"Conv": weight.ndim, "ConvTranspose": weight.ndim, "Gemm": 2}.get(node.op)
    return weight.shape[_producer_axis(node)], _output_axis(node, weight), rank


def _producer_axis(node: gs.Node) -> int:
    """The axis of a group-1 layer's weight that runs along its output channels."""
    if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)):
        return 0
    return 1  # ConvTranspose [C_in, O, k...], Gemm transB=0 and MatMul [K, N]


def _consumer_axis(node: gs.Node) -> int:
    """The axis of a group-1 layer's weight that runs along its input channels."""
    return 1 - _producer_axis(node)


def _output_axis(node: gs.Node, weight: np.ndarray) -> int:
    """Channel axis of the layer's output (and of its data input), counted from the last."""
    return 1 - weight.ndim if node.op in ("Conv", "ConvTranspose") else -1


def _is_depthwise(node: gs.Node, weight: np.ndarray) -> bool:
    # [C, 1, k...] with group = C: output channel c reads input channel c alone.
    group = node.attrs.get("group", 1)
    return node.op == "Conv" and group > 1 and weight.shape[0] == group and weight.shape[1] == 1


class _Builder:
    """Grows one group from a seed layer by visiting every node that touches a member."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, TensorInfo], main_nodes: set[int]):
        self.graph = graph
        self.shapes = shapes
        self.main_nodes = main_nodes
        self.group = Group()
        self.queue: deque[Member] = deque()
        self.recorded: set[tuple] = set()

    def grow(self, seed: gs.Node, count: int, axis: int, rank: int | None) -> Group:
        self.join(seed.outputs[0], axis, self.group.fresh(count), rank)
        while self.queue:
            self._expand(self.queue.popleft())
        self.group.reasons = list(dict.fromkeys(self.group.reasons))
        self.group.finish()
        return self.group

    # ------------------------------------------------------------------ members and records

    def join(self, tensor: gs.Tensor, axis: int, ids: np.ndarray, rank: int | None) -> Member | None:
        """Make `tensor` a member with `ids` along `axis`; unite the ids if it already is one."""
        group = self.group
        if isinstance(tensor, gs.Constant):
            self.unsafe(f"constant '{tensor.name}' would need its channels removed")
            return None
        member = group.members.get(tensor.name)
        if member is not None:
            if member.axis != axis or member.size != len(ids):
                self.unsafe(f"'{tensor.name}' is reached with two different channel layouts")
            else:
                group.unite(member.ids, ids)
            return member
        dims = self.dims(tensor)
        if dims is not None:
            rank = len(dims)
            if rank < -axis or dims[axis] not in (None, len(ids)):
                self.unsafe(f"'{tensor.name}' has shape {list(dims)}, not {len(ids)} channels")
                return None
        member = Member(tensor, axis, rank, np.asarray(ids, np.int64))
        group.members[tensor.name] = member
        self.queue.append(member)
        return member

    def like(self, tensor: gs.Tensor, member: Member) -> Member | None:
        """Join `tensor` with the same layout as `member` (an op that keeps the layout)."""
        return self.join(tensor, member.axis, member.ids, member.rank)

    def use(self, node: gs.Node, role: str, member: Member, weight_axis: int) -> None:
        if self.first(("layer", id(node), role)):
            self.group.layers.append(LayerUse(node, role, member, weight_axis))

    def slice(self, node: gs.Node, index: int, axis: int, member: Member) -> None:
        if self.first(("slice", id(node), index, axis)):
            self.group.slices.append(ConstantSlice(node, index, axis, member))

    def unsafe(self, reason: str) -> None:
        self.group.reasons.append(reason)

    def dims(self, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
        if isinstance(tensor, gs.Constant):
            value = constant_value(tensor)
            return None if value is None else value.shape
        info = self.shapes.get(tensor.name)
        return None if info is None else info.dims

    def first(self, key: tuple) -> bool:
        if key in self.recorded:
            return False
        self.recorded.add(key)
        return True

    # ------------------------------------------------------------------------ traversal

    def _expand(self, member: Member) -> None:
        tensor = member.tensor
        if is_graph_output(tensor, self.graph):
            self.unsafe(f"'{tensor.name}' is a graph output")
        source = producer(tensor)
        if source is None:
            self.unsafe(f"'{tensor.name}' is a graph input")
        else:
            self._visit(source, member)
        for node in consumers(tensor):
            self._visit(node, member)

    def _visit(self, node: gs.Node, member: Member) -> None:
        if id(node) not in self.main_nodes:
            self.unsafe(f"'{member.tensor.name}' is read inside an If/Loop/Scan body")
            return
        if not is_standard_domain(node):
            self.unsafe(f"{node.domain}.{node.op} '{_label(node)}' reads the channels")
            return
        rule = _rule_for(node.op)
        if rule is None:
            self.unsafe(f"{node.op} '{_label(node)}' is not known to keep channels apart")
            return
        rule(self, node, member)

    def data_only(self, node: gs.Node, member: Member) -> bool:
        """True when `member` is `node`'s data input or an output (not a parameter of it)."""
        if member.tensor is node.inputs[0] or any(member.tensor is t for t in node.outputs):
            return True
        self.unsafe(f"'{member.tensor.name}' is a parameter input of {node.op} '{_label(node)}'")
        return False

    def extra_outputs_used(self, node: gs.Node) -> bool:
        """True (and the group unsafe) when an output after the first is read (MaxPool indices)."""
        for tensor in node.outputs[1:]:
            if not tensor.is_empty() and (tensor.outputs or is_graph_output(tensor, self.graph)):
                self.unsafe(f"output '{tensor.name}' of {node.op} '{_label(node)}' is used")
                return True
        return False

    def channel_axis(self, node: gs.Node, member: Member) -> int | None:
        """The member's absolute channel axis; None (and unsafe) when its rank is unknown."""
        if member.absolute_axis is None:
            self.unsafe(f"the rank of '{member.tensor.name}' at {node.op} '{_label(node)}' is unknown")
        return member.absolute_axis


# -------------------------------------------------------------------------------- rules


def _unary(b: _Builder, node: gs.Node, member: Member) -> None:
    if b.data_only(node, member) and not b.extra_outputs_used(node):
        b.like(node.inputs[0], member)
        b.like(node.outputs[0], member)


def _spatial(b: _Builder, node: gs.Node, member: Member) -> None:
    # Pooling and normalization treat axis 1 as the channels: the member's axis must be it.
    if b.channel_axis(node, member) not in (None, 1):
        b.unsafe(f"{node.op} '{_label(node)}' takes axis 1 as channels, not axis {member.absolute_axis}")
        return
    if member.absolute_axis == 1:
        _unary(b, node, member)


def _norm(b: _Builder, node: gs.Node, member: Member) -> None:
    if node.attrs.get("training_mode", 0):
        b.unsafe(f"{node.op} '{_label(node)}' runs in training mode")
        return
    _spatial(b, node, member)
    out = b.group.members.get(node.outputs[0].name)
    if out is None:
        return
    for index in range(1, len(node.inputs)):
        value = constant_value(node.inputs[index])
        if value is None or value.shape != (out.size,):
            b.unsafe(
                f"parameter '{node.inputs[index].name}' of {node.op} '{_label(node)}' is not per channel"
            )
        else:
            b.slice(node, index, 0, out)


def _elementwise(b: _Builder, node: gs.Node, member: Member) -> None:
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
            b.unsafe(f"the shape of '{tensor.name}' at {node.op} '{_label(node)}' is unknown")
            continue
        ranks.append(len(dims))
        dim = dims[axis] if len(dims) >= -axis else 1
        if dim == size:
            if isinstance(tensor, gs.Constant):
                constants.append(index)
            else:
                coupled.append((tensor, len(dims)))
        elif dim != 1:
            b.unsafe(f"'{tensor.name}' has {dim} entries along the channels of {node.op} '{_label(node)}'")
    out_rank = None if None in ranks or member.tensor is node.outputs[0] else max(ranks)
    out = b.join(node.outputs[0], axis, member.ids, out_rank)
    for tensor, rank in coupled:
        b.join(tensor, axis, member.ids, rank)
    for index in constants:
        if out is not None:
            b.slice(node, index, axis, out)


def _concat(b: _Builder, node: gs.Node, member: Member) -> None:
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
        b.unsafe(f"Concat '{_label(node)}' joins constant '{tensor.name}' along the channels")
        return None
    known = b.group.members.get(tensor.name)
    if known is not None:
        return known.ids
    dims = b.dims(tensor)
    count = dims[member.axis] if dims is not None and len(dims) >= -member.axis else None
    if count is None:
        b.unsafe(f"the channel count of '{tensor.name}' at Concat '{_label(node)}' is unknown")
        return None
    if out_member is not None and offset + count <= out_member.size:
        return out_member.ids[offset : offset + count]
    return b.group.fresh(count)


def _flatten(b: _Builder, node: gs.Node, member: Member) -> None:
    source, out = node.inputs[0], node.outputs[0]
    dims = b.dims(source)
    if dims is None:
        b.unsafe(f"the shape of '{source.name}' before Flatten '{_label(node)}' is unknown")
        return
    rank = len(dims)
    axis = node.attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    trailing = dims[axis + 1 :]
    expected = (axis - rank) if member.tensor is source else -1
    if member.axis != expected or axis >= rank or any(d is None for d in trailing):
        b.unsafe(f"Flatten '{_label(node)}' mixes the channels with other axes or has dynamic sizes")
        return
    known = b.group.members.get(source.name)
    ids = known.ids if known is not None else (b.group.fresh(dims[axis]) if dims[axis] else None)
    if ids is None:
        b.unsafe(f"the channel count of '{source.name}' is unknown")
        return
    b.join(source, axis - rank, ids, rank)
    b.join(out, -1, np.repeat(ids, int(np.prod(trailing, dtype=np.int64))), 2)


def _pad(b: _Builder, node: gs.Node, member: Member) -> None:
    channel_axis = b.channel_axis(node, member)
    if channel_axis is None or not b.data_only(node, member):
        return
    if len(node.inputs) > 1:
        pads = constant_value(node.inputs[1])
        axes = _optional_constant(node, 3)
    else:
        pads, axes = np.asarray(node.attrs.get("pads", [])), None
    if pads is None or (axes is None and len(node.inputs) > 3 and not node.inputs[3].is_empty()):
        b.unsafe(f"the pads of Pad '{_label(node)}' are computed")
        return
    entry = _entry(axes, channel_axis, member.rank)
    half = len(pads) // 2
    if entry is not None and (pads[entry] != 0 or pads[entry + half] != 0):
        b.unsafe(f"Pad '{_label(node)}' pads the channel axis")
        return
    _unary(b, node, member)


def _resize(b: _Builder, node: gs.Node, member: Member) -> None:
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
        b.unsafe(f"the scales or sizes of {node.op} '{_label(node)}' are computed")
        return
    if entry is not None and scales is not None and scales.size and scales[entry] != 1:
        b.unsafe(f"{node.op} '{_label(node)}' scales the channel axis")
        return
    _unary(b, node, member)
    out = b.group.members.get(node.outputs[0].name)
    if entry is None or sizes is None or not sizes.size or out is None:
        return
    if sizes[entry] != out.size:
        b.unsafe(f"{node.op} '{_label(node)}' resizes the channel axis")
    elif b.first(("size", id(node))):
        b.group.sizes.append(SizeEntry(node, 3, entry, out))


def _along_other_axis(b: _Builder, node: gs.Node, member: Member) -> None:
    """Softmax, Slice and Split keep channels apart unless they work along the channel axis."""
    channel_axis = b.channel_axis(node, member)
    if channel_axis is None or not b.data_only(node, member):
        return
    axes = _working_axes(b, node, member.rank)
    if axes is None:
        b.unsafe(f"the axes of {node.op} '{_label(node)}' are computed")
    elif channel_axis in axes:
        b.unsafe(f"{node.op} '{_label(node)}' works along the channel axis")
    else:
        b.like(node.inputs[0], member)
        for tensor in node.outputs:
            b.like(tensor, member)


def _working_axes(b: _Builder, node: gs.Node, rank: int) -> set[int] | None:
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


def _layer(b: _Builder, node: gs.Node, member: Member) -> None:
    weight = constant_value(node.inputs[1]) if weight_of(node) is not None else None
    if member.tensor is node.outputs[0]:
        role = "producer"
    elif member.tensor is node.inputs[0]:
        role = "consumer"
    else:
        b.unsafe(f"'{member.tensor.name}' is the weight input of {node.op} '{_label(node)}'")
        return
    if weight is None:
        b.unsafe(f"{node.op} '{_label(node)}' has no constant float weight")
        return
    if member.axis != _output_axis(node, weight):
        b.unsafe(f"{node.op} '{_label(node)}' reads its channels along another axis")
        return
    if _is_depthwise(node, weight):
        _depthwise(b, node, member, weight)
        return
    if node.attrs.get("group", 1) != 1:
        b.unsafe(
            f"grouped {node.op} '{_label(node)}' (group={node.attrs['group']}) couples channels in blocks"
        )
        return
    if role == "consumer" and node.op == "Gemm" and node.attrs.get("transA", 0):
        b.unsafe(f"Gemm '{_label(node)}' reads its input transposed")
        return
    axis = _producer_axis(node) if role == "producer" else _consumer_axis(node)
    if weight.shape[axis] != member.size:
        b.unsafe(f"the weight of {node.op} '{_label(node)}' does not match {member.size} channels")
        return
    b.use(node, role, member, axis)
    b.slice(node, 1, axis, member)
    if role == "producer":
        _producer_bias(b, node, member)


def _producer_bias(b: _Builder, node: gs.Node, member: Member) -> None:
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return
    bias = constant_value(node.inputs[2])
    if bias is None:
        b.unsafe(f"the bias of {node.op} '{_label(node)}' is computed")
    elif node.op != "Gemm":
        b.slice(node, 2, 0, member)
    elif bias.ndim and bias.shape[-1] == member.size:
        b.slice(node, 2, -1, member)
    elif bias.ndim and bias.shape[-1] != 1:
        b.unsafe(f"the bias of Gemm '{_label(node)}' does not broadcast per channel")


def _depthwise(b: _Builder, node: gs.Node, member: Member, weight: np.ndarray) -> None:
    if weight.shape[0] != member.size:
        b.unsafe(f"depthwise {node.op} '{_label(node)}' does not match {member.size} channels")
        return
    b.like(node.inputs[0], member)
    out = b.like(node.outputs[0], member)
    if out is None:
        return
    b.use(node, "depthwise", out, 0)
    b.slice(node, 1, 0, out)
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        if constant_value(node.inputs[2]) is None:
            b.unsafe(f"the bias of {node.op} '{_label(node)}' is computed")
        else:
            b.slice(node, 2, 0, out)


# ---------------------------------------------------------------------------- helpers


def _label(node: gs.Node) -> str:
    """How a reason names a node: its name, or its first output's when it has none."""
    return node.name or (node.outputs[0].name if node.outputs else node.op)


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


Rule = Callable[[_Builder, gs.Node, Member], None]
_RULES: dict[str, Rule] = {
    **{op: _layer for op in LAYER_OPS},
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


def _rule_for(op: str) -> Rule | None:
    return _RULES.get(op)
