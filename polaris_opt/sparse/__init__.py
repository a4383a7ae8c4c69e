"""Sparse weight storage for the ai.polaris ops: formats laid out like scipy's (`data, indices, indptr`)
and, beside them, the per-layer choice of format (cost.py).

The `sparsify` pass (passes/sparsify.py) is built from the modules here: layers.py (which
MatMul/Gemm/Conv nodes qualify, and their bias), rewrite.py (target polaris: SparseMatMul and
SparseConv nodes with fused Add/Relu), qdq_rewrite.py (QDQ layers to QMatMul/QGemm) and
coo_storage.py (target onnxruntime: standard ops with sparse Constant weights).
"""

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
