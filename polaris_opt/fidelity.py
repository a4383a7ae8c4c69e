"""How close an optimized model stays to its reference: SQNR, cosine similarity, top-1 agreement.

Accumulated batch by batch (signal and noise energies, dot products, counts), so a fidelity
figure over any amount of data costs constant memory, and the figures over a split data set
add up to the figure over the whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class Agreement:
    """Running sums that give SQNR, cosine similarity and top-1 agreement of `got` against `ref`."""

    signal: float = 0.0  # Σ ref²
    noise: float = 0.0  # Σ (ref - got)²
    dot: float = 0.0  # Σ ref·got
    got_energy: float = 0.0  # Σ got²
    max_abs_error: float = 0.0
    rows: int = 0
    top1_same: int = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref64 = np.asarray(ref, dtype=np.float64)
        got64 = np.asarray(got, dtype=np.float64)
        if ref64.shape != got64.shape:
            raise ValueError(f"shapes differ: {got64.shape} against reference {ref64.shape}")
        diff = ref64 - got64
        self.signal += float(np.sum(ref64 * ref64))
        self.noise += float(np.sum(diff * diff))
        self.dot += float(np.sum(ref64 * got64))
        self.got_energy += float(np.sum(got64 * got64))
        self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(diff), initial=0.0)))
        if ref64.ndim >= 2 and ref64.shape[-1] > 1:
            ref_rows = ref64.reshape(-1, ref64.shape[-1])
            got_rows = got64.reshape(-1, got64.shape[-1])
            self.rows += ref_rows.shape[0]
            self.top1_same += int(np.sum(ref_rows.argmax(axis=1) == got_rows.argmax(axis=1)))

    @property
    def sqnr_db(self) -> float:
        return sqnr_from_energies(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        denominator = math.sqrt(self.signal * self.got_energy)
        if denominator == 0.0:
            return 1.0 if self.signal == self.got_energy else 0.0
        return self.dot / denominator

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_same / self.rows if self.rows else None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "sqnr_db": self.sqnr_db,
            "cosine": self.cosine,
            "top1_agreement": self.top1_agreement,
            "max_abs_error": self.max_abs_error,
        }


def sqnr_from_energies(signal: float, noise: float) -> float:
    """10·log10(signal/noise) in dB; +inf when there is no noise at all."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    agreement = Agreement()
    agreement.add(ref, got)
    return agreement.sqnr_db


def compare_models(
    reference,
    candidate,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    outputs: list[str] | None = None,
) -> dict[str, Agreement]:
    """Per output, how `candidate` agrees with `reference` over `batches` (sessions or anything with
    ONNX Runtime's `run(names, feeds)`)."""
    names = outputs or [o.name for o in reference.get_outputs()]
    agreements = {name: Agreement() for name in names}
    for batch in batches:
        ref_values = reference.run(names, batch)
        got_values = candidate.run(names, _as_declared(candidate, batch))
        for name, ref, got in zip(names, ref_values, got_values, strict=True):
            agreements[name].add(ref, got)
    return agreements


_DECLARED = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _as_declared(session, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with float inputs cast to the session's declared types (an FP16 model whose
    inputs became float16 is fed the same data as its float32 reference)."""
    types = {i.name: _DECLARED.get(i.type) for i in session.get_inputs()}
    return {
        name: value.astype(types[name]) if types.get(name) and value.dtype.kind == "f" else value
        for name, value in batch.items()
    }


def overall(agreements: dict[str, Agreement]) -> Agreement:
    """All outputs' sums pooled: one figure for the whole model."""
    pooled = Agreement()
    for agreement in agreements.values():
        pooled.signal += agreement.signal
        pooled.noise += agreement.noise
        pooled.dot += agreement.dot
        pooled.got_energy += agreement.got_energy
        pooled.max_abs_error = max(pooled.max_abs_error, agreement.max_abs_error)
        pooled.rows += agreement.rows
        pooled.top1_same += agreement.top1_same
    return pooled


def top1_accuracy(session, batches: Iterable[dict[str, np.ndarray]], labels: np.ndarray) -> float:
    """Top-1 accuracy of the session's first output against `labels`, batch after batch."""
    name = session.get_outputs()[0].name
    correct = seen = 0
    for batch in batches:
        logits = session.run([name], batch)[0]
        predicted = logits.reshape(logits.shape[0], -1).argmax(axis=1)
        correct += int(np.sum(predicted == labels[seen : seen + len(predicted)]))
        seen += len(predicted)
    if seen != len(labels):
        raise ValueError(f"{seen} predictions for {len(labels)} labels")
    return correct / seen
