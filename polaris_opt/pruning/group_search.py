"""Finding channel groups: seed one at each weight layer's output, grow it to the layers bounding it.

find_groups seeds one group per weight layer that makes channels and GroupBuilder grows it:
every node that produces or reads a member is visited and its rule adds the tensors it couples,
the weight layers and constants a rewrite touches, or a reason the group is unsafe. The rule
for weight layers lives here, next to the seeding that shares its weight axes; the rules for
the ops between layers are in polaris_opt.pruning.group_coupling.

- Conv and ConvTranspose (group 1), Gemm, MatMul with a 2-D constant weight: on the output a
  producer (weight rows and bias entries go), on the data input a consumer (weight input
  slices go).
- depthwise Conv (group = C_in = C_out): input and output coupled; its weight rows and bias
  entries go with the channel and its group count shrinks.

Anything else that touches a member makes the whole group *unsafe*: a graph input or output,
Reshape or Transpose, Softmax/Slice/Split along the channels, a grouped Conv with
1 < group < C, an op of another domain, a reader inside an If/Loop/Scan body, a computed
weight. An unsafe group is reported with its reasons and never changed. Only the main graph
is grouped.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.pruning.group_coupling import COUPLING_RULES, Rule
from polaris_opt.pruning.groups import ConstantSlice, Group, LayerUse, Member, node_label
from polaris_opt.pruning.targets import PRUNABLE_OPS, weight_of
from polaris_opt.shape_info import TensorInfo, infer_tensor_info
from polaris_opt.surgery import constant_value, consumers, is_graph_output, is_standard_domain, producer

LAYER_OPS = PRUNABLE_OPS  # the weighted layers whose channels a group can couple


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
        group = GroupBuilder(graph, shapes, main_nodes).grow(node, *layout)
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


class GroupBuilder:
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
            self.unsafe(f"{node.domain}.{node.op} '{node_label(node)}' reads the channels")
            return
        rule = _rule_for(node.op)
        if rule is None:
            self.unsafe(f"{node.op} '{node_label(node)}' is not known to keep channels apart")
            return
        rule(self, node, member)

    def data_only(self, node: gs.Node, member: Member) -> bool:
        """True when `member` is `node`'s data input or an output (not a parameter of it)."""
        if member.tensor is node.inputs[0] or any(member.tensor is t for t in node.outputs):
            return True
        self.unsafe(f"'{member.tensor.name}' is a parameter input of {node.op} '{node_label(node)}'")
        return False

    def extra_outputs_used(self, node: gs.Node) -> bool:
        """True (and the group unsafe) when an output after the first is read (MaxPool indices)."""
        for tensor in node.outputs[1:]:
            if not tensor.is_empty() and (tensor.outputs or is_graph_output(tensor, self.graph)):
                self.unsafe(f"output '{tensor.name}' of {node.op} '{node_label(node)}' is used")
                return True
        return False

    def channel_axis(self, node: gs.Node, member: Member) -> int | None:
        """The member's absolute channel axis; None (and unsafe) when its rank is unknown."""
        if member.absolute_axis is None:
            self.unsafe(f"the rank of '{member.tensor.name}' at {node.op} '{node_label(node)}' is unknown")
        return member.absolute_axis


# -------------------------------------------------------------------------- layer rule


def _layer(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    weight = constant_value(node.inputs[1]) if weight_of(node) is not None else None
    if member.tensor is node.outputs[0]:
        role = "producer"
    elif member.tensor is node.inputs[0]:
        role = "consumer"
    else:
        b.unsafe(f"'{member.tensor.name}' is the weight input of {node.op} '{node_label(node)}'")
        return
    if weight is None:
        b.unsafe(f"{node.op} '{node_label(node)}' has no constant float weight")
        return
    if member.axis != _output_axis(node, weight):
        b.unsafe(f"{node.op} '{node_label(node)}' reads its channels along another axis")
        return
    if _is_depthwise(node, weight):
        _depthwise(b, node, member, weight)
        return
    if node.attrs.get("group", 1) != 1:
        b.unsafe(
            f"grouped {node.op} '{node_label(node)}' (group={node.attrs['group']}) couples channels in blocks"
        )
        return
    if role == "consumer" and node.op == "Gemm" and node.attrs.get("transA", 0):
        b.unsafe(f"Gemm '{node_label(node)}' reads its input transposed")
        return
    axis = _producer_axis(node) if role == "producer" else _consumer_axis(node)
    if weight.shape[axis] != member.size:
        b.unsafe(f"the weight of {node.op} '{node_label(node)}' does not match {member.size} channels")
        return
    b.use(node, role, member, axis)
    b.slice(node, 1, axis, member)
    if role == "producer":
        _producer_bias(b, node, member)


def _producer_bias(b: GroupBuilder, node: gs.Node, member: Member) -> None:
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return
    bias = constant_value(node.inputs[2])
    if bias is None:
        b.unsafe(f"the bias of {node.op} '{node_label(node)}' is computed")
    elif node.op != "Gemm":
        b.slice(node, 2, 0, member)
    elif bias.ndim and bias.shape[-1] == member.size:
        b.slice(node, 2, -1, member)
    elif bias.ndim and bias.shape[-1] != 1:
        b.unsafe(f"the bias of Gemm '{node_label(node)}' does not broadcast per channel")


def _depthwise(b: GroupBuilder, node: gs.Node, member: Member, weight: np.ndarray) -> None:
    if weight.shape[0] != member.size:
        b.unsafe(f"depthwise {node.op} '{node_label(node)}' does not match {member.size} channels")
        return
    b.like(node.inputs[0], member)
    out = b.like(node.outputs[0], member)
    if out is None:
        return
    b.use(node, "depthwise", out, 0)
    b.slice(node, 1, 0, out)
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        if constant_value(node.inputs[2]) is None:
            b.unsafe(f"the bias of {node.op} '{node_label(node)}' is computed")
        else:
            b.slice(node, 2, 0, out)


# Weight layers start and end groups; every other op a group may cross couples channels through it.
_RULES: dict[str, Rule] = {**{op: _layer for op in LAYER_OPS}, **COUPLING_RULES}


def _rule_for(op: str) -> Rule | None:
    return _RULES.get(op)
