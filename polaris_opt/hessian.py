"""Layer-input Hessians H = XᵀX from calibration data, accumulated batch by batch.

For a linear layer y = x·W, the squared output error that a change ΔW causes over the data is
Σ‖x·ΔW‖² = tr(ΔWᵀ·H·ΔW) with H = XᵀX, X the layer's inputs stacked as rows. GPTQ reads its
error-spreading weights from H⁻¹; pruning methods (OBS, SparseGPT, Wanda's ‖x_k‖ = √H_kk) read
it too. X is the MatMul's A with its leading dimensions flattened: every token or sample is a
row.

H is summed in float64 over batches and each batch is dropped once added, so memory is
K² per layer whatever the amount of data; one ONNX Runtime session serves every layer
(polaris_opt.capture).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from polaris_opt.capture import stream_tensors
from polaris_opt.passes_api import Progress, no_progress


@dataclass
class Hessian:
    """Running XᵀX of one layer input, and how many rows of X went into it."""

    features: int
    matrix: np.ndarray = field(init=False)
    rows: int = 0

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.features, self.features), dtype=np.float64)

    def add(self, activation: np.ndarray) -> None:
        """Add a batch of inputs [..., K]: each vector along the last axis is one row of X."""
        if activation.ndim == 0 or activation.shape[-1] != self.features:
            raise ValueError(f"activation of shape {activation.shape}; expected [..., {self.features}]")
        rows = activation.reshape(-1, self.features).astype(np.float64)
        self.matrix += rows.T @ rows
        self.rows += rows.shape[0]


def collect_hessians(
    model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    inputs: Sequence[str],
    *,
    threads: int = 1,
    progress: Progress = no_progress,
    total: int | None = None,
) -> dict[str, tuple[np.ndarray, int]]:
    """(H [K, K] float64, rows) for each tensor of `inputs`, from one pass over `batches`.

    `inputs` are main-graph tensors (layer inputs, graph inputs included); K is each one's last
    dimension, read from the first batch.
    """
    hessians: dict[str, Hessian] = {}
    stream = stream_tensors(
        model,
        batches,
        inputs,
        threads=threads,
        progress=progress,
        description="collecting Hessians",
        total=total,
    )
    for values in stream:
        for name in inputs:
            if name not in values:
                continue  # neither computed by the session nor fed: nothing to add
            activation = np.asarray(values[name])
            if name not in hessians:
                hessians[name] = Hessian(activation.shape[-1] if activation.ndim else 1)
            hessians[name].add(activation)
    return {name: (h.matrix, h.rows) for name, h in hessians.items()}
