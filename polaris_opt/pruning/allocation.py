"""scope=global: how sparse each layer gets when one budget is shared by the whole model.

All layers' scores are ranked together and the lowest round(sparsity·total) are pruned, so a
layer of unimportant weights gives up more than one of important weights. No layer may go
past `max_layer_sparsity` (an emptied layer cuts the network): a layer that would is held at
its cap and the rest of the budget moves to the other layers, which amounts to raising the
shared threshold for them. The result is a sparsity per layer; the pass then prunes each layer
at its sparsity with the layer's own method and pattern, which for magnitude pruning is exactly
one global threshold.
"""

from __future__ import annotations

import math

import numpy as np

from polaris_opt.errors import BadInput
from polaris_opt.pruning.patterns import pruned_count


def global_sparsities(scores: list[np.ndarray], sparsity: float, max_layer_sparsity: float) -> list[float]:
    """Each layer's sparsity (pruned count / size) so that exactly round(sparsity·total) of all
    scores are pruned, the lowest first (ties by layer order, then index), and no layer is
    pruned beyond `max_layer_sparsity`."""
    sizes = [layer.size for layer in scores]
    caps = [layer_cap(size, max_layer_sparsity) for size in sizes]
    budget = pruned_count(sum(sizes), sparsity)
    if budget > sum(caps):
        raise BadInput(
            f"prune: global sparsity {sparsity} cannot be met with max-layer-sparsity {max_layer_sparsity} "
            f"(at most {sum(caps)} of {sum(sizes)} weights may go); "
            "raise max-layer-sparsity or lower sparsity"
        )
    counts = _capped_counts(scores, budget, caps)
    return [count / size if size else 0.0 for count, size in zip(counts, sizes, strict=True)]


def layer_cap(size: int, max_layer_sparsity: float) -> int:
    """The most weights of a layer of `size` that may be pruned."""
    # The epsilon keeps 0.99 * 100 (98.99999999999999 in binary) at 99.
    return min(size, math.floor(max_layer_sparsity * size + 1e-9))


def _capped_counts(scores: list[np.ndarray], budget: int, caps: list[int]) -> list[int]:
    """Pruned counts per layer: the `budget` lowest scores overall, with layers held at their caps.

    A layer over its cap at the current threshold is over it at any higher one, so capping it
    and sharing the rest among the others again converges in at most one round per layer.
    """
    counts = [0] * len(scores)
    open_layers = list(range(len(scores)))
    while open_layers and budget > 0:
        found = _lowest_counts([scores[i] for i in open_layers], budget)
        over = [i for i, count in zip(open_layers, found, strict=True) if count > caps[i]]
        if not over:
            for i, count in zip(open_layers, found, strict=True):
                counts[i] = count
            break
        for i in over:
            counts[i] = caps[i]
            budget -= caps[i]
        open_layers = [i for i in open_layers if i not in over]
    return counts


def _lowest_counts(scores: list[np.ndarray], budget: int) -> list[int]:
    """How many of each layer's scores are among the `budget` lowest of all layers together."""
    total = sum(layer.size for layer in scores)
    if budget >= total:
        return [layer.size for layer in scores]
    every = np.concatenate([layer.ravel() for layer in scores])
    threshold = np.partition(every, budget - 1)[budget - 1]
    del every  # as big as the model's weights: freed before the per-layer counts
    below = [int(np.count_nonzero(layer < threshold)) for layer in scores]
    # Scores equal to the threshold are taken in layer order until the budget is met.
    still_needed = budget - sum(below)
    counts = []
    for layer, count in zip(scores, below, strict=True):
        tied = min(still_needed, int(np.count_nonzero(layer == threshold)))
        counts.append(count + tied)
        still_needed -= tied
    return counts
