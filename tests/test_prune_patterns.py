"""Pruning patterns: parsing, and exact keep masks checked against brute-force NumPy references
(full stable sorts, explicit loops over groups and blocks)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from polaris_opt.errors import BadInput
from polaris_opt.pruning.patterns import Pattern, block_scores, pruned_count, select

RNG = np.random.default_rng(0)
UNSTRUCTURED = Pattern("unstructured")


# ------------------------------------------------------------------ brute-force references


def reference_unstructured(scores: np.ndarray, count: int) -> np.ndarray:
    """KEEP mask: the `count` lowest scores pruned, equal scores by row-major index (stable sort)."""
    order = np.argsort(scores.ravel(), kind="stable")
    keep = np.ones(scores.size, dtype=bool)
    keep[order[:count]] = False
    return keep.reshape(scores.shape)


def reference_per_row(scores: np.ndarray, sparsity: float) -> np.ndarray:
    total = pruned_count(scores.size, sparsity)
    rows = scores.shape[0]
    keep = np.ones(scores.shape, dtype=bool)
    for i in range(rows):
        count = total // rows + (1 if i < total % rows else 0)
        keep[i] = reference_unstructured(scores[i : i + 1], count)[0]
    return keep


def reference_nm(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    keep = np.zeros(scores.shape, dtype=bool)
    for i in range(scores.shape[0]):
        for start in range(0, scores.shape[1], m):
            group = scores[i, start : start + m]
            # The len - n lowest go, equal scores leftmost first (a stable sort).
            order = np.argsort(group, kind="stable")
            pruned = order[: max(0, len(group) - n)]
            kept = np.ones(len(group), dtype=bool)
            kept[pruned] = False
            keep[i, start : start + m] = kept
    return keep


def reference_block(scores: np.ndarray, r: int, c: int, sparsity: float) -> np.ndarray:
    rows, cols = scores.shape
    starts = [(i, j) for i in range(0, rows, r) for j in range(0, cols, c)]
    norms = np.array(
        [np.sqrt(np.sum(scores[i : i + r, j : j + c].astype(np.float64) ** 2)) for i, j in starts]
    )
    order = np.argsort(norms, kind="stable")
    keep = np.ones(scores.shape, dtype=bool)
    for index in order[: pruned_count(len(starts), sparsity)]:
        i, j = starts[index]
        keep[i : i + r, j : j + c] = False
    return keep


# --------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unstructured", Pattern("unstructured")),
        ("2:4", Pattern("nm", n=2, m=4)),
        ("4:8", Pattern("nm", n=4, m=8)),
        ("1:3", Pattern("nm", n=1, m=3)),
        ("block:4x4", Pattern("block", rows=4, cols=4)),
        ("block:1x4", Pattern("block", rows=1, cols=4)),
        ("block:16x1", Pattern("block", rows=16, cols=1)),
    ],
)
def test_parse_reads_every_form_and_text_prints_it_back(text, expected):
    assert Pattern.parse(text) == expected
    assert Pattern.parse(text).text() == text


@pytest.mark.parametrize(
    "text", ["3:2", "0:4", "4:4", "block:0x4", "block:4x0", "blk:4x4", "2-4", "", "block:4"]
)
def test_bad_pattern_text_is_a_bad_input_naming_the_valid_forms(text):
    with pytest.raises(BadInput, match=r"pattern .* is not valid; use 'unstructured', 'N:M'.*block:RxC"):
        Pattern.parse(text)


def test_fixed_sparsity_is_one_minus_n_over_m_for_nm_only():
    assert Pattern.parse("2:4").fixed_sparsity == 0.5
    assert Pattern.parse("1:4").fixed_sparsity == 0.75
    assert Pattern.parse("unstructured").fixed_sparsity is None
    assert Pattern.parse("block:4x4").fixed_sparsity is None


# ---------------------------------------------------------------------------- unstructured


def test_unstructured_prunes_the_lowest_scores_of_a_hand_made_matrix():
    scores = np.array([[5.0, 1.0, 4.0], [2.0, 6.0, 3.0]], dtype=np.float32)
    keep = select(scores, UNSTRUCTURED, 0.5)
    assert keep.tolist() == [[True, False, True], [False, True, False]]


def test_ties_at_the_threshold_are_broken_by_index_not_all_pruned():
    # Six equal scores and 50 %: a "<= threshold" rule would prune all six.
    scores = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    keep = select(scores, UNSTRUCTURED, 0.5)
    assert keep.tolist() == [[False, False, False], [True, True, True]]
    scores = np.array([[3.0, 1.0, 1.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    assert select(scores, UNSTRUCTURED, 0.5).tolist() == [[True, False, False, False, True, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.9, 0.99, 1.0])
def test_unstructured_prunes_exactly_round_sparsity_times_size(sparsity):
    scores = np.abs(RNG.standard_normal((37, 23))).astype(np.float32)
    keep = select(scores, UNSTRUCTURED, sparsity)
    assert (~keep).sum() == round(sparsity * scores.size)
    np.testing.assert_array_equal(keep, reference_unstructured(scores, round(sparsity * scores.size)))


def test_per_row_gives_each_row_floor_or_ceil_of_its_share_and_the_exact_total():
    scores = np.abs(RNG.standard_normal((7, 10))).astype(np.float32)
    keep = select(scores, UNSTRUCTURED, 0.55, per_row=True)  # 38.5 -> 38 = 7*5 + 3
    assert (~keep).sum(axis=1).tolist() == [6, 6, 6, 5, 5, 5, 5]
    np.testing.assert_array_equal(keep, reference_per_row(scores, 0.55))


score_matrices = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    # Few distinct values, so ties are common.
    elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.5]),
)


@settings(max_examples=150, deadline=None)
@given(scores=score_matrices, sparsity=st.floats(0, 1), per_row=st.booleans())
def test_property_unstructured_matches_a_stable_sort(scores, sparsity, per_row):
    keep = select(scores, UNSTRUCTURED, sparsity, per_row=per_row)
    assert (~keep).sum() == pruned_count(scores.size, sparsity)
    reference = (
        reference_per_row(scores, sparsity)
        if per_row
        else reference_unstructured(scores, pruned_count(scores.size, sparsity))
    )
    np.testing.assert_array_equal(keep, reference)
    # Nothing kept is below anything pruned (in the compared set).
    if not per_row and keep.any() and (~keep).any():
        assert scores[keep].min() >= scores[~keep].max()


# ------------------------------------------------------------------------------------ N:M


def test_two_four_keeps_the_two_highest_of_every_four_in_each_row():
    scores = np.array([[0.1, 0.9, 0.5, 0.2, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    keep = select(scores, Pattern.parse("2:4"), 0.5)
    assert keep.tolist() == [[False, True, True, False, True, True, False, False]]


def test_partial_nm_group_keeps_min_n_r_entries():
    scores = np.arange(1, 12, dtype=np.float32).reshape(1, 11)  # 8 + a last group of 3
    keep = select(scores, Pattern.parse("2:4"), 0.5)
    assert keep[0, 8:].tolist() == [False, True, True]  # 3 real columns: keeps 2
    keep = select(np.arange(1, 10, dtype=np.float32).reshape(1, 9), Pattern.parse("2:4"), 0.5)
    assert keep[0, 8:].tolist() == [True]  # 1 real column: keeps min(2, 1)


@settings(max_examples=150, deadline=None)
@given(scores=score_matrices, nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 3), (5, 16)]))
def test_property_nm_masks_have_valid_structure(scores, nm):
    n, m = nm
    keep = select(scores, Pattern("nm", n=n, m=m), 0.0)  # sparsity is not used by N:M
    np.testing.assert_array_equal(keep, reference_nm(scores, n, m))
    for start in range(0, scores.shape[1], m):
        group = keep[:, start : start + m]
        assert (group.sum(axis=1) == min(n, group.shape[1])).all()


def test_nm_on_a_large_matrix_matches_the_reference_for_wide_groups_too():
    scores = np.abs(RNG.standard_normal((16, 70))).astype(np.float32)
    for n, m in [(2, 4), (4, 8), (8, 32)]:  # 32 takes the partition path, the others the ranking
        np.testing.assert_array_equal(
            select(scores, Pattern("nm", n=n, m=m), 0.5), reference_nm(scores, n, m)
        )


# ---------------------------------------------------------------------------------- block


def test_block_prunes_whole_blocks_with_the_lowest_norm():
    scores = np.array(
        [[1, 1, 9, 9], [1, 1, 9, 9], [5, 5, 0, 0], [5, 5, 0, 1]],
        dtype=np.float32,
    )
    keep = select(scores, Pattern.parse("block:2x2"), 0.5)
    assert keep.astype(int).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_partial_block_is_scored_by_the_norm_of_its_real_entries():
    scores = np.array([[3.0, 4.0, 1.0], [0.0, 0.0, 1.0]], dtype=np.float32)  # 2x3 with 2x2 blocks
    np.testing.assert_allclose(block_scores(scores, Pattern.parse("block:2x2")), [[5.0, np.sqrt(2.0)]])
    keep = select(scores, Pattern.parse("block:2x2"), 0.5)
    assert keep.tolist() == [[True, True, False], [True, True, False]]


@settings(max_examples=150, deadline=None)
@given(
    scores=score_matrices,
    block=st.sampled_from([(1, 4), (4, 1), (2, 2), (4, 4), (3, 5)]),
    sparsity=st.floats(0, 1),
)
def test_property_block_masks_are_whole_blocks_of_the_exact_count(scores, block, sparsity):
    r, c = block
    keep = select(scores, Pattern("block", rows=r, cols=c), sparsity)
    np.testing.assert_array_equal(keep, reference_block(scores, r, c, sparsity))
    block_count = -(-scores.shape[0] // r) * -(-scores.shape[1] // c)
    pruned_blocks = 0
    for i in range(0, scores.shape[0], r):
        for j in range(0, scores.shape[1], c):
            tile = keep[i : i + r, j : j + c]
            assert tile.all() or not tile.any()  # whole blocks only
            pruned_blocks += not tile.any()
    assert pruned_blocks == pruned_count(block_count, sparsity)


# ------------------------------------------------------------------------------ arguments


def test_select_rejects_a_sparsity_outside_zero_one_and_non_matrices():
    with pytest.raises(ValueError, match="outside"):
        select(np.ones((2, 2)), UNSTRUCTURED, 1.5)
    with pytest.raises(ValueError, match="2-D"):
        select(np.ones(4), UNSTRUCTURED, 0.5)


def test_float16_scores_work_and_keep_the_exact_count():
    scores = np.abs(RNG.standard_normal((9, 31))).astype(np.float16)
    keep = select(scores, UNSTRUCTURED, 0.6)
    assert (~keep).sum() == round(0.6 * scores.size)
    np.testing.assert_array_equal(keep, reference_unstructured(scores, round(0.6 * scores.size)))
