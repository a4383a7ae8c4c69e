"""The pass contract: what a pass is, what it is given and what it gives back (DESIGN.md §3).

A pass is a frozen dataclass: a kebab-case `name` (its CLI spelling), typed option fields with
their defaults written once, and `run(graph, ctx) -> PassResult`. It keeps no state between
runs and reads no environment; everything it needs arrives in the `PassContext`.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import logging
import typing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from polaris_opt.calib_data import CalibrationSource
    from polaris_opt.calib_stats import CalibrationTable


Stat = int | float | str
# `progress(description, total)` opens a progress bar and yields `advance(n=1)`.
Progress = Callable[[str, "int | None"], AbstractContextManager[Callable[..., None]]]


@contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """The default progress bar: draws nothing."""
    yield lambda n=1: None


@dataclass
class PassContext:
    """What a run of the pipeline shares with its passes."""

    # Folder of the input model: external data and relative paths resolve from here.
    model_dir: Path | None = None
    # Seed for anything random a pass does (sample inputs, tie-breaking), so runs repeat.
    seed: int = 0
    # Folder for cached results (calibration statistics) shared between runs.
    cache_dir: Path | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("polaris_opt"))
    # Where calibration batches come from (--calib); None when the run was given no data.
    calib: CalibrationSource | None = None
    # Written by the `calibrate` pass, read by the passes after it: ranges and statistics per tensor.
    calibration: CalibrationTable | None = None
    # ONNX Runtime intra-op threads for sessions a pass creates (calibration, analysis).
    threads: int = 1
    progress: Progress = no_progress


@dataclass
class PassResult:
    """`modified` says whether the graph changed; `stats` says how, for the per-pass table.

    A pass normally edits the graph in place; one that builds a new graph returns it in `graph`.
    """

    modified: bool
    stats: dict[str, Stat] = field(default_factory=dict)
    graph: gs.Graph | None = None
    # Structured findings for reports and --json (per-layer tables, lists of skipped nodes).
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass(abc.ABC):
    """Base of every pass. Subclasses are `@dataclass(frozen=True)` with typed option fields."""

    name: ClassVar[str] = ""
    # True for passes that change outputs on purpose (quantization, FP16): --verify numeric then
    # checks them against an SQNR floor instead of float tolerances.
    lossy: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Transform `graph` (in place, or return a new one in the result)."""

    @classmethod
    def options(cls) -> list[Option]:
        # get_type_hints resolves the string annotations `from __future__ import annotations` leaves.
        hints = typing.get_type_hints(cls)
        return [Option.from_field(f, hints[f.name]) for f in dataclasses.fields(cls)]

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


@dataclass(frozen=True)
class Option:
    """One typed option of a pass, as the pipeline text spells it (kebab-case)."""

    name: str
    field_name: str
    type: Any
    default: Any
    help: str

    @classmethod
    def from_field(cls, f: dataclasses.Field, kind: Any) -> Option:
        if kind not in (bool, int, float, str) and not _is_enum(kind):
            raise TypeError(f"pass option '{f.name}' has type {kind}; use bool, int, float, str or an Enum")
        return cls(
            name=f.name.replace("_", "-"),
            field_name=f.name,
            type=kind,
            default=f.default,
            help=f.metadata.get("help", ""),
        )

    def describe(self) -> str:
        kind = "|".join(m.value for m in self.type) if _is_enum(self.type) else self.type.__name__
        return f"{self.name}: {kind} = {format_value(self.default)}"

    def parse(self, text: str) -> Any:
        """Turn the text of a value into the option's type; ValueError says what was expected."""
        if self.type is bool:
            if text not in ("true", "false"):
                raise ValueError(f"expected true or false, got '{text}'")
            return text == "true"
        if _is_enum(self.type):
            try:
                return self.type(text)
            except ValueError:
                valid = ", ".join(m.value for m in self.type)
                raise ValueError(f"expected one of {valid}, got '{text}'") from None
        if self.type in (int, float):
            try:
                return self.type(text)
            except ValueError:
                raise ValueError(f"expected {self.type.__name__}, got '{text}'") from None
        return text


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)
