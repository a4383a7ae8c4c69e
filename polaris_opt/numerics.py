"""One place for ONNX Runtime sessions, sample inputs and output comparison.

Calibration, constant folding, numeric verification and the tests all run models through
`make_session` and compare through `compare_outputs`, so tolerances are stated once, per dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class Tolerance:
    """`max|got - ref| <= atol + rtol * max|ref|`: error relative to the tensor's own scale."""

    rtol: float
    atol: float


TOLERANCES: dict[np.dtype, Tolerance] = {
    np.dtype(np.float64): Tolerance(rtol=1e-9, atol=1e-12),
    np.dtype(np.float32): Tolerance(rtol=1e-4, atol=1e-6),
    np.dtype(np.float16): Tolerance(rtol=1e-2, atol=1e-3),
}
EXACT = Tolerance(rtol=0.0, atol=0.0)  # integers and booleans must match exactly


def tolerance_for(dtype: np.dtype) -> Tolerance:
    return TOLERANCES.get(np.dtype(dtype), EXACT)


def make_session(model: onnx.ModelProto | bytes | str, *, threads: int = 1, optimize: bool = True):
    """A CPU ONNX Runtime session with a fixed thread count (so timings and results repeat)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_model(model, feeds: dict[str, np.ndarray], *, threads: int = 1) -> dict[str, np.ndarray]:
    session = model if hasattr(model, "run") else make_session(model, threads=threads)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def sample_inputs(session, *, seed: int = 0, dynamic_size: int = 1) -> dict[str, np.ndarray]:
    """Random inputs from the declared shapes; a dynamic dimension takes `dynamic_size`.

    Integer inputs are drawn from {0, 1}: they are usually indices (tokens, positions), and
    small values stay in range for any table.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for declared in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else dynamic_size for d in declared.shape]
        dtype = _ONNX_TO_NUMPY.get(declared.type)
        if dtype is None:
            raise ValueError(f"input '{declared.name}' has type {declared.type}, which has no sampler")
        if np.issubdtype(dtype, np.floating):
            feeds[declared.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[declared.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[declared.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


@dataclass(frozen=True)
class Mismatch:
    output: str
    reason: str

    def __str__(self) -> str:
        return f"output '{self.output}': {self.reason}"


def compare_outputs(
    reference: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerances=None
) -> list[Mismatch]:
    """Mismatches between two runs' outputs; empty when every output is within tolerance."""
    mismatches = []
    for name, ref in reference.items():
        if name not in got:
            mismatches.append(Mismatch(name, "missing"))
            continue
        reason = _compare(np.asarray(ref), np.asarray(got[name]), tolerances)
        if reason:
            mismatches.append(Mismatch(name, reason))
    return mismatches


def _compare(ref: np.ndarray, got: np.ndarray, tolerances) -> str | None:
    if ref.shape != got.shape:
        return f"shape {got.shape}, expected {ref.shape}"
    if ref.dtype != got.dtype:
        return f"dtype {got.dtype}, expected {ref.dtype}"
    if ref.size == 0:
        return None
    tol = (tolerances or {}).get(ref.dtype) or tolerance_for(ref.dtype)
    if ref.dtype.kind not in "fc":
        differ = int(np.count_nonzero(ref != got))
        return f"{differ} of {ref.size} values differ" if differ else None
    if not np.array_equal(np.isnan(ref), np.isnan(got)):
        return "NaN in different places"
    finite = np.isfinite(ref)
    if not np.array_equal(ref[~finite], got[~finite]):
        return "infinities differ"
    error = float(np.max(np.abs(ref[finite].astype(np.float64) - got[finite]), initial=0.0))
    scale = float(np.max(np.abs(ref[finite]), initial=0.0))
    if error > tol.atol + tol.rtol * scale:
        return f"max abs error {error:.3g} exceeds {tol.atol:g} + {tol.rtol:g} x {scale:.3g}"
    return None


def relative_error(reference: np.ndarray, got: np.ndarray) -> float:
    """max|got - ref| / max|ref|: the figure the tolerances bound."""
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(reference.astype(np.float64) - got))) / scale
