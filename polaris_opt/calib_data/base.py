"""What the model takes (InputSpec) and the base every calibration source builds on."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from polaris_opt.errors import BadInput

# One batch: input name -> array whose first dimension counts samples.
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: dims are ints, or None where dynamic; `shape` is None when the
    model declares no rank at all."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype

    def describe(self) -> str:
        """'float32 [batch, 1, 8, 8]': a dynamic first dim is the batch, later dynamic dims are '?'."""
        if self.shape is None:
            return f"{self.dtype.name} [any shape]"
        dims = [
            str(d) if d is not None else "batch" if axis == 0 else "?" for axis, d in enumerate(self.shape)
        ]
        return f"{self.dtype.name} [{', '.join(dims)}]"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether data of `shape` (its first dim counts samples) has the declared rank and dims."""
        if self.shape is None:
            return len(shape) >= 1
        if len(shape) != len(self.shape):
            return False
        return all(d is None or d == given for d, given in zip(self.shape[1:], shape[1:], strict=True))


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers (those have defaults)."""
    weights = {t.name for t in model.graph.initializer}
    return [_input_spec(value) for value in model.graph.input if value.name not in weights]


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    if not value.type.HasField("tensor_type"):
        raise BadInput(f"model input '{value.name}' is not a tensor; calibration data can only feed tensors")
    tensor = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except KeyError:
        raise BadInput(
            f"model input '{value.name}' declares no element type; fix the model's inputs"
        ) from None
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return InputSpec(value.name, shape, dtype)


def input_names(inputs: list[InputSpec]) -> str:
    """'x, ids': the inputs as error messages list them."""
    return ", ".join(spec.name for spec in inputs)


class CalibrationSource(ABC):
    """Base of every calibration source.

    `batches()` starts again from the first batch each time it is called, so several passes can
    read the same data. `fingerprint()` is a content hash for the statistics cache, or None
    when the data cannot be hashed (a Python reader), which turns caching off.
    """

    # False for `--calib random`: results computed from it are not to be trusted.
    trustworthy: bool = True

    @abstractmethod
    def batches(self) -> Iterator[dict[str, np.ndarray]]:  # pragma: no cover - abstract
        """The batches, starting again from the first at each call."""

    def fingerprint(self) -> str | None:
        return None

    @property
    def num_batches(self) -> int | None:
        """How many batches `batches()` yields, when known (for progress bars)."""
        return None

    @property
    def num_samples(self) -> int | None:
        """How many samples the batches hold in all, when known."""
        return None

    @property
    def warnings(self) -> list[str]:
        """What the user should be told about this data (random data, samples left out)."""
        # Made on first use, so a subclass written elsewhere need not call a base __init__.
        return self.__dict__.setdefault("_warnings", [])

    def describe(self) -> str:
        """A short line for logs and reports: what the data is and how much of it."""
        return type(self).__name__
