"""Quality gates for the CI conversion step: `--check "METRIC OP NUMBER"` parsed and evaluated.

    polaris-opt compile model.onnx --recipe r.yaml -o out.onnx --check "sqnr>=30" --check "top1_drop<=0.5"

A check names one metric of the output model measured against the input model (METRICS), a
comparison and a number. Checks are parsed before any work is done, so a typo fails the job at
once (BadInput, exit 2) instead of after a long calibration. A gate whose metric could not be
measured (top-1 agreement of a model with no class scores, say) fails: a CI gate that cannot
tell must not let a model through.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from polaris_opt.errors import BadInput


@dataclass(frozen=True)
class Metric:
    """One gate metric: its name in a check, its unit, what it measures."""

    name: str
    unit: str
    meaning: str
    needs_labels: bool = False

    @property
    def percent(self) -> bool:
        return self.unit == "%"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("sqnr", "dB", "signal-to-noise ratio of the outputs against the input model's"),
        Metric("cosine", "", "cosine similarity of the outputs with the input model's (1 = same direction)"),
        Metric("top1_agreement", "%", "share of samples whose top-1 class is the input model's"),
        Metric("top1", "%", "top-1 accuracy of the output model on the --eval labels", needs_labels=True),
        Metric(
            "top1_drop",
            "points",
            "input model's top-1 accuracy minus the output model's, in percentage points",
            needs_labels=True,
        ),
        Metric("size_ratio", "", "output model bytes / input model bytes"),
        Metric("max_abs_err", "", "largest absolute difference of any output value"),
    )
}

COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
# Two-character operators first, so ">=" is never read as ">" followed by "=30".
_CHECK = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*(\S+)\s*$")
EXAMPLE = "e.g. 'sqnr>=30' or 'top1_drop <= 0.5'"


@dataclass(frozen=True)
class Check:
    """A parsed `--check`: `metric op threshold`; `text` is its canonical spelling, e.g. 'sqnr>=30'."""

    metric: Metric
    op: str
    threshold: float
    number: str  # the threshold as written, so the canonical text keeps the user's digits

    @property
    def text(self) -> str:
        return f"{self.metric.name}{self.op}{self.number}"

    def passes(self, value: float | None) -> bool:
        """Whether `value` meets the check; a value that could not be measured (None, NaN) never does."""
        if value is None or math.isnan(value):
            return False
        return COMPARISONS[self.op](value, self.threshold)

    def warning(self) -> str | None:
        """A likely mistake worth a warning: a percentage metric given a fraction as its floor."""
        if self.metric.percent and self.op in (">=", ">") and 0.0 < self.threshold <= 1.0:
            scaled = f"{self.threshold * 100:g}"
            return (
                f"--check '{self.text}': {self.metric.name} is in percent, so {self.number} means "
                f"{self.number} %; for {scaled} % write '{self.metric.name}{self.op}{scaled}'"
            )
        return None


def parse_check(text: str) -> Check:
    """`text` as a Check; BadInput naming the problem (malformed, unknown metric, not a number)."""
    match = _CHECK.match(text)
    if match is None:
        operators = ", ".join(COMPARISONS)
        raise BadInput(f"--check '{text}': expected METRIC OP NUMBER with OP one of {operators}; {EXAMPLE}")
    name, op, number = match.groups()
    metric = METRICS.get(name.lower())
    if metric is None:
        raise BadInput(f"--check '{text}': unknown metric '{name}'; metrics: {', '.join(METRICS)}")
    try:
        threshold = float(number)
    except ValueError:
        raise BadInput(f"--check '{text}': '{number}' is not a number; {EXAMPLE}") from None
    if not math.isfinite(threshold):
        raise BadInput(f"--check '{text}': the threshold must be a finite number, got '{number}'")
    return Check(metric, op, threshold, number)


def parse_checks(texts: Iterable[str] | None) -> list[Check]:
    """Every `--check` parsed, in the order given; the first bad one raises."""
    return [parse_check(text) for text in texts or ()]


def label_checks(checks: Iterable[Check]) -> list[Check]:
    """The checks that need labelled data (--eval with labels)."""
    return [check for check in checks if check.metric.needs_labels]


@dataclass(frozen=True)
class Gate:
    """A check and what was measured for it."""

    check: Check
    value: float | None

    @property
    def passed(self) -> bool:
        return self.check.passes(self.value)

    def as_dict(self) -> dict[str, Any]:
        """The row of the report's and --json's "gates" list; a non-finite value is written null."""
        value = self.value if self.value is not None and math.isfinite(self.value) else None
        return {
            "check": self.check.text,
            "metric": self.check.metric.name,
            "value": value,
            "passed": self.passed,
        }

    def shown(self) -> str:
        """The measured value with its unit, for the pass/fail table."""
        return format_value(self.check.metric, self.value)


def measurements(fidelity: dict[str, Any] | None, size_ratio: float) -> dict[str, float | None]:
    """Every metric's value from a fidelity dict (fractions, as polaris_opt.fidelity gives them)
    and the size ratio; a metric that was not measured is None."""
    fidelity = fidelity or {}
    top1 = fidelity.get("top1_accuracy")
    reference = fidelity.get("top1_accuracy_reference")
    return {
        "sqnr": fidelity.get("sqnr_db"),
        "cosine": fidelity.get("cosine"),
        "top1_agreement": _percent(fidelity.get("top1_agreement")),
        "top1": _percent(top1),
        "top1_drop": None if top1 is None or reference is None else 100.0 * (reference - top1),
        "size_ratio": size_ratio,
        "max_abs_err": fidelity.get("max_abs_error"),
    }


def evaluate(checks: Iterable[Check], measured: dict[str, float | None]) -> list[Gate]:
    """One Gate per check, in order, with the measured value of its metric."""
    return [Gate(check, measured.get(check.metric.name)) for check in checks]


def failed(gates: Iterable[Gate]) -> list[Gate]:
    return [gate for gate in gates if not gate.passed]


def format_value(metric: Metric, value: float | None) -> str:
    """'31.2 dB', '99.33 %', '0.31', 'exact'; 'not measured' for None."""
    if value is None or math.isnan(value):
        return "not measured"
    if math.isinf(value):
        return "∞ dB (exact)" if metric.name == "sqnr" else f"{value}"
    if metric.name == "sqnr":
        return f"{value:.1f} dB"
    if metric.name == "cosine":
        return f"{value:.6f}"
    if metric.unit in ("%", "points"):
        return f"{value:.2f} {'%' if metric.percent else 'points'}"
    return f"{value:.4g}"


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction
