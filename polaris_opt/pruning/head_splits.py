"""Matching one head split of an attention block (the whole block: pruning/attention_blocks.py).

Q, K and V are each a projection X·W (+b) with W constant [D, H·dh], then a Reshape to
[a, b, H, dh] and the Transposes that bring the heads forward; a scaling by a constant scalar may
sit before the split or on the heads, since it is the same for every head. A Reshape shape is a
constant, or a Concat whose head entries are constants and whose other entries are computed at
run time (torch's `x.view(x.size(0), x.size(1), H, dh)`); there the head count is proved from the
constant piece. Each head count and merge width is recorded as a ShapeEntry, the spot that head
removal later rewrites.

Also here, because block matching uses them too: NotPrunable, the reason a match fails, and the
small graph-walking helpers (the one reader of a tensor, Transpose permutations, the cleanup hint).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from polaris_opt.pruning.targets import FLOAT_TYPES
from polaris_opt.surgery import constant_value, consumers, is_graph_output, is_standard_domain, producer


class NotPrunable(Exception):
    """A Softmax that looked like attention does not match the block pattern; the message says why."""


@dataclass
class ShapeEntry:
    """One entry of a Reshape's target shape held in a constant: element `position` of
    `holder.inputs[index]`, where holder is the Reshape itself or the Concat that builds its shape."""

    holder: gs.Node
    index: int
    position: int

    @property
    def tensor(self) -> gs.Constant:
        return self.holder.inputs[self.index]


@dataclass
class HeadSplit:
    """One of Q, K, V: the projection X·W (+b), and the Reshape that splits its columns into heads."""

    matmul: gs.Node
    bias_add: gs.Node | None  # its other input is a constant bias
    reshape: gs.Node
    head_count: ShapeEntry  # the H entry of the Reshape shape
    nodes: list[gs.Node]  # projection MatMul to the last Transpose, in data order

    @property
    def bias_index(self) -> int:
        return 1 if self.bias_add.inputs[0] is self.matmul.outputs[0] else 0


def only_reader(tensor: gs.Tensor, graph: gs.Graph, what: str) -> gs.Node:
    """The one node that reads `tensor`; NotPrunable when others read it or the graph outputs it."""
    if is_graph_output(tensor, graph):
        raise NotPrunable(f"{what} '{tensor.name}' is also a graph output")
    readers = consumers(tensor)
    if len(readers) != 1:
        names = ", ".join(f"'{n.name}'" for n in readers)
        raise NotPrunable(f"{what} '{tensor.name}' is read by {len(readers)} nodes ({names})")
    return readers[0]


def perm_of(transpose: gs.Node) -> tuple[int, ...]:
    """The axes permutation of a 4-D Transpose."""
    return tuple(transpose.attrs.get("perm", (3, 2, 1, 0)))  # default: reverse the 4 axes


def compose(first: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation of Transpose(Transpose(x, first), then)."""
    if len(then) != len(first):
        raise NotPrunable(f"a head Transpose has {len(then)} axes, not 4")
    return tuple(first[axis] for axis in then)


def cleanup_hint(tensor: gs.Tensor) -> str:
    """A hint for a NotPrunable message when a Constant node computes `tensor`, else ''."""
    # Values in Constant nodes become initializers in cleanup (lift-constants); until then they
    # are computed tensors here, like any other.
    node = producer(tensor)
    return " (a Constant node: run cleanup first)" if node is not None and node.op == "Constant" else ""


def match_same_split(
    tensor: gs.Tensor, perm: tuple[int, ...], role: str, graph: gs.Graph, heads: int, head_dim: int
) -> HeadSplit:
    """The HeadSplit for K or V, which must have the heads and head size that Q has."""
    split, h, dh = match_split(tensor, perm, role, graph)
    if (h, dh) != (heads, head_dim):
        raise NotPrunable(f"{role} has {h} heads of {dh}, Q has {heads} of {head_dim}")
    return split


def match_split(
    tensor: gs.Tensor, perm: tuple[int, ...], role: str, graph: gs.Graph
) -> tuple[HeadSplit, int, int]:
    """(HeadSplit, H, dh) for the Q, K or V operand `tensor` of an attention MatMul."""
    after, reshape = _step_back(tensor, transposes=True)
    transposes = [node for node in after if node.op == "Transpose"]
    if reshape is None or reshape.op != "Reshape" or not transposes:
        raise NotPrunable(f"{role} is not a Reshape into heads followed by a Transpose")
    composed = (0, 1, 2, 3)
    for transpose in transposes:
        composed = compose(composed, perm_of(transpose))
    if composed != perm:
        raise NotPrunable(f"{role} is transposed by {list(composed)}, expected {list(perm)}")
    heads, head_dim, head_count = _split_shape(reshape, role)
    before, last = _step_back(reshape.inputs[0], transposes=False)
    projection = _match_projection(last, heads * head_dim, role)
    nodes = [*projection, *before, reshape, *after]
    for node in nodes:
        only_reader(node.outputs[0], graph, f"{role} tensor")
    bias_add = projection[1] if len(projection) == 2 else None
    split = HeadSplit(projection[0], bias_add, reshape, head_count, nodes)
    return split, heads, head_dim


def _step_back(tensor: gs.Tensor, transposes: bool) -> tuple[list[gs.Node], gs.Node | None]:
    """Walk back from `tensor` over scalings by a constant scalar (head-agnostic, like the √dh
    that SDPA exports put on Q and K) and, when `transposes`, Transposes: (the nodes walked, in
    data order; the node where the walk stopped, or None at a graph input)."""
    walked, node = [], producer(tensor)
    while node is not None and is_standard_domain(node):
        if transposes and node.op == "Transpose":
            source = node.inputs[0]
        else:
            source = _scaled_input(node)
            if source is None:
                break
        walked.insert(0, node)
        node = producer(source)
    return walked, node


def _scaled_input(node: gs.Node) -> gs.Tensor | None:
    """The activation that `node` multiplies or divides by a constant scalar; None for other nodes."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    candidates = [(0, 1)] if node.op == "Div" else [(0, 1), (1, 0)]
    for data, factor in candidates:
        value = constant_value(node.inputs[factor])
        if value is not None and value.size == 1 and constant_value(node.inputs[data]) is None:
            return node.inputs[data]
    return None


def _match_projection(last: gs.Node | None, width: int, role: str) -> list[gs.Node]:
    """[MatMul] or [MatMul, bias Add] computing X·W (+b) with W constant [D, width]; `last` is the
    node that computes what the head split reads."""
    node, nodes = last, []
    if node is not None and node.op == "Add" and is_standard_domain(node):
        bias = next((t for t in node.inputs if constant_value(t) is not None), None)
        if bias is None:
            raise NotPrunable(f"the {role} projection Add '{node.name}' adds no constant bias")
        size, last = bias.values.size, (bias.shape[-1] if bias.shape else 1)
        if size != 1 and (size != width or last != width):
            raise NotPrunable(f"the {role} bias '{bias.name}' has shape {list(bias.shape)}, not [{width}]")
        nodes, node = [node], producer(next(t for t in node.inputs if t is not bias))
    if node is None or node.op != "MatMul" or not is_standard_domain(node):
        raise NotPrunable(f"the {role} projection is not a MatMul with a constant weight")
    weight = constant_value(node.inputs[1])
    if weight is None or weight.dtype.type not in FLOAT_TYPES or weight.ndim != 2:
        hint = cleanup_hint(node.inputs[1])
        raise NotPrunable(f"the {role} projection '{node.name}' has no constant 2-D float weight{hint}")
    if weight.shape[1] != width:
        raise NotPrunable(f"the {role} weight has {weight.shape[1]} columns, the heads need {width}")
    return [node, *nodes]


def _split_shape(reshape: gs.Node, role: str) -> tuple[int, int, ShapeEntry]:
    """H, dh and where H lives, for a Reshape to [a, b, H, dh]."""
    entries = _shape_entries(reshape)
    if len(entries) != 4:
        raise NotPrunable(f"{role} Reshape '{reshape.name}' makes rank {len(entries)}, not [B, S, H, dh]")
    (heads, head_count), (head_dim, _) = entries[2], entries[3]
    if heads is None or head_dim is None:
        raise NotPrunable(f"the head count of {role} Reshape '{reshape.name}' is computed at run time")
    if heads <= 0 or head_dim <= 0:
        raise NotPrunable(f"{role} Reshape '{reshape.name}' has heads {heads}, head size {head_dim}")
    return heads, head_dim, head_count


def merge_width(reshape: gs.Node, width: int) -> ShapeEntry | None:
    """Where the merge Reshape's H·dh lives; None for a last entry -1, which follows H by itself
    (the output projection proves it is H·dh, and the other entries do not depend on H)."""
    entries = _shape_entries(reshape)
    values = [value for value, _ in entries]
    if any(value == 0 for value in values[2:]):
        raise NotPrunable(f"merge Reshape '{reshape.name}' copies a head axis (shape {values})")
    if values[-1] is None:
        raise NotPrunable(f"the width of merge Reshape '{reshape.name}' is computed at run time")
    if values[-1] == -1:
        return None
    if values[-1] != width:
        raise NotPrunable(f"merge Reshape '{reshape.name}' shape {values} does not end in H·dh = {width}")
    return entries[-1][1]


def _shape_entries(reshape: gs.Node) -> list[tuple[int | None, ShapeEntry | None]]:
    """The target shape of `reshape` entry by entry: (value, where it lives), or (None, None) for
    an entry computed at run time."""
    if reshape.attrs.get("allowzero", 0):
        raise NotPrunable(f"Reshape '{reshape.name}' has allowzero=1")
    values = constant_value(reshape.inputs[1])
    if values is not None:
        return [(int(v), ShapeEntry(reshape, 1, i)) for i, v in enumerate(values.reshape(-1))]
    concat = producer(reshape.inputs[1])
    if concat is None or concat.op != "Concat" or concat.attrs.get("axis") not in (0, -1):
        hint = cleanup_hint(reshape.inputs[1])
        raise NotPrunable(f"the shape of Reshape '{reshape.name}' is neither a constant nor a Concat{hint}")
    entries = []
    for index, piece in enumerate(concat.inputs):
        values = constant_value(piece)
        if values is not None:
            entries += [(int(v), ShapeEntry(concat, index, i)) for i, v in enumerate(values.reshape(-1))]
        elif piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
            entries += [(None, None)] * piece.shape[0]
        else:
            raise NotPrunable(f"cannot tell the length of '{piece.name}' in the shape of '{reshape.name}'")
    return entries
