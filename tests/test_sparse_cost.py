"""polaris_opt.sparse.cost: bytes per format (checked against from_dense and by hand) and the choice."""

from __future__ import annotations

import numpy as np
import pytest

from polaris_opt.devices import PROFILES
from polaris_opt.errors import BadInput
from polaris_opt.sparse import from_dense
from polaris_opt.sparse.cost import BLOCK_SHAPES, choose_format, format_costs

RNG = np.random.default_rng(0)


def bernoulli(rows: int, cols: int, density: float) -> np.ndarray:
    """Each entry nonzero with probability `density`: row lengths vary (binomially)."""
    mask = RNG.random((rows, cols)) < density
    return (RNG.standard_normal((rows, cols)) * mask).astype(np.float32)


def even_rows(rows: int, cols: int, per_row: int) -> np.ndarray:
    """Exactly `per_row` nonzeros in every row, at random columns (as N:M pruning leaves them)."""
    w = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        w[r, RNG.choice(cols, per_row, replace=False)] = RNG.standard_normal(per_row) + 3
    return w


def blocky(rows: int, cols: int, block: int, density: float) -> np.ndarray:
    """Whole block×block tiles nonzero with probability `density` (as block pruning leaves them)."""
    tiles = RNG.random((rows // block, cols // block)) < density
    mask = np.kron(tiles, np.ones((block, block), bool))
    return (RNG.standard_normal((rows, cols)) * mask + 3 * mask).astype(np.float32)


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("shape", [(64, 96), (37, 53), (1, 200), (130, 7)])
def test_storage_bytes_are_what_from_dense_stores(values, shape):
    w = bernoulli(*shape, density=0.15)
    w[shape[0] // 2] = 0  # an empty row
    for profile in ("polaris", "rdna", "cpu"):
        for cost in format_costs(w, profile, values):
            stored = from_dense(
                w, cost.format, values=values, block=cost.block, slice_height=cost.slice_height or 1
            )
            assert cost.storage_bytes == stored.nbytes, cost.label
            assert cost.stored == stored.nnz and cost.index == stored.indices.dtype.name


def test_bytes_by_hand_on_a_small_matrix():
    w = np.zeros((4, 6), np.float32)
    w[0, [0, 1]] = 1
    w[1, 5] = 2
    w[3, [0, 1, 2]] = 3  # row lengths 2, 1, 0, 3: six nonzeros
    costs = {cost.label: cost for cost in format_costs(w, "rdna", "fp32")}  # rdna: wavefront 32
    activations = (4 + 6) * 4
    # csr: 6 values of 4 bytes, 6 uint16 columns, 5 int32 row pointers.
    assert costs["csr"].total_bytes == 6 * 4 + 6 * 2 + 5 * 4 + activations
    # sell-32: one slice of 32 rows (28 of padding), each as long as the longest row (3).
    assert costs["sell-32"].stored == 96 and costs["sell-32"].padding == 90
    assert costs["sell-32"].total_bytes == 96 * 4 + 96 * 2 + 2 * 4 + activations
    # bsr 2x2: blocks (0,0) (0,2) (1,0) (1,1) hold the nonzeros: 4 blocks of 4, indices per block.
    assert costs["bsr 2x2"].stored == 16 and costs["bsr 2x2"].fill == pytest.approx(6 / 16)
    assert costs["bsr 2x2"].total_bytes == 16 * 4 + 4 * 2 + 3 * 4 + activations
    # int8: one byte per value and one float32 scale per row.
    int8 = {cost.label: cost for cost in format_costs(w, "rdna", "int8")}
    assert int8["csr"].total_bytes == 6 * 1 + 6 * 2 + 5 * 4 + 4 * 4 + activations


def test_block_structured_weights_go_bsr_with_their_block():
    for block in (4, 8):
        w = blocky(256, 512, block, density=0.1)
        for profile in ("cpu", "polaris"):
            choice = choose_format(w, profile)
            assert choice.chosen.label == f"bsr {block}x{block}", choice.reason
            assert choice.chosen.fill == 1.0 and "fill 100%" in choice.reason


def test_bsr_only_when_its_fill_pays_for_the_zeros_it_stores():
    # fp32 + uint16: csr costs 6 bytes a nonzero, a 4x4 block 64 + 2: bsr wins above ~69 % fill.
    # Inside every stored 4x4 tile: all but the diagonal (75 %), or a checkerboard (50 %, and
    # 50 % in every 2x2 block too).
    all_but_diagonal = ~np.eye(4, dtype=bool)
    checkerboard = (np.add.outer(np.arange(4), np.arange(4)) % 2).astype(bool)
    for inside, expected in ((all_but_diagonal, "bsr 4x4"), (checkerboard, "csr")):
        w = blocky(128, 256, 4, density=0.1) * np.tile(inside, (32, 64))
        choice = choose_format(w, "polaris")
        assert choice.chosen.label == expected, choice.reason
        bsr = next(cost for cost in choice.candidates if cost.label == "bsr 4x4")
        assert bsr.fill == pytest.approx(inside.mean())


def test_even_rows_go_sell_on_a_gpu_and_csr_on_the_cpu():
    w = even_rows(256, 512, per_row=51)
    polaris, rdna, cpu = (choose_format(w, p) for p in ("polaris", "rdna", "cpu"))
    assert polaris.chosen.label == "sell-64" and polaris.chosen.padding == 0, polaris.reason
    assert rdna.chosen.label == "sell-32"
    assert cpu.chosen.label == "csr" and "sell not considered" in cpu.reason
    # sell saves the row pointers: (N + 1) - (N / 64 + 1) int32s.
    csr = next(cost for cost in polaris.candidates if cost.format == "csr")
    assert csr.total_bytes - polaris.chosen.total_bytes == (256 - 4) * 4


def test_uneven_rows_go_csr_even_on_a_gpu_because_sell_pads_them():
    w = bernoulli(256, 512, density=0.1)
    choice = choose_format(w, "polaris")
    sell = next(cost for cost in choice.candidates if cost.format == "sell")
    assert choice.chosen.label == "csr" and sell.padding > 0.1 * sell.stored
    assert "sell-64 padding" in choice.reason


def test_a_format_asked_for_is_given_with_its_cheapest_block():
    w = blocky(128, 128, 8, density=0.2)
    assert choose_format(w, "cpu", format="sell").chosen.label == f"sell-{PROFILES['cpu'].wavefront}"
    bsr = choose_format(w, "cpu", format="bsr")
    assert bsr.chosen.label == "bsr 8x8" and bsr.reason.startswith("bsr as asked")
    assert {cost.block for cost in bsr.candidates if cost.format == "bsr"} == set(BLOCK_SHAPES)


def test_ninety_percent_int8_is_under_a_twelfth_of_dense_fp32():
    # The target: 0.1 density x (1 byte + 2-byte index) ~ 0.3 byte/element against 4.
    w = bernoulli(512, 1024, density=0.1)
    choice = choose_format(w, "polaris", values="int8")
    assert choice.chosen.index == "uint16"
    assert choice.chosen.storage_bytes <= w.size * 4 / 12
    assert choice.dense_bytes == (w.size + 512 + 1024) * 4


def test_accepts_a_profile_object_and_refuses_unknown_names():
    w = bernoulli(16, 16, 0.2)
    assert choose_format(w, PROFILES["vega"]).chosen.label == choose_format(w, "vega").chosen.label
    with pytest.raises(BadInput, match="unknown device profile 'gfx803'.*polaris"):
        choose_format(w, "gfx803")
    with pytest.raises(BadInput, match="unknown sparse format 'coo'"):
        choose_format(w, "cpu", format="coo")
