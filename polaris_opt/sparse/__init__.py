"""Sparse weight storage for the ai.polaris ops: formats laid out like scipy's (`data, indices, indptr`)
and, beside them, the per-layer choice of format (cost.py)."""

from __future__ import annotations

from polaris_opt.sparse.formats import (
    FORMATS,
    INDEX_TYPES,
    VALUE_TYPES,
    SparseMatrix,
    from_dense,
    index_dtype,
    to_dense,
)

__all__ = ["FORMATS", "INDEX_TYPES", "VALUE_TYPES", "SparseMatrix", "from_dense", "index_dtype", "to_dense"]
