"""Launchers: each ai.polaris op type run as OpenCL kernels (base.py holds the contract).

Importing this package fills LAUNCHERS: each module registers its launchers with `register`,
sparse.py for SparseMatMul and SparseConv, quant.py for QMatMul, QGemm and MatMulInt4.
"""

from __future__ import annotations

from polaris_opt.runtime.launchers import quant, sparse
from polaris_opt.runtime.launchers.base import LAUNCHERS, Launcher, register

__all__ = ["LAUNCHERS", "Launcher", "quant", "register", "sparse"]
