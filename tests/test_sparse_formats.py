"""Sparse formats: CSR/CSC/BSR arrays equal scipy's, SELL equals a hand-written layout and a loop
reference, round trips are exact (fp32, fp16) or within half a step (int8), bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from polaris_opt.errors import BadInput
from polaris_opt.sparse import FORMATS, SparseMatrix, from_dense, index_dtype, to_dense

sp = pytest.importorskip("scipy.sparse")

RNG = np.random.default_rng(0)


def sparse_random(rows: int, cols: int, density: float = 0.3) -> np.ndarray:
    w = RNG.standard_normal((rows, cols)).astype(np.float32)
    w[RNG.random(w.shape) >= density] = 0
    return w


def padded(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """`w` zero-padded to multiples of `block`, the shape scipy's BSR requires."""
    rows, cols = w.shape
    return np.pad(w, ((0, -rows % block[0]), (0, -cols % block[1])))


def scipy_arrays(w: np.ndarray, format: str, block: tuple[int, int]):
    if format == "csr":
        m = sp.csr_matrix(w)
    elif format == "csc":
        m = sp.csc_matrix(w)
    else:
        m = sp.bsr_matrix(padded(w, block), blocksize=block)
    m.sort_indices()
    return m.data, m.indices, m.indptr


def sell_by_loops(w: np.ndarray, height: int) -> tuple[list, list, list]:
    """SELL-C written the slow, obvious way: slice by slice, column j of the slice, row r."""
    data, indices, indptr = [], [], [0]
    for start in range(0, w.shape[0], height):
        rows = [np.nonzero(w[r])[0] if r < w.shape[0] else [] for r in range(start, start + height)]
        width = max(len(cols) for cols in rows)
        for j in range(width):
            for r, cols in enumerate(rows):
                real = j < len(cols)
                data.append(w[start + r, cols[j]] if real else 0.0)
                indices.append(cols[j] if real else 0)
        indptr.append(len(data))
    return data, indices, indptr


# ------------------------------------------------------------------------------- against scipy

EDGE_MATRICES = {
    "random": sparse_random(13, 10),
    "empty rows": np.vstack([np.zeros((3, 7)), sparse_random(2, 7, 0.6), np.zeros((2, 7))]).astype(
        np.float32
    ),
    "dense rows": np.vstack([RNG.standard_normal((2, 9)), sparse_random(5, 9, 0.2)]).astype(np.float32),
    "all zero": np.zeros((6, 5), np.float32),
    "one column": sparse_random(7, 1, 0.5),
    "no rows": np.zeros((0, 4), np.float32),
}


@pytest.mark.parametrize("name", EDGE_MATRICES)
@pytest.mark.parametrize("format", ["csr", "csc", "bsr"])
@pytest.mark.parametrize("block", [(4, 4), (3, 2), (1, 1)])  # 13x10, 7x9 ... are not multiples of these
def test_arrays_equal_scipy(name, format, block):
    w = EDGE_MATRICES[name]
    m = from_dense(w, format, block=block)
    data, indices, indptr = scipy_arrays(w, format, block)
    np.testing.assert_array_equal(m.data, data)
    np.testing.assert_array_equal(m.indices, indices)
    np.testing.assert_array_equal(m.indptr, indptr)
    assert m.data.dtype == np.float32 and m.indptr.dtype == np.int32 and m.indices.dtype == np.uint16
    assert m.shape == w.shape and m.nnz == data.size
    np.testing.assert_array_equal(to_dense(m), w)


def test_bsr_block_layout():
    """Blocks are row-major [R, C]; a block with a single nonzero is stored whole."""
    w = np.zeros((3, 5), np.float32)
    w[0, 0], w[1, 1], w[2, 4] = 1, 2, 3  # blocks (0,0) and (1,2) of a 2x2 grid padded to 4x6
    m = from_dense(w, "bsr", block=(2, 2))
    np.testing.assert_array_equal(m.data, [[[1, 0], [0, 2]], [[3, 0], [0, 0]]])
    np.testing.assert_array_equal(m.indices, [0, 2])
    np.testing.assert_array_equal(m.indptr, [0, 1, 2])
    assert m.block == (2, 2) and m.density == 8 / 15


# ------------------------------------------------------------------------------- SELL

HAND_SELL = np.array(
    [
        [1, 0, 0, 0, 0, 0],
        [0, 3, 0, 0, 9, 0],
        [0, 0, 0, 0, 0, 0],
        [4, 5, 0, 6, 0, 7],
        [0, 0, 2, 0, 0, 8],
    ],
    np.float32,
)


def test_sell_layout_by_hand():
    """5x6, C=2: slices of widths 2, 4, 2; the last slice is padded with an empty row 5."""
    m = from_dense(HAND_SELL, "sell", slice_height=2)
    # slice 0 (rows 0, 1): column j=0 then j=1, row 0 padded at j=1 with (0, column 0)
    # slice 1 (rows 2, 3): row 2 is empty, so every other entry is padding
    # slice 2 (rows 4, 5): row 5 does not exist and is all padding
    np.testing.assert_array_equal(m.data, [1, 3, 0, 9] + [0, 4, 0, 5, 0, 6, 0, 7] + [2, 0, 8, 0])
    np.testing.assert_array_equal(m.indices, [0, 1, 0, 4] + [0, 0, 0, 1, 0, 3, 0, 5] + [2, 0, 5, 0])
    np.testing.assert_array_equal(m.indptr, [0, 4, 12, 16])
    assert m.slice_height == 2 and m.nnz == 16
    # row 0's padding sits at column 0 after its real value there: densifying must keep the 1
    np.testing.assert_array_equal(to_dense(m), HAND_SELL)


def test_ell_is_sell_with_one_slice():
    m = from_dense(HAND_SELL, "sell", slice_height=8)
    assert m.indptr.tolist() == [0, 4 * 8]  # the widest row (row 3) sets the width of the only slice
    np.testing.assert_array_equal(m.data[3::8], [4, 5, 6, 7])
    np.testing.assert_array_equal(to_dense(m), HAND_SELL)


@pytest.mark.parametrize("name", EDGE_MATRICES)
@pytest.mark.parametrize("height", [1, 3, 4, 64])
def test_sell_matches_loop_reference(name, height):
    w = EDGE_MATRICES[name]
    m = from_dense(w, "sell", slice_height=height)
    data, indices, indptr = sell_by_loops(w, height)
    np.testing.assert_array_equal(m.data, np.array(data, np.float32))
    np.testing.assert_array_equal(m.indices, indices)
    np.testing.assert_array_equal(m.indptr, indptr)
    np.testing.assert_array_equal(to_dense(m), w)


# ------------------------------------------------------------------------------- values and indices


def test_int8_per_row_scale_by_hand():
    w = np.array([[127, -64, 0.5, 1.5], [0, 0, 0, 0], [-254, 3, 1, 0]], np.float32)
    m = from_dense(w, "csr", values="int8")
    np.testing.assert_array_equal(m.scale, [1, 1, 2])  # max|row| / 127, and 1.0 for the empty row
    # round half to even: 0.5 -> 0 and 1.5 -> 2; codes of 0 are not stored
    np.testing.assert_array_equal(m.data, [127, -64, 2, -127, 2])
    np.testing.assert_array_equal(m.indices, [0, 1, 3, 0, 1])
    np.testing.assert_array_equal(m.indptr, [0, 3, 3, 5])
    assert m.data.dtype == np.int8 and m.scale.dtype == np.float32
    np.testing.assert_array_equal(to_dense(m), [[127, -64, 0, 2], [0, 0, 0, 0], [-254, 4, 0, 0]])


def test_int8_near_float32_max_dequantizes_finite():
    """127 * (max / 127) rounds above float32's largest value unless the scale is rounded down."""
    w = np.array([[np.finfo(np.float32).max, 1e38, -1e30]], np.float32)
    m = from_dense(w, "csr", values="int8")
    dense = to_dense(m)
    assert np.isfinite(dense).all()
    assert (np.abs(dense.astype(np.float64) - w) <= m.scale[0] / 2).all()
    assert m.data.tolist() == [127, 37]  # -1e30 is below half a step and rounds to 0


def test_fp16_drops_values_that_underflow():
    w = np.array([[1.0, 1e-9, 3.0]], np.float32)
    m = from_dense(w, "csr", values="fp16")
    assert m.data.dtype == np.float16 and m.indices.tolist() == [0, 2]


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
def test_nbytes_is_the_sum_of_the_arrays(format, values):
    m = from_dense(sparse_random(37, 29), format, values=values, block=(4, 2), slice_height=8)
    scale_bytes = 37 * 4 if values == "int8" else 0
    assert m.nbytes == m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + scale_bytes
    assert m.data.itemsize == {"fp32": 4, "fp16": 2, "int8": 1}[values]
    assert m.density == m.nnz / (37 * 29)


def test_uint16_holds_exactly_65536_columns():
    w = np.zeros((2, 65536), np.float32)
    w[1, 65535] = 5.0
    for format in ("csr", "sell", "bsr"):
        m = from_dense(w, format, index="uint16", block=(1, 1))
        assert m.indices.dtype == np.uint16
        np.testing.assert_array_equal(to_dense(m), w)
    auto = from_dense(np.zeros((2, 65537), np.float32), "csr")
    assert auto.indices.dtype == np.int32
    assert index_dtype(65536, "auto") == np.uint16 and index_dtype(65537, "auto") == np.int32
    assert index_dtype(3, "int32") == np.int32


@pytest.mark.parametrize(
    "shape, format, block",
    [
        ((2, 65537), "csr", (4, 4)),
        ((2, 65537), "sell", (4, 4)),
        ((65537, 2), "csc", (4, 4)),
        ((1, 2 * 65537), "bsr", (1, 2)),  # 65537 block columns
    ],
)
def test_uint16_that_cannot_hold_the_dimension_is_refused(shape, format, block):
    with pytest.raises(BadInput, match="uint16"):
        from_dense(np.zeros(shape, np.float32), format, index="uint16", block=block)
    assert from_dense(np.zeros(shape, np.float32), format, block=block).indices.dtype == np.int32


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "coo"}, "unknown sparse format 'coo'"),
        ({"values": "bf16"}, "unknown sparse values 'bf16'"),
        ({"index": "int64"}, "unknown sparse index 'int64'"),
        ({"block": (0, 4)}, "block rows must be at least 1"),
        ({"block": (4, -1)}, "block columns must be at least 1"),
        ({"block": (4,)}, "must be \\(rows, columns\\)"),
        ({"block": (2.5, 2)}, "must be an integer"),
        ({"slice_height": 0}, "slice_height must be at least 1"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    options = {"format": "csr"} | kwargs
    with pytest.raises(BadInput, match=message):
        from_dense(np.eye(3, dtype=np.float32), **options)


@pytest.mark.parametrize("w", [np.ones(4), np.ones((2, 2, 2)), np.float32(1)])
def test_non_matrix_is_refused(w):
    with pytest.raises(BadInput, match="2-D matrix"):
        from_dense(w, "csr")


def test_fp16_overflow_is_refused():
    with pytest.raises(BadInput, match="beyond float16's range"):
        from_dense(np.array([[1.0, 70000.0]], np.float32), "csr", values="fp16")
    m = from_dense(np.array([[np.inf, 65519.0]], np.float32), "csr", values="fp16")  # inf stays inf
    np.testing.assert_array_equal(to_dense(m), [[np.inf, 65504.0]])


def test_complex_and_non_finite_int8_are_refused():
    with pytest.raises(BadInput, match="real numbers"):
        from_dense(np.ones((2, 2), np.complex64), "csr")
    with pytest.raises(BadInput, match="finite"):
        from_dense(np.array([[1.0, np.inf]], np.float32), "csr", values="int8")


def test_inconsistent_arrays_are_refused():
    good = from_dense(HAND_SELL, "csr")
    with pytest.raises(BadInput, match="indptr must be int32 \\[6\\]"):
        SparseMatrix("csr", (5, 6), good.data, good.indices, good.indptr[:-1])
    with pytest.raises(BadInput, match="indices dtype int64"):
        SparseMatrix("csr", (5, 6), good.data, good.indices.astype(np.int64), good.indptr)
    with pytest.raises(BadInput, match="per-row scale goes with int8"):
        SparseMatrix("csr", (5, 6), good.data.astype(np.int8), good.indices, good.indptr)
    with pytest.raises(BadInput, match="values do not match"):
        SparseMatrix("csr", (5, 6), good.data[:-1], good.indices, good.indptr)
    with pytest.raises(BadInput, match="shape \\[N, K\\] of two sizes"):
        SparseMatrix("csr", (5, 6, 1), good.data, good.indices, good.indptr)
    with pytest.raises(BadInput, match="block rows must be at least 1"):
        SparseMatrix("bsr", (5, 6), good.data, good.indices, good.indptr, block=(0, 1))
    with pytest.raises(BadInput, match="unknown sparse format"):
        SparseMatrix("dia", (5, 6), good.data, good.indices, good.indptr)


# ------------------------------------------------------------------------------- properties

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
sparse_entries = st.one_of(st.just(0.0), st.just(0.0), finite32)  # about two zeros in three
matrices = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=11), elements=sparse_entries
)
layouts = st.fixed_dictionaries(
    {
        "format": st.sampled_from(FORMATS),
        "block": st.tuples(st.integers(1, 5), st.integers(1, 5)),
        "slice_height": st.integers(1, 7),
        "index": st.sampled_from(["auto", "int32", "uint16"]),
    }
)


@settings(max_examples=150, deadline=None)
@given(w=matrices, layout=layouts)
def test_fp32_round_trip_is_exact(w, layout):
    m = from_dense(w, **layout)
    np.testing.assert_array_equal(to_dense(m), w)
    assert to_dense(m).dtype == np.float32


fp16_range = st.floats(-65519, 65519, width=32)  # rounds to at most ±65504, float16's largest
fp16_matrices = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=11),
    elements=st.one_of(st.just(0.0), fp16_range),
)


@settings(max_examples=100, deadline=None)
@given(w=fp16_matrices, layout=layouts)
def test_fp16_round_trip_equals_a_cast(w, layout):
    m = from_dense(w, values="fp16", **layout)
    np.testing.assert_array_equal(to_dense(m), w.astype(np.float16).astype(np.float32))


@settings(max_examples=100, deadline=None)
@given(w=matrices, layout=layouts)
def test_int8_round_trip_is_within_half_a_step(w, layout):
    m = from_dense(w, values="int8", **layout)
    peak = np.abs(w).max(axis=1, initial=0)
    tiny = np.finfo(np.float32).smallest_subnormal  # a subnormal peak / 127 would underflow to 0
    expected_scale = np.where(peak > 0, np.maximum(peak / np.float32(127), tiny), 1).astype(np.float32)
    # One ulp less near float32's max; subnormal scales round in absolute steps of `tiny`.
    np.testing.assert_allclose(m.scale, expected_scale, rtol=2**-23, atol=2 * tiny)
    error = np.abs(to_dense(m).astype(np.float64) - w)
    # half a step, plus the float32 rounding of the dequantizing product code * scale
    slack = 2.0**-23 * (np.abs(w.astype(np.float64)) + m.scale[:, None]) + tiny
    assert (error <= m.scale[:, None] / 2 + slack).all()
    assert np.abs(m.data.astype(np.int16)).max(initial=0) <= 127


@settings(max_examples=60, deadline=None)
@given(
    w=matrices,
    format=st.sampled_from(["csr", "csc", "bsr"]),
    block=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_arrays_equal_scipy_on_any_matrix(w, format, block):
    m = from_dense(w, format, block=block)
    for ours, theirs in zip((m.data, m.indices, m.indptr), scipy_arrays(w, format, block), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_int8_scale_of_a_subnormal_row_keeps_its_peak_within_half_a_step():
    # peak / 127 is not representable among the subnormals: rounded down, it would clip the
    # peak's code at 127 and lose 3 steps.
    w = np.array([[1.286e-42, 0.0, 3e-43]], dtype=np.float32)
    m = from_dense(w, "csr", values="int8")
    assert np.abs(m.data.astype(np.int16)).max() <= 127
    assert (np.abs(to_dense(m) - w) <= m.scale[:, None] / 2).all()
