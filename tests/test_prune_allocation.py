"""scope=global allocation: one ranking across layers, the exact overall count, per-layer caps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from polaris_opt.errors import BadInput
from polaris_opt.pruning.allocation import global_sparsities, layer_cap

RNG = np.random.default_rng(0)


def reference_counts(scores: list[np.ndarray], sparsity: float, max_layer: float) -> list[int]:
    """Brute force: walk every score from lowest to highest (ties by layer, then index), pruning
    each unless its layer is at its cap, until round(sparsity·total) are pruned."""
    flat = [(value, layer, index) for layer, s in enumerate(scores) for index, value in enumerate(s.ravel())]
    flat.sort(key=lambda item: (item[0], item[1], item[2]))
    budget = round(sparsity * sum(s.size for s in scores))
    counts = [0] * len(scores)
    for _, layer, _ in flat:
        if budget == 0:
            break
        if counts[layer] < layer_cap(scores[layer].size, max_layer):
            counts[layer] += 1
            budget -= 1
    return counts


def counts_of(sparsities: list[float], scores: list[np.ndarray]) -> list[int]:
    return [round(s * layer.size) for s, layer in zip(sparsities, scores, strict=True)]


def test_one_threshold_across_layers_prunes_the_lowest_overall():
    small = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    large = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 0.05, 7.0, 8.0]], dtype=np.float32)
    # 6 of 12: the four of `small` and the two lowest of `large` (0.05 and 1.0).
    sparsities = global_sparsities([small, large], 0.5, max_layer_sparsity=1.0)
    assert sparsities == [1.0, 0.25]


def test_a_layer_that_would_be_emptied_is_held_at_its_cap_and_the_rest_moves_on():
    tiny = np.full((10, 10), 1e-3, dtype=np.float32)  # all below every weight of `big`
    big = np.abs(RNG.standard_normal((10, 30))).astype(np.float32) + 1
    sparsities = global_sparsities([tiny, big], 0.5, max_layer_sparsity=0.9)
    counts = counts_of(sparsities, [tiny, big])
    assert counts == [90, 110]  # 200 of 400: tiny capped at 90, big takes the other 110
    assert sum(counts) == 200
    assert counts == reference_counts([tiny, big], 0.5, 0.9)


def test_max_layer_sparsity_caps_use_floor_without_binary_rounding_surprises():
    assert layer_cap(100, 0.99) == 99
    assert layer_cap(7, 0.5) == 3
    assert layer_cap(7, 1.0) == 7


def test_a_budget_beyond_every_cap_is_a_bad_input():
    layers = [np.ones((10, 10), dtype=np.float32), np.ones((5, 5), dtype=np.float32)]
    with pytest.raises(BadInput, match="global sparsity 0.95 cannot be met with max-layer-sparsity 0.9"):
        global_sparsities(layers, 0.95, max_layer_sparsity=0.9)


def test_ties_across_layers_go_to_the_earlier_layer_first():
    first, second = np.ones((2, 2), dtype=np.float32), np.ones((2, 2), dtype=np.float32)
    assert global_sparsities([first, second], 0.5, 1.0) == [1.0, 0.0]
    assert global_sparsities([first, second], 0.5, 0.5) == [0.5, 0.5]


@settings(max_examples=120, deadline=None)
@given(
    layers=st.lists(
        hnp.arrays(
            np.float32,
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
            elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]),
        ),
        min_size=1,
        max_size=4,
    ),
    sparsity=st.floats(0, 0.99),
    max_layer=st.sampled_from([0.5, 0.8, 0.99, 1.0]),
)
def test_property_global_counts_are_exact_capped_and_match_brute_force(layers, sparsity, max_layer):
    budget = round(sparsity * sum(layer.size for layer in layers))
    if budget > sum(layer_cap(layer.size, max_layer) for layer in layers):
        with pytest.raises(BadInput):
            global_sparsities(layers, sparsity, max_layer)
        return
    counts = counts_of(global_sparsities(layers, sparsity, max_layer), layers)
    assert sum(counts) == budget
    assert all(c <= layer_cap(layer.size, max_layer) for c, layer in zip(counts, layers, strict=True))
    assert counts == reference_counts(layers, sparsity, max_layer)
