"""Structured pruning of attention heads: find multi-head attention blocks, score their heads,
and remove the weakest heads physically (smaller Q/K/V/output projections, fewer heads).

The block recognised, in the main graph (If/Loop bodies are left alone), is what torch.onnx and
most hand-written exports emit, with H heads of size dh:

    q = Transpose(Reshape(X·Wq (+bq), [a, b, H, dh]))        perm [0,2,1,3]  -> [B, H, S, dh]
    k = Transpose(Reshape(X·Wk (+bk), [a, b, H, dh]))        perm [0,2,3,1]  -> [B, H, dh, S]
    v = Transpose(Reshape(X·Wv (+bv), [a, b, H, dh]))        perm [0,2,1,3]  -> [B, H, S, dh]
    p = Softmax(q·k  [÷ or × a constant scalar]  [+ a mask without a head axis], axis=-1)
    y = Reshape(Transpose(p·v, perm [0,2,1,3]), [.., .., H·dh]) · Wo

Wq, Wk, Wv are constant [D, H·dh] and Wo constant [H·dh, D_out]; the biases are optional. A chain
of Transposes counts as one when their permutations compose to the one required (torch's
`k.transpose(-2, -1)` after the head split). A scaling by a constant scalar may also sit on the
Q, K, V paths, before the split or on the heads (SDPA exports scale Q and K by dh^-¼ each): it
is the same for every head. `a` and `b` may be 0 (copy a dim), -1 or literals; the merge shape
may end in -1.
A Reshape shape is a constant, or a Concat whose head entries are constants and whose other
entries are computed at run time (torch's `x.view(x.size(0), x.size(1), H, dh)`); there the head
count is proved from the constant piece. Anything else is skipped with the reason: a per-head
tensor read by another node or also a graph output, a head count computed at run time, a mask
with a head axis, a Softmax over another axis. Skipping never changes the block.

Removing heads slices the removed heads' columns out of Wq, Wk, Wv and their biases and their
rows out of Wo, and rewrites the head entries of the Reshape shapes (H → H', H·dh → H'·dh). The
scale stays √dh, and the block's output keeps its name and shape. A constant that nodes outside
the rewrite also read is not edited: those readers keep it and the block gets a fresh copy.

Importance of head h (higher = kept):

- l1 / l2: for each of the four matrices M ∈ {Wq, Wk, Wv, Wo}, n_M(h) = the l1 norm (sum of
  |w|) or the l2 (Frobenius) norm of head h's part of M (its dh columns of Wq/Wk/Wv, its dh rows
  of Wo), divided by the mean of n_M over the block's heads, so that matrices of different
  scales weigh alike; score(h) = n_Wq(h) + n_Wk(h) + n_Wv(h) + n_Wo(h). Biases do not count.
- taylor: data-driven, on the calibration data: the mean energy E‖ctx_h · Wo_h‖² over tokens of
  head h's contribution to the output projection, where ctx_h [dh] is head h's slice of the
  context the merge Reshape reads, captured on the dense model. It is accumulated as the Gram
  matrix Σ ctx_hᵀ ctx_h [dh, dh] per head, so memory does not grow with the data:
  E‖ctx_h Wo_h‖² = Σ (Gram_h ⊙ Wo_h Wo_hᵀ) / tokens. This is exactly the squared change of the
  output projection when head h is removed; a Taylor criterion estimates the change of the loss
  through a gradient instead, which an inference graph has no way to give (the name is the CLI's).

round(sparsity · H) heads are removed per block, at most H - 1; the lowest scores go first, the
lower head index first among equal scores.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.capture import stream_tensors
from polaris_opt.errors import BadInput
from polaris_opt.passes_api import PassContext
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    is_graph_output,
    is_standard_domain,
    producer,
)

IMPORTANCES = ("l1", "l2", "taylor")
Q_PERM, K_PERM, V_PERM, MERGE_PERM = (0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3), (0, 2, 1, 3)
FLOAT_TYPES = (np.float16, np.float32, np.float64)
# Scalings and mask Adds looked through between the score MatMul and the Softmax: the depth
# bound keeps a Softmax after a long chain of residual Adds from being walked all the way back.
MAX_SCORE_OPS = 4


class NotPrunable(Exception):
    """A Softmax that looked like attention does not match the block pattern; the message says why."""


# ------------------------------------------------------------------------------------ the block


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


@dataclass
class AttentionBlock:
    """A matched multi-head attention block, ready to lose heads."""

    name: str
    heads: int
    head_dim: int
    splits: tuple[HeadSplit, HeadSplit, HeadSplit]  # q, k, v
    core: list[gs.Node]  # score MatMul to the merge Reshape, in data order
    out: gs.Node  # the output projection MatMul
    merged_width: ShapeEntry | None  # the H·dh entry of the merge Reshape; None when it is -1

    @property
    def context(self) -> gs.Tensor:
        """[B, S, H, dh]: the context the merge Reshape reads (what taylor importance captures)."""
        return self.core[-1].inputs[0]

    @property
    def nodes(self) -> list[gs.Node]:
        return [n for split in self.splits for n in split.nodes] + self.core + [self.out]

    @property
    def layers(self) -> list[gs.Node]:
        return [split.matmul for split in self.splits] + [self.out]

    def weights(self) -> list[np.ndarray]:
        """Wq, Wk, Wv, Wo as they are now."""
        return [constant_value(node.inputs[1]) for node in self.layers]

    def params(self) -> int:
        """Elements of what head removal resizes: the four weights and the Q/K/V biases."""
        biases = [s.bias_add.inputs[s.bias_index] for s in self.splits if s.bias_add is not None]
        return sum(w.size for w in self.weights()) + sum(int(np.prod(b.shape)) for b in biases)


# ------------------------------------------------------------------------------------ matching


def find_attention_blocks(
    graph: gs.Graph, exclude: Sequence[str] = ()
) -> tuple[list[AttentionBlock], list[dict[str, str]]]:
    """The attention blocks of the main graph that are safe to prune, and the skipped ones with why.

    A Softmax whose input does not come from a MatMul of two activations is not attention and is
    not reported.
    """
    patterns = [p for p in exclude if p]
    blocks, skipped = [], []
    for node in list(graph.nodes):
        if node.op != "Softmax" or not is_standard_domain(node):
            continue
        found = _scores_of(node.inputs[0])
        if found is None:
            continue
        score_matmul, between = found
        name = _block_name([score_matmul, node], node)
        try:
            block = _match_block(graph, score_matmul, between, node, name)
        except NotPrunable as reason:
            skipped.append({"name": name, "reason": str(reason)})
            continue
        if _is_excluded(block, patterns):
            skipped.append({"name": name, "reason": "excluded"})
        else:
            blocks.append(block)
    return blocks, skipped


def _scores_of(tensor: gs.Tensor, depth: int = MAX_SCORE_OPS) -> tuple[gs.Node, list[gs.Node]] | None:
    """Walk back from a Softmax input through at most `depth` Div/Mul/Add to a MatMul of two
    activations: (that MatMul, the nodes in between in data order), or None when there is none."""
    node = producer(tensor)
    if node is None or not is_standard_domain(node):
        return None
    if node.op == "MatMul":
        both_computed = all(constant_value(t) is None for t in node.inputs)
        return (node, []) if both_computed else None
    if node.op not in ("Div", "Mul", "Add") or depth == 0:
        return None
    # `scores + mask` is the usual order; try the other input too, for `mask + scores`.
    inputs = node.inputs[:1] if node.op == "Div" else node.inputs
    for source in inputs:
        found = _scores_of(source, depth - 1)
        if found is not None:
            return found[0], [*found[1], node]
    return None


def _match_block(
    graph: gs.Graph, score: gs.Node, between: list[gs.Node], softmax: gs.Node, name: str
) -> AttentionBlock:
    _check_softmax_axis(softmax, graph.opset)
    for node, previous in zip(between, [score, *between], strict=False):
        _check_score_op(node, previous.outputs[0])
    context_matmul = _only_reader(softmax.outputs[0], graph, "attention probabilities")
    if context_matmul.op != "MatMul" or context_matmul.inputs[0] is not softmax.outputs[0]:
        raise NotPrunable("the attention probabilities do not multiply V")
    merge_transposes, perm = _transposes_after(context_matmul.outputs[0], graph)
    if perm != MERGE_PERM:
        raise NotPrunable(f"the context is transposed by {list(perm)}, not back to [B, S, H, dh]")
    merge = _only_reader(merge_transposes[-1].outputs[0], graph, "context")
    if merge.op != "Reshape":
        raise NotPrunable(f"the context is read by a {merge.op}, not by the Reshape that merges heads")
    q, heads, head_dim = _match_split(score.inputs[0], Q_PERM, "Q", graph)
    k = _match_same_split(score.inputs[1], K_PERM, "K", graph, heads, head_dim)
    v = _match_same_split(context_matmul.inputs[1], V_PERM, "V", graph, heads, head_dim)
    merged_width = _merge_width(merge, heads * head_dim)
    out = _only_reader(merge.outputs[0], graph, "merged context")
    _check_output_projection(out, merge.outputs[0], heads * head_dim)
    _check_shape_holders([q, k, v], merge, merged_width)
    core = [score, *between, softmax, context_matmul, *merge_transposes, merge]
    for node in core[:-1]:
        _only_reader(node.outputs[0], graph, "per-head tensor")
    return AttentionBlock(name, heads, head_dim, (q, k, v), core, out, merged_width)


def _check_softmax_axis(softmax: gs.Node, opset: int) -> None:
    # Before opset 13 the default axis 1 flattens [H, S, S] together, mixing the heads.
    axis = softmax.attrs.get("axis", -1 if opset >= 13 else 1)
    if axis not in (-1, 3):
        raise NotPrunable(f"Softmax '{softmax.name}' normalizes axis {axis}, not the last one")


def _check_score_op(node: gs.Node, scores: gs.Tensor) -> None:
    """A scaling by a constant scalar, or the Add of a mask that broadcasts over the heads."""
    other = next((t for t in node.inputs if t is not scores), None)
    if other is None:
        raise NotPrunable(f"'{node.name}' combines the scores with themselves")
    if node.op in ("Div", "Mul"):
        value = constant_value(other)
        if value is None or value.size != 1:
            hint = _cleanup_hint(other)
            raise NotPrunable(
                f"the scores are scaled by '{other.name}', which is not a constant scalar{hint}"
            )
        return
    shape = other.shape
    if shape is None or len(shape) > 4:
        raise NotPrunable(f"cannot prove the mask '{other.name}' broadcasts over heads (shape {shape})")
    if len(shape) >= 3 and shape[-3] != 1:
        raise NotPrunable(f"the mask '{other.name}' has a head axis (shape {list(shape)})")


def _only_reader(tensor: gs.Tensor, graph: gs.Graph, what: str) -> gs.Node:
    """The one node that reads `tensor`; NotPrunable when others read it or the graph outputs it."""
    if is_graph_output(tensor, graph):
        raise NotPrunable(f"{what} '{tensor.name}' is also a graph output")
    readers = consumers(tensor)
    if len(readers) != 1:
        names = ", ".join(f"'{n.name}'" for n in readers)
        raise NotPrunable(f"{what} '{tensor.name}' is read by {len(readers)} nodes ({names})")
    return readers[0]


def _transposes_after(tensor: gs.Tensor, graph: gs.Graph) -> tuple[list[gs.Node], tuple[int, ...]]:
    """The chain of Transposes reading `tensor` forward, and the one permutation they make."""
    chain, perm = [], (0, 1, 2, 3)
    node = _only_reader(tensor, graph, "context")
    while node.op == "Transpose" and is_standard_domain(node):
        perm = _compose(perm, _perm_of(node))
        chain.append(node)
        node = _only_reader(node.outputs[0], graph, "context")
    if not chain:
        raise NotPrunable("the context is not transposed back to [B, S, H, dh]")
    return chain, perm


def _perm_of(transpose: gs.Node) -> tuple[int, ...]:
    return tuple(transpose.attrs.get("perm", (3, 2, 1, 0)))  # default: reverse the 4 axes


def _compose(first: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation of Transpose(Transpose(x, first), then)."""
    if len(then) != len(first):
        raise NotPrunable(f"a head Transpose has {len(then)} axes, not 4")
    return tuple(first[axis] for axis in then)


def _match_same_split(
    tensor: gs.Tensor, perm: tuple[int, ...], role: str, graph: gs.Graph, heads: int, head_dim: int
) -> HeadSplit:
    split, h, dh = _match_split(tensor, perm, role, graph)
    if (h, dh) != (heads, head_dim):
        raise NotPrunable(f"{role} has {h} heads of {dh}, Q has {heads} of {head_dim}")
    return split


def _match_split(tensor: gs.Tensor, perm: tuple[int, ...], role: str, graph: gs.Graph):
    """(HeadSplit, H, dh) for the Q, K or V operand `tensor` of an attention MatMul."""
    after, reshape = _step_back(tensor, transposes=True)
    transposes = [node for node in after if node.op == "Transpose"]
    if reshape is None or reshape.op != "Reshape" or not transposes:
        raise NotPrunable(f"{role} is not a Reshape into heads followed by a Transpose")
    composed = (0, 1, 2, 3)
    for transpose in transposes:
        composed = _compose(composed, _perm_of(transpose))
    if composed != perm:
        raise NotPrunable(f"{role} is transposed by {list(composed)}, expected {list(perm)}")
    heads, head_dim, head_count = _split_shape(reshape, role)
    before, last = _step_back(reshape.inputs[0], transposes=False)
    projection = _match_projection(last, heads * head_dim, role)
    nodes = [*projection, *before, reshape, *after]
    for node in nodes:
        _only_reader(node.outputs[0], graph, f"{role} tensor")
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
        hint = _cleanup_hint(node.inputs[1])
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


def _merge_width(reshape: gs.Node, width: int) -> ShapeEntry | None:
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
        hint = _cleanup_hint(reshape.inputs[1])
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


def _check_output_projection(out: gs.Node, merged: gs.Tensor, width: int) -> None:
    weight = constant_value(out.inputs[1]) if out.op == "MatMul" and len(out.inputs) == 2 else None
    if out.inputs[0] is not merged or weight is None or weight.ndim != 2 or weight.shape[0] != width:
        hint = _cleanup_hint(out.inputs[-1])
        raise NotPrunable(f"the merged context is not multiplied by a constant [{width}, D] weight{hint}")
    if weight.dtype.type not in FLOAT_TYPES or not is_standard_domain(out):
        raise NotPrunable(f"the output projection '{out.name}' has no float weight")


def _check_shape_holders(splits: list[HeadSplit], merge: gs.Node, merged_width: ShapeEntry | None) -> None:
    """A shape built by a Concat is rewritten at the Concat: only the block's Reshapes may read it."""
    reshapes = {id(split.reshape) for split in splits} | {id(merge)}
    entries = [split.head_count for split in splits] + [merged_width] * (merged_width is not None)
    for entry in entries:
        readers = consumers(entry.holder.outputs[0]) if entry.holder.op == "Concat" else []
        if any(id(reader) not in reshapes for reader in readers):
            raise NotPrunable(f"the shape built by '{entry.holder.name}' is also read outside the block")


def _cleanup_hint(tensor: gs.Tensor) -> str:
    # Values in Constant nodes become initializers in cleanup (lift-constants); until then they
    # are computed tensors here, like any other.
    node = producer(tensor)
    return " (a Constant node: run cleanup first)" if node is not None and node.op == "Constant" else ""


def _block_name(nodes: list[gs.Node], fallback: gs.Node) -> str:
    """The scope the block's node names share ('/layers/0/self_attn'), else the Softmax's name."""
    prefix = os.path.commonprefix([node.name for node in nodes])
    cut = prefix.rfind("/")
    return prefix[:cut] if cut > 0 else fallback.name


def _is_excluded(block: AttentionBlock, patterns: list[str]) -> bool:
    names = [n.name for n in block.nodes] + [n.inputs[1].name for n in block.layers]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names)


# ---------------------------------------------------------------------------------- importance


def weight_importance(block: AttentionBlock, norm: str) -> np.ndarray:
    """[H] l1 or l2 head scores from the weights alone (module docstring)."""
    wq, wk, wv, wo = (w.astype(np.float64) for w in block.weights())
    h, dh = block.heads, block.head_dim
    by_head = [w.reshape(w.shape[0], h, dh).transpose(1, 0, 2) for w in (wq, wk, wv)]
    by_head.append(wo.reshape(h, dh, wo.shape[1]))
    return sum(_normalized_norms(part.reshape(h, -1), norm) for part in by_head)


def _normalized_norms(rows: np.ndarray, norm: str) -> np.ndarray:
    norms = np.abs(rows).sum(axis=1) if norm == "l1" else np.sqrt((rows**2).sum(axis=1))
    mean = norms.mean()
    return norms / mean if mean > 0 else norms


def output_energy(blocks: list[AttentionBlock], dense: onnx.ModelProto, ctx: PassContext) -> list[np.ndarray]:
    """[H] per block: E‖ctx_h · Wo_h‖² over the tokens of ctx.calib, in one pass over the data."""
    names = [block.context.name for block in blocks]
    known = {out for node in dense.graph.node for out in node.output}
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"the dense model has no tensor '{missing[0]}': give the model the graph came from")
    grams = [np.zeros((b.heads, b.head_dim, b.head_dim)) for b in blocks]
    tokens = [0] * len(blocks)
    batches = stream_tensors(
        dense,
        ctx.calib.batches(),
        names,
        threads=ctx.threads,
        progress=ctx.progress,
        description="head importance",
        total=ctx.calib.num_batches,
    )
    for values in batches:
        for i, block in enumerate(blocks):
            heads = values[block.context.name].reshape(-1, block.heads, block.head_dim).astype(np.float64)
            grams[i] += np.einsum("thd,the->hde", heads, heads)
            tokens[i] += heads.shape[0]
    energies = []
    for block, gram, count in zip(blocks, grams, tokens, strict=True):
        wo = block.weights()[-1].astype(np.float64).reshape(block.heads, block.head_dim, -1)
        out_gram = np.einsum("hdo,heo->hde", wo, wo)  # Wo_h Wo_hᵀ
        energies.append((gram * out_gram).sum(axis=(1, 2)) / max(count, 1))
    return energies


def head_importance(
    blocks: list[AttentionBlock], importance: str, dense: onnx.ModelProto, ctx: PassContext
) -> list[np.ndarray]:
    """[H] scores per block, higher = more important."""
    if importance == "taylor":
        return output_energy(blocks, dense, ctx) if blocks else []
    return [weight_importance(block, importance) for block in blocks]


def heads_to_remove(heads: int, sparsity: float) -> int:
    """round(sparsity · H), keeping at least one head."""
    return min(int(round(sparsity * heads)), heads - 1)


def weakest(scores: np.ndarray, count: int) -> list[int]:
    """The `count` lowest-scored heads, ascending; among equal scores the lower index goes first."""
    return sorted(int(h) for h in np.argsort(scores, kind="stable")[:count])


# ------------------------------------------------------------------------------------ removing


def set_constant_inputs(uses: list[tuple[gs.Node, int]], values: np.ndarray, names: Names) -> None:
    """Make each input slot (node, index) of `uses`, which all read one constant, read `values`.
    A constant that only these slots read is edited and keeps its name; one that other nodes read
    too stays as it is for them, and the slots get one fresh constant."""
    uses = list({(id(node), index): (node, index) for node, index in uses}.values())
    old = uses[0][0].inputs[uses[0][1]]
    # A tensor lists a reader once per input slot it fills, so equal counts mean no other reader.
    if len(consumers(old)) == len(uses):
        old.values = values
        return
    new = gs.Constant(names.fresh(old.name), values)
    for node, index in uses:
        node.inputs[index] = new


def set_shape_entries(entries: list[ShapeEntry], value: int, names: Names) -> None:
    """Set every shape entry of `entries` to `value`; entries held by one constant are edited together."""
    groups: dict[int, list[ShapeEntry]] = {}
    for entry in entries:
        groups.setdefault(id(entry.tensor), []).append(entry)
    for group in groups.values():
        values = constant_value(group[0].tensor).copy()
        for entry in group:
            values.reshape(-1)[entry.position] = value
        set_constant_inputs([(entry.holder, entry.index) for entry in group], values, names)


def remove_heads(block: AttentionBlock, removed: list[int], names: Names) -> None:
    """Rewrite `block` without the heads `removed`."""
    kept = [h for h in range(block.heads) if h not in removed]
    columns = (np.array(kept)[:, None] * block.head_dim + np.arange(block.head_dim)).reshape(-1)
    for split in block.splits:
        weight = constant_value(split.matmul.inputs[1])
        set_constant_inputs([(split.matmul, 1)], weight[:, columns], names)
        if split.bias_add is not None:
            bias = constant_value(split.bias_add.inputs[split.bias_index])
            if bias.size > 1:  # a scalar bias is the same for every head
                set_constant_inputs([(split.bias_add, split.bias_index)], bias[..., columns], names)
    set_constant_inputs([(block.out, 1)], constant_value(block.out.inputs[1])[columns], names)
    set_shape_entries([split.head_count for split in block.splits], len(kept), names)
    if block.merged_width is not None:
        set_shape_entries([block.merged_width], len(kept) * block.head_dim, names)
    # The shapes recorded for the tensors inside the block still count H heads; shape inference
    # (the infer-shapes pass, or ONNX Runtime) works them out again from the new weights.
    for node in block.nodes[:-1]:
        node.outputs[0].shape = None


def prune_heads(
    graph: gs.Graph,
    ctx: PassContext,
    sparsity: float,
    importance: str,
    exclude: list[str],
    dense: onnx.ModelProto,
) -> tuple[list[dict], list[dict]]:
    """Removes round(sparsity * heads) heads (at least one kept) from every attention block it can
    prove safe; returns (rows, skipped). rows: {"group", "heads_before", "heads_after", "removed",
    "params_before", "params_after", "layers", "importance"}; skipped: {"name", "reason"}. Edits
    `graph` in place. `dense` is the model before pruning, read for taylor importance."""
    _check_options(sparsity, importance, ctx)
    blocks, skipped = find_attention_blocks(graph, exclude)
    counts = {id(block): heads_to_remove(block.heads, sparsity) for block in blocks}
    for block in [b for b in blocks if counts[id(b)] == 0]:
        skipped.append(
            {"name": block.name, "reason": f"sparsity {sparsity} removes no head of {block.heads}"}
        )
    blocks = [block for block in blocks if counts[id(block)] > 0]
    scores = head_importance(blocks, importance, dense, ctx)
    names = Names(graph)
    rows = []
    for block, block_scores in zip(blocks, scores, strict=True):
        removed = weakest(block_scores, counts[id(block)])
        params_before = block.params()
        remove_heads(block, removed, names)
        rows.append(
            {
                "group": block.name,
                "heads_before": block.heads,
                "heads_after": block.heads - len(removed),
                "removed": removed,
                "params_before": params_before,
                "params_after": block.params(),
                "layers": [node.name for node in block.layers],
                "importance": [float(s) for s in block_scores],
            }
        )
    return rows, skipped


def _check_options(sparsity: float, importance: str, ctx: PassContext) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise BadInput(f"prune-structured: sparsity {sparsity} is outside [0, 1)")
    if importance not in IMPORTANCES:
        raise BadInput(f"prune-structured: importance '{importance}' is not one of {', '.join(IMPORTANCES)}")
    if importance == "taylor" and ctx.calib is None:
        raise BadInput(
            "prune-structured: --importance taylor needs calibration data: "
            "give --calib DATA (a .npz, a folder, or 'random')"
        )
