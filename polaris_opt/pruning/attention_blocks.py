"""Finding the multi-head attention blocks that head pruning can shrink.

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
may end in -1. The Q, K, V paths and the Reshape shapes are matched in pruning/head_splits.py.
Anything else is skipped with the reason: a per-head tensor read by another node or also a graph
output, a head count computed at run time, a mask with a head axis, a Softmax over another axis.
Skipping never changes the block.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.pruning.head_splits import (
    HeadSplit,
    NotPrunable,
    ShapeEntry,
    cleanup_hint,
    compose,
    match_same_split,
    match_split,
    merge_width,
    only_reader,
    perm_of,
)
from polaris_opt.pruning.targets import FLOAT_TYPES
from polaris_opt.surgery import constant_value, consumers, is_standard_domain, producer

Q_PERM, K_PERM, V_PERM, MERGE_PERM = (0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3), (0, 2, 1, 3)
# Scalings and mask Adds looked through between the score MatMul and the Softmax: the depth
# bound keeps a Softmax after a long chain of residual Adds from being walked all the way back.
MAX_SCORE_OPS = 4


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
    context_matmul = only_reader(softmax.outputs[0], graph, "attention probabilities")
    if context_matmul.op != "MatMul" or context_matmul.inputs[0] is not softmax.outputs[0]:
        raise NotPrunable("the attention probabilities do not multiply V")
    merge_transposes, perm = _transposes_after(context_matmul.outputs[0], graph)
    if perm != MERGE_PERM:
        raise NotPrunable(f"the context is transposed by {list(perm)}, not back to [B, S, H, dh]")
    merge = only_reader(merge_transposes[-1].outputs[0], graph, "context")
    if merge.op != "Reshape":
        raise NotPrunable(f"the context is read by a {merge.op}, not by the Reshape that merges heads")
    q, heads, head_dim = match_split(score.inputs[0], Q_PERM, "Q", graph)
    k = match_same_split(score.inputs[1], K_PERM, "K", graph, heads, head_dim)
    v = match_same_split(context_matmul.inputs[1], V_PERM, "V", graph, heads, head_dim)
    merged_width = merge_width(merge, heads * head_dim)
    out = only_reader(merge.outputs[0], graph, "merged context")
    _check_output_projection(out, merge.outputs[0], heads * head_dim)
    _check_shape_holders([q, k, v], merge, merged_width)
    core = [score, *between, softmax, context_matmul, *merge_transposes, merge]
    for node in core[:-1]:
        only_reader(node.outputs[0], graph, "per-head tensor")
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
            hint = cleanup_hint(other)
            raise NotPrunable(
                f"the scores are scaled by '{other.name}', which is not a constant scalar{hint}"
            )
        return
    shape = other.shape
    if shape is None or len(shape) > 4:
        raise NotPrunable(f"cannot prove the mask '{other.name}' broadcasts over heads (shape {shape})")
    if len(shape) >= 3 and shape[-3] != 1:
        raise NotPrunable(f"the mask '{other.name}' has a head axis (shape {list(shape)})")


def _transposes_after(tensor: gs.Tensor, graph: gs.Graph) -> tuple[list[gs.Node], tuple[int, ...]]:
    """The chain of Transposes reading `tensor` forward, and the one permutation they make."""
    chain, perm = [], (0, 1, 2, 3)
    node = only_reader(tensor, graph, "context")
    while node.op == "Transpose" and is_standard_domain(node):
        perm = compose(perm, perm_of(node))
        chain.append(node)
        node = only_reader(node.outputs[0], graph, "context")
    if not chain:
        raise NotPrunable("the context is not transposed back to [B, S, H, dh]")
    return chain, perm


def _check_output_projection(out: gs.Node, merged: gs.Tensor, width: int) -> None:
    weight = constant_value(out.inputs[1]) if out.op == "MatMul" and len(out.inputs) == 2 else None
    if out.inputs[0] is not merged or weight is None or weight.ndim != 2 or weight.shape[0] != width:
        hint = cleanup_hint(out.inputs[-1])
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


def _block_name(nodes: list[gs.Node], fallback: gs.Node) -> str:
    """The scope the block's node names share ('/layers/0/self_attn'), else the Softmax's name."""
    prefix = os.path.commonprefix([node.name for node in nodes])
    cut = prefix.rfind("/")
    return prefix[:cut] if cut > 0 else fallback.name


def _is_excluded(block: AttentionBlock, patterns: list[str]) -> bool:
    names = [n.name for n in block.nodes] + [n.inputs[1].name for n in block.layers]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names)
