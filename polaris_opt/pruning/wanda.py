"""Wanda scores (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
Models"): a weight matters as much as |W_ij|·‖X_j‖₂, its size times the size of the input it
multiplies over the calibration data.

Magnitude alone prunes small weights that sit on large inputs; Wanda keeps them. Its paper
compares weights within each output (row), which is `select(..., per_row=True)` in the prune
pass. ‖X_j‖₂² is Σ x_j², the diagonal of XᵀX (polaris_opt.pruning.activations); a grouped
Conv has one set of norms per group, and the rows of group g (output channels
[g·O/G, (g+1)·O/G)) are scored with group g's norms.
"""

from __future__ import annotations

import numpy as np


def wanda_scores(matrix: np.ndarray, sq_norms: np.ndarray) -> np.ndarray:
    """|W_ij|·‖X_j‖₂ for `matrix` [rows, K] and `sq_norms` [G, K] (Σx², G groups of rows/G rows).

    float32 scores for a float32 or float16 matrix (the same precision as the weights they
    rank), float64 for a float64 one.
    """
    sq_norms = np.asarray(sq_norms)
    if matrix.ndim != 2 or sq_norms.ndim != 2 or sq_norms.shape[1] != matrix.shape[1]:
        raise ValueError(
            f"wanda_scores: sq_norms {sq_norms.shape} does not fit a matrix of shape {matrix.shape}"
        )
    groups = sq_norms.shape[0]
    if groups == 0 or matrix.shape[0] % groups:
        raise ValueError(f"wanda_scores: {matrix.shape[0]} rows cannot be split into {groups} groups")
    if np.any(sq_norms < 0) or not np.all(np.isfinite(sq_norms)):
        raise ValueError("wanda_scores: sq_norms must be finite and not negative")
    dtype = np.float64 if matrix.dtype == np.float64 else np.float32
    norms = np.sqrt(sq_norms).astype(dtype)
    by_group = np.abs(matrix).astype(dtype, copy=False).reshape(groups, -1, matrix.shape[1])
    return (by_group * norms[:, None, :]).reshape(matrix.shape)
