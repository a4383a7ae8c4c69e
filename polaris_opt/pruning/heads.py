"""Structured pruning of attention heads: score the heads of the attention blocks found by
pruning/attention_blocks.py and remove the weakest physically (smaller Q/K/V/output projections,
fewer heads).

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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.capture import stream_tensors
from polaris_opt.errors import BadInput
from polaris_opt.passes_api import PassContext
from polaris_opt.pruning.api import IMPORTANCES
from polaris_opt.pruning.attention_blocks import AttentionBlock, find_attention_blocks
from polaris_opt.pruning.head_splits import ShapeEntry
from polaris_opt.surgery import Names, constant_value, consumers

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
