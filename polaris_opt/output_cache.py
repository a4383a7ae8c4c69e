"""Model outputs on evaluation data, cached between runs beside the calibration statistics.

Quality gates compare the output model with the input model on the same data. In CI the input
model and the data rarely change, and the output model is byte-identical when nothing else did,
so a re-run would run both models over the same samples again for the same numbers. Outputs are
therefore stored under a key of (model bytes, data fingerprint, runtime and its version,
threads): any change to the model, the data, the batch size or the runtime is a new key. A file
that cannot be read is ignored and recomputed, never trusted.

Outputs are held whole (samples × output size: a classifier's logits, usually small); the
key files are named `outputs-<key>.npz`, next to the `calibration-<key>.npz` files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT = 1
log = logging.getLogger(__name__)


def outputs_key(model_digest: str, data_fingerprint: str | None, runtime: str, threads: int) -> str | None:
    """The cache key of one model's outputs on one data set; None when the data has no fingerprint."""
    if data_fingerprint is None:
        return None
    key = hashlib.sha256(f"outputs;format={FORMAT}".encode())
    for part in (model_digest, data_fingerprint, runtime, f"threads={threads}"):
        key.update(b"\0" + part.encode())
    return key.hexdigest()[:32]


def cache_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"outputs-{key}.npz"


def load_outputs(folder: Path | None, key: str | None) -> dict[str, np.ndarray] | None:
    """The cached outputs (name -> array, in the model's order), or None when there are none."""
    if folder is None or key is None:
        return None
    path = cache_path(folder, key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != FORMAT:
                return None
            names = data["names"].tolist()
            return {name: data[f"output_{index}"] for index, name in enumerate(names)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring the cached outputs in %s: %s", path, exc)
        return None


def save_outputs(folder: Path | None, key: str | None, outputs: dict[str, np.ndarray]) -> None:
    """Store `outputs` atomically (a temporary file beside the target, then a rename)."""
    if folder is None or key is None:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = cache_path(folder, key)
    # Output names may hold '/' or ':', which zip member names must not: store them apart.
    arrays = {f"output_{index}": value for index, value in enumerate(outputs.values())}
    arrays["names"] = np.array(list(outputs), dtype=str)
    arrays["format"] = np.array(FORMAT)
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
