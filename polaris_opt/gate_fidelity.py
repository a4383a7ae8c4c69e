"""Fidelity of a compiled model against its input model, for quality gates and reports.

The data, in order of preference: `--eval DATA.npz` (inputs by name, plus labels for top-1
accuracy), the calibration data, the `--input` samples, and last seeded random inputs from the
declared shapes (which say nothing about real data: the caller warns). Models run on ONNX
Runtime, or on polaris_opt.runtime.Session with every ai.polaris node on the host when they
hold such nodes: the NumPy references are those ops' semantics, they repeat exactly, and a CI
machine then builds no OpenCL program. Each model's outputs are cached (polaris_opt.output_cache),
so a CI re-run on the same model and data runs neither model again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from polaris_opt.calib_data import CalibrationSource, model_inputs, open_calibration
from polaris_opt.calib_data.batching import check_arrays
from polaris_opt.errors import BadInput
from polaris_opt.fidelity import Agreement, overall
from polaris_opt.output_cache import load_outputs, outputs_key, save_outputs
from polaris_opt.passes_api import Progress, no_progress

# Samples per run of a model over --eval or --input data (calibration data keeps its batches).
EVAL_BATCH = 64
# Without any data: this many batches of EVAL_BATCH seeded random samples.
RANDOM_BATCHES = 1
LABEL_NAMES = ("labels", "y")
_DECLARED = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class FidelityData:
    """The samples fidelity is measured on, their labels when known, and what they are."""

    source: CalibrationSource
    what: str  # "--eval digits.eval.npz (450 samples, labels 'labels')", for the output
    labels: np.ndarray | None = None
    trustworthy: bool = True  # False for random inputs
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelFile:
    """A model to run: its file, and whether it holds ai.polaris nodes (run by our Session)."""

    path: Path
    polaris: bool

    @cached_property
    def files(self) -> list[Path]:
        """The model file and its external-data files: what the model is, byte for byte."""
        from polaris_opt.graph_io import iter_model_tensors

        header = onnx.load(str(self.path), load_external_data=False)
        locations = {
            entry.value
            for tensor in iter_model_tensors(header)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
        return [self.path, *(self.path.parent / location for location in sorted(locations))]

    def stored_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def digest(self) -> str:
        import hashlib

        from polaris_opt.calib_data.rows import hash_file

        digest = hashlib.sha256()
        for path in self.files:
            hash_file(digest, path)
        return digest.hexdigest()


# ------------------------------------------------------------------------------------ the data


def load_eval_data(path: Path, model: onnx.ModelProto) -> FidelityData:
    """`--eval DATA.npz`: the model's inputs by name, and labels (see `label_name`) when present."""
    arrays = _read_npz(path)
    inputs = model_inputs(model)
    names = [spec.name for spec in inputs]
    missing = [name for name in names if name not in arrays]
    if missing:
        held = ", ".join(sorted(arrays)) or "nothing"
        raise BadInput(f"--eval {path}: no array for the model's input '{missing[0]}' (it holds {held})")
    found = label_name(arrays, names)
    labels = arrays.pop(found) if found else None
    given = {name: arrays[name] for name in names}
    extra = sorted(name for name in arrays if name not in names)
    check_arrays(inputs, given, f"--eval {path}")  # dtype and shape of each input, equal sample counts
    _check_finite(given, path)
    source = open_calibration(given, model, batch_size=EVAL_BATCH)
    source.where = f"--eval {path}"  # how its errors (NaN in a batch) name the data
    samples = source.num_samples
    data = FidelityData(source, f"--eval {path.name} ({samples} samples)")
    if labels is not None:
        data.labels = _checked_labels(labels, found, len(next(iter(given.values()))), path)[:samples]
        data.what = f"--eval {path.name} ({samples} samples, labels '{found}')"
    if extra:
        data.warnings.append(f"--eval {path}: ignoring {', '.join(extra)} (neither a model input nor labels)")
    data.warnings.extend(source.warnings)
    return data


def label_name(arrays: dict[str, Any], input_names: list[str]) -> str | None:
    """Which array holds the labels: 'labels', else 'y', else the one array (of several) that is
    not named after a model input; None when there is no such array or several candidates."""
    for name in LABEL_NAMES:
        if name in arrays and name not in input_names:
            return name
    others = [name for name in arrays if name not in input_names]
    return others[0] if len(arrays) > 1 and len(others) == 1 else None


def choose_data(
    eval_data: FidelityData | None,
    calib: CalibrationSource | None,
    feeds: dict[str, np.ndarray] | None,
    model: onnx.ModelProto,
    *,
    seed: int,
) -> FidelityData:
    """--eval data, else the calibration data, else the --input samples, else random inputs."""
    if eval_data is not None:
        return eval_data
    if calib is not None:
        return FidelityData(
            calib, f"the calibration data ({calib.describe()})", trustworthy=calib.trustworthy
        )
    if feeds:
        source = open_calibration(feeds, model, batch_size=EVAL_BATCH)
        return FidelityData(source, f"the --input samples ({source.num_samples} samples)")
    try:
        source = open_calibration(
            "random", model, batch_size=EVAL_BATCH, seed=seed, random_batches=RANDOM_BATCHES
        )
    except BadInput as exc:
        raise BadInput(f"no data to measure fidelity on: give --eval DATA.npz ({exc})") from None
    return FidelityData(
        source, f"random inputs (seed {seed}, {source.num_samples} samples)", trustworthy=False
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy file: one unnamed array
            raise ValueError("a single array, not an archive of named arrays")
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"--eval {path}: not a readable .npz of named arrays ({exc})") from None


def _check_finite(arrays: dict[str, np.ndarray], path: Path) -> None:
    """NaN or Inf would poison every figure: refused now, before any pass runs, naming the sample."""
    for name, array in arrays.items():
        if array.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
            if bad.size:
                raise BadInput(
                    f"--eval {path}: input '{name}' holds NaN or Inf in sample {bad[0]} (counting from 0)"
                )


def _checked_labels(labels: np.ndarray, name: str, samples: int, path: Path) -> np.ndarray:
    flat = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if flat.ndim != 1 or flat.dtype.kind not in "iu":
        raise BadInput(
            f"--eval {path}: labels '{name}' must be one integer class per sample, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if len(flat) != samples:
        raise BadInput(f"--eval {path}: {len(flat)} labels in '{name}' for {samples} samples")
    return flat


# ----------------------------------------------------------------------------------- measuring


def measure(
    reference: ModelFile,
    candidate: ModelFile,
    data: FidelityData,
    *,
    cache_dir: Path | None = None,
    threads: int = 1,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """SQNR, cosine, top-1 agreement, max abs error of `candidate` against `reference` on `data`,
    top-1 accuracy of both when `data` has labels, and how it was measured."""
    ref, ref_cached = model_outputs(reference, data, cache_dir=cache_dir, threads=threads, progress=progress)
    got, got_cached = model_outputs(candidate, data, cache_dir=cache_dir, threads=threads, progress=progress)
    figures, problem = compare(ref, got)
    result: dict[str, Any] = {
        **figures,
        "top1_accuracy": None,
        "top1_accuracy_reference": None,
        "samples": data.source.num_samples,
        "data": data.what,
        "cached": {"reference": ref_cached, "output": got_cached},
        "problem": problem,
    }
    if data.labels is not None and problem is None:
        first = next(iter(ref))
        result["top1_accuracy_reference"] = accuracy(ref[first], data.labels)
        result["top1_accuracy"] = accuracy(got[first], data.labels)
    return result


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[dict[str, Any], str | None]:
    """The pooled agreement figures over every output of the reference; all None, with the reason,
    when the candidate lacks an output or gives it another shape."""
    agreements = {}
    for name, expected in ref.items():
        if name not in got or got[name].shape != expected.shape:
            shape = got[name].shape if name in got else "missing"
            problem = f"output '{name}' is {shape} in the output model, {expected.shape} in the input model"
            return dict.fromkeys(("sqnr_db", "cosine", "top1_agreement", "max_abs_error")), problem
        agreements[name] = Agreement()
        agreements[name].add(expected, got[name])
    return overall(agreements).as_dict(), None


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy of `logits` (one row of class scores per sample) against `labels`."""
    if logits.ndim == 0 or logits.shape[0] != len(labels):
        return None
    predicted = logits.reshape(len(labels), -1).argmax(axis=1)
    return float(np.mean(predicted == labels))


def model_outputs(
    model: ModelFile, data: FidelityData, *, cache_dir: Path | None, threads: int, progress: Progress
) -> tuple[dict[str, np.ndarray], bool]:
    """Every output of `model` over all of `data`, and whether they came from the cache."""
    key = None
    if cache_dir is not None:
        key = outputs_key(model.digest(), data.source.fingerprint(), runtime_tag(model), threads)
    cached = load_outputs(cache_dir, key)
    if cached is not None:
        return cached, True
    session = open_runner(model, threads)
    total = data.source.num_batches
    with progress(f"running {model.path.name}", total) as advance:
        outputs = run_all(session, data.source.batches(), advance)
    save_outputs(cache_dir, key, outputs)
    return outputs, False


def runtime_tag(model: ModelFile) -> str:
    """What runs `model`, with versions: outputs may change with either."""
    import onnxruntime

    from polaris_opt import __version__

    tag = f"onnxruntime {onnxruntime.__version__}"
    return f"{tag}; polaris-opt {__version__} host references" if model.polaris else tag


def open_runner(model: ModelFile, threads: int):
    """An ONNX Runtime session, or for a model with ai.polaris nodes a Session running them on the host."""
    if model.polaris:
        from polaris_opt.runtime import Session

        return Session(model.path, threads=threads, placement="host")
    from polaris_opt.numerics import make_session

    return make_session(str(model.path), threads=threads)


def run_all(
    session, batches: Iterator[dict[str, np.ndarray]], advance: Callable[..., None]
) -> dict[str, np.ndarray]:
    """The session's outputs over every batch, joined along the batch axis."""
    names = [output.name for output in session.get_outputs()]
    types = {arg.name: _DECLARED.get(arg.type) for arg in session.get_inputs()}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        # A float16 model (convert-fp16 without keep-io-types) is fed the same data, cast.
        feeds = {
            name: value.astype(types[name]) if types.get(name) and value.dtype.kind == "f" else value
            for name, value in batch.items()
        }
        for name, value in zip(names, session.run(names, feeds), strict=True):
            parts[name].append(np.atleast_1d(value))
        advance(1)
    return {name: np.concatenate(values) for name, values in parts.items()}
