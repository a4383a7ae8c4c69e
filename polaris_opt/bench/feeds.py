"""Make the input arrays of one batch, random or from an .npz file (polaris_opt/bench/inputs.py says how)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from polaris_opt.bench.inputs import DeclaredInput, Dim
from polaris_opt.errors import BadInput

Feeds = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------ random


def random_batch(inputs: tuple[DeclaredInput, ...], shapes: dict[str, tuple[int, ...]]) -> int:
    """The batch when no --batch is given: the first input's --shape, its static size, else 1."""
    if not inputs:
        return 1
    first = inputs[0]
    if first.name in shapes:
        return shapes[first.name][0]
    if first.dims and isinstance(first.dims[0], int):
        return first.dims[0]
    return 1


def random_feeds(
    inputs: tuple[DeclaredInput, ...], shapes: dict[str, tuple[int, ...]], batch: int, seed: int
) -> Feeds:
    """Seeded random arrays for `inputs` at `batch`: the same (seed, batch) gives the same arrays."""
    rng = np.random.default_rng([seed, batch])
    return {d.name: _random_array(rng, d, _random_shape(d, shapes.get(d.name), batch)) for d in inputs}


def _random_shape(declared: DeclaredInput, given: tuple[int, ...] | None, batch: int) -> tuple[int, ...]:
    dims: tuple[Dim, ...] | None = declared.dims
    if dims is None:
        if given is None:
            raise BadInput(
                f"input '{declared.name}' declares no shape: give one with --shape {declared.name}=AxBxC"
            )
        dims = given
    sizes = []
    for axis, dim in enumerate(dims):
        if axis == 0:
            sizes.append(_batch_size(declared, dim, batch))
        elif isinstance(dim, int):
            sizes.append(dim)
        elif given is not None:
            sizes.append(given[axis])
        else:
            raise BadInput(
                f"input '{declared.name}' {declared.shown()}: dimension {axis} ('{dim or '?'}') is dynamic; "
                f"set it with --shape {declared.name}={_shape_hint(declared.dims)}"
            )
    return tuple(sizes)


def _batch_size(declared: DeclaredInput, dim: Dim, batch: int) -> int:
    if isinstance(dim, int) and dim != batch:
        raise BadInput(
            f"input '{declared.name}' has a fixed first dimension {dim}, so it cannot take batch {batch}"
        )
    return batch


def _shape_hint(dims: tuple[Dim, ...]) -> str:
    return "x".join(str(dim) if isinstance(dim, int) else "N" for dim in dims)


def _random_array(rng: np.random.Generator, declared: DeclaredInput, shape: tuple[int, ...]) -> np.ndarray:
    kind = declared.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(declared.dtype)
    if kind in "iub":
        return rng.integers(0, 2, shape).astype(declared.dtype)
    raise BadInput(
        f"input '{declared.name}' is {declared.dtype}, which has no random values; give --input FILE.npz"
    )


# -------------------------------------------------------------------------------------- file


def load_npz(path: Path) -> Feeds:
    """The arrays of an .npz file by name; never unpickles (the file may come from a stranger)."""
    if not path.is_file():
        raise BadInput(f"--input {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise BadInput(f"--input {path}: a single .npy array; give an .npz with one array per input")
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"--input {path}: not a readable .npz of input arrays ({exc})") from None


def file_batch(arrays: Feeds, inputs: tuple[DeclaredInput, ...]) -> int:
    """The file's own batch: the first dimension of the first input's array (1 for a scalar)."""
    first = arrays.get(inputs[0].name) if inputs else None
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def file_feeds(arrays: Feeds, inputs: tuple[DeclaredInput, ...], batch: int, path: Path) -> Feeds:
    """The file's arrays for `inputs`, each cut or tiled along its first dimension to `batch` rows."""
    feeds = {}
    for declared in inputs:
        if declared.name not in arrays:
            held = ", ".join(arrays) or "no arrays"
            raise BadInput(
                f"--input {path}: no array '{declared.name}' for the models' input (it holds {held})"
            )
        array = arrays[declared.name]
        if array.dtype != declared.dtype:
            raise BadInput(
                f"--input {path}: '{declared.name}' is {array.dtype}, the models take {declared.dtype}"
            )
        feeds[declared.name] = _rows(array, batch, f"--input {path}: '{declared.name}'")
    return feeds


def _rows(array: np.ndarray, batch: int, where: str) -> np.ndarray:
    """`batch` rows of `array`: its first rows, repeated in order when it has fewer."""
    if array.ndim == 0:
        return array
    if array.shape[0] == 0:
        raise BadInput(f"{where} has no rows to run on")
    return np.ascontiguousarray(np.take(array, np.arange(batch) % array.shape[0], axis=0))


def unused_arrays(arrays: Feeds, inputs: tuple[DeclaredInput, ...]) -> list[str]:
    names = {declared.name for declared in inputs}
    return [name for name in arrays if name not in names]


# -------------------------------------------------------------------------------- all models


def check_feeds_fit(path: Path, inputs: tuple[DeclaredInput, ...], feeds: Feeds) -> None:
    """Refuse arrays that a model cannot take: another rank, or another size where it declares one."""
    for declared in inputs:
        shape = feeds[declared.name].shape
        if declared.dims is None:
            continue
        fits = len(shape) == len(declared.dims) and all(
            not isinstance(dim, int) or dim == size for dim, size in zip(declared.dims, shape, strict=True)
        )
        if not fits:
            raise BadInput(
                f"{path}: input '{declared.name}' takes {declared.shown()}, but the inputs have shape "
                f"{list(shape)}"
            )
