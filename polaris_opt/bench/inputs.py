"""The inputs every contender runs on: read from the models, parsed from the command line, made once.

The first dimension of every input is the batch. For each `--batch` value the inputs are made
once and sent to every contender, so all models see the same numbers:

- `random`: drawn from the first model's declared inputs with a seeded generator (the seed and
  the batch pick the stream). Floats are N(0, 1); integers are 0 or 1, since integer inputs are
  usually indices (tokens, positions) and small values stay in range of any table; booleans
  are fair coins. A dynamic dimension other than the batch takes its size from `--shape
  name=AxBxC`, which gives the whole shape; its first number is the batch when no --batch is
  given, and --batch replaces it otherwise.
- an .npz file: one array per input, by name, of the declared element type. Without --batch
  the file's own batch is used (the first dimension of the first input's array); with --batch
  each array is cut to its first B rows, or tiled by repeating its rows in order up to B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from polaris_opt.errors import BadInput

Dim = int | str | None  # a static size, a named dynamic dimension, or an unnamed dynamic one


@dataclass(frozen=True)
class DeclaredInput:
    """A model input as its graph declares it; `dims` is None when even the rank is unknown."""

    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...] | None

    def shown(self) -> str:
        """The shape as a user reads it: [batch, 3, 32, 32]; '?' for an unnamed dynamic dim."""
        if self.dims is None:
            return "[unknown rank]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def declared_inputs(model: onnx.ModelProto, path: Path) -> tuple[DeclaredInput, ...]:
    """The graph's inputs that are fed at run time (old exports list initializers as inputs too)."""
    weights = {t.name for t in model.graph.initializer}
    weights |= {t.values.name for t in model.graph.sparse_initializer}
    return tuple(_declared(value, path) for value in model.graph.input if value.name not in weights)


def _declared(value: onnx.ValueInfoProto, path: Path) -> DeclaredInput:
    if not value.type.HasField("tensor_type"):
        raise BadInput(f"{path}: input '{value.name}' is not a tensor; bench feeds tensors only")
    tensor = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError, ValueError):
        raise BadInput(
            f"{path}: input '{value.name}' has element type {tensor.elem_type}, which bench cannot feed"
        ) from None
    if not tensor.HasField("shape"):
        return DeclaredInput(value.name, dtype, None)
    dims = tuple(_dim(d) for d in tensor.shape.dim)
    return DeclaredInput(value.name, dtype, dims)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


# ------------------------------------------------------------------------ the models agree


def check_same_inputs(models: list[tuple[Path, tuple[DeclaredInput, ...]]]) -> None:
    """Refuse models whose inputs differ in names, element types, rank or a static size."""
    (first_path, first), *others = models
    by_name = {declared.name: declared for declared in first}
    for path, inputs in others:
        names = sorted(declared.name for declared in inputs)
        if names != sorted(by_name):
            raise BadInput(
                f"{path}: inputs {', '.join(names)} differ from {first_path}'s {', '.join(sorted(by_name))}; "
                "bench compares models that take the same inputs"
            )
        for declared in inputs:
            _check_same_input(by_name[declared.name], declared, first_path, path)


def _check_same_input(first: DeclaredInput, other: DeclaredInput, first_path: Path, path: Path) -> None:
    where = f"{path}: input '{other.name}'"
    if other.dtype != first.dtype:
        raise BadInput(f"{where} is {other.dtype}, but {first_path} takes {first.dtype}")
    if first.dims is None or other.dims is None:
        return
    if len(first.dims) != len(other.dims) or any(
        isinstance(a, int) and isinstance(b, int) and a != b
        for a, b in zip(first.dims, other.dims, strict=True)
    ):
        raise BadInput(f"{where} has shape {other.shown()}, but {first_path} takes {first.shown()}")


# ----------------------------------------------------------------------- the command line


def parse_batches(text: str) -> list[int]:
    """`--batch 1,8,32` → [1, 8, 32]: positive whole numbers, each once."""
    usage = f"--batch '{text}': expected positive whole numbers separated by commas, e.g. 1,8,32"
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise BadInput(usage)
    batches = [int(part) for part in parts]
    if min(batches) < 1:
        raise BadInput(usage)
    repeated = sorted({b for b in batches if batches.count(b) > 1})
    if repeated:
        raise BadInput(f"--batch '{text}': batch {repeated[0]} is given twice")
    return batches


def parse_shapes(texts: list[str], inputs: tuple[DeclaredInput, ...]) -> dict[str, tuple[int, ...]]:
    """`--shape input=1x3x224x224` (repeatable) → {"input": (1, 3, 224, 224)}, checked against `inputs`."""
    known = {declared.name: declared for declared in inputs}
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts:
        name, shape = _parse_shape(text)
        if name not in known:
            raise BadInput(
                f"--shape '{text}': the models have no input '{name}' (inputs: {', '.join(known)})"
            )
        if name in shapes:
            raise BadInput(f"--shape '{text}': input '{name}' is given a shape twice")
        _check_shape_fits(known[name], shape, f"--shape '{text}'")
        shapes[name] = shape
    return shapes


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, equals, dims = text.rpartition("=")
    parts = dims.strip().lower().split("x")
    if not equals or not name.strip() or not all(part.strip().isdigit() for part in parts):
        raise BadInput(f"--shape '{text}': expected NAME=AxBxC with whole numbers, e.g. input=1x3x224x224")
    shape = tuple(int(part) for part in parts)
    if min(shape) < 1:
        raise BadInput(f"--shape '{text}': every size must be at least 1")
    return name.strip(), shape


def _check_shape_fits(declared: DeclaredInput, shape: tuple[int, ...], where: str) -> None:
    """A given shape has the declared rank and every static size but the batch's (which --batch sets)."""
    if declared.dims is None:
        return
    fixed = [(axis, size) for axis, size in enumerate(declared.dims) if isinstance(size, int) and axis > 0]
    if len(shape) != len(declared.dims) or any(shape[axis] != size for axis, size in fixed):
        raise BadInput(f"{where}: input '{declared.name}' takes {declared.shown()}")
