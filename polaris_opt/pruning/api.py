"""`polaris_opt.prune`: one call from a dense model to a pruned one, with a report.

Like `polaris_opt.quantize`, the function only chooses a pipeline and runs it; the pipeline text
it records replays with `polaris-opt compile`:

    cleanup,prune{sparsity=0.9,method=wanda}
    cleanup,prune-structured{kind=channel,sparsity=0.5,importance=l2,correct=true}

Clean-up runs first and on its own, so the report compares the pruned model with the cleaned
dense one: the same tensor names, the same weights, and only pruning between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from polaris_opt.errors import BadInput
from polaris_opt.passes_api import PassContext, Progress, no_progress
from polaris_opt.quantization import writable

METHODS = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("local", "global")
STRUCTURED_KINDS = ("channel", "filter", "head")
IMPORTANCES = ("l1", "l2", "taylor")
# What a sparsity defaults to when the user gives none and the pattern does not fix one.
DEFAULT_SPARSITY = 0.5
DEFAULT_MAX_LAYER_SPARSITY = 0.99
DEFAULT_IMPORTANCE = "l2"
CALIBRATION_HINT = "give --calib DATA (a .npz, a folder, or 'random')"


@dataclass(frozen=True)
class PruneOptions:
    """Everything that decides the pruned model; `pipeline_text()` turns it into passes."""

    sparsity: float | None = None  # None: the pattern's fixed sparsity (N:M) or DEFAULT_SPARSITY
    method: str = "magnitude"
    scope: str = "local"
    pattern: str = "unstructured"
    max_layer_sparsity: float = DEFAULT_MAX_LAYER_SPARSITY
    exclude: tuple[str, ...] = ()
    skip_first_last: bool = False
    sequential: bool = True  # sparsegpt: layer by layer from the model pruned so far
    structured: str | None = None  # channel | filter | head: remove whole channels instead
    importance: str = DEFAULT_IMPORTANCE
    correct: bool = False
    cleanup: bool = True

    def check(self, *, has_calibration: bool) -> None:
        """Refuse what cannot run, with one line that says what to give instead."""
        self._check_values()
        if self.structured is not None:
            self._check_structured()
        else:
            self._check_unstructured()
        reason = self.calibration_reason()
        if reason is not None and not has_calibration:
            raise BadInput(f"{reason} needs calibration data: {CALIBRATION_HINT}")

    def _check_values(self) -> None:
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise BadInput(
                f"--sparsity {self.sparsity:g} is outside [0, 1): give the fraction of weights to remove, "
                "such as 0.9"
            )
        _one_of("--method", self.method, METHODS)
        _one_of("--scope", self.scope, SCOPES)
        _one_of("--importance", self.importance, IMPORTANCES)
        if self.structured is not None:
            _one_of("--structured", self.structured, STRUCTURED_KINDS)
        if not 0.0 < self.max_layer_sparsity <= 1.0:
            raise BadInput(f"--max-layer-sparsity {self.max_layer_sparsity:g} is outside (0, 1]")
        for name in self.exclude:
            if not writable(name):
                raise BadInput(f"--exclude '{name}': names may not be empty or hold , ; {{ }} = or spaces")

    def _check_structured(self) -> None:
        kind = f"--structured {self.structured}"
        if self.pattern != "unstructured":
            raise BadInput(
                f"{kind} does not combine with --pattern {self.pattern}: it removes whole channels, "
                "a pattern places zeros inside them"
            )
        if self.method != "magnitude":
            raise BadInput(
                f"{kind} does not combine with --method {self.method}: choose channels with "
                "--importance l1|l2|taylor"
            )
        unstructured_only = [
            ("--scope global", self.scope != "local"),
            ("--max-layer-sparsity", self.max_layer_sparsity != DEFAULT_MAX_LAYER_SPARSITY),
            ("--skip-first-last", self.skip_first_last),
        ]
        for option, given in unstructured_only:
            if given:
                raise BadInput(
                    f"{kind} does not combine with {option}; keep layers dense with --exclude NAME"
                )

    def _check_unstructured(self) -> None:
        if self.importance != DEFAULT_IMPORTANCE:
            raise BadInput(f"--importance {self.importance} ranks channels: it goes with --structured")
        pattern = self.parsed_pattern()
        fixed = pattern.fixed_sparsity
        if (
            fixed is not None
            and self.sparsity is not None
            and not math.isclose(self.sparsity, fixed, abs_tol=1e-3)
        ):
            raise BadInput(
                f"--sparsity {self.sparsity:g} conflicts with --pattern {pattern.text()}, which prunes "
                f"{fixed:g} of the weights: leave --sparsity out or give {fixed:g}"
            )

    def parsed_pattern(self):
        """The pattern as polaris_opt.pruning.patterns reads it; a bad one is one line naming the forms."""
        from polaris_opt.pruning.patterns import PATTERN_FORMS, Pattern

        try:
            return Pattern.parse(self.pattern)
        except BadInput:
            raise BadInput(f"--pattern '{self.pattern}' is not valid; use {PATTERN_FORMS}") from None

    def calibration_reason(self) -> str | None:
        """The option that needs calibration data ("--method wanda"), or None when none does."""
        if self.structured is None and self.method in ("wanda", "sparsegpt"):
            return f"--method {self.method}"
        if self.structured is not None and self.importance == "taylor":
            return "--importance taylor"
        if self.correct:
            return "--correct"
        return None

    def needs_calibration(self) -> bool:
        return self.calibration_reason() is not None

    def resolved_sparsity(self) -> float:
        """The sparsity the pass gets: as given, else what an N:M pattern fixes, else the default."""
        if self.sparsity is not None:
            return self.sparsity
        if self.structured is None:
            fixed = self.parsed_pattern().fixed_sparsity
            if fixed is not None:
                return fixed
        return DEFAULT_SPARSITY

    def prune_step(self) -> str:
        """The pruning pass with its options, as pipeline text."""
        options = [f"sparsity={float(self.resolved_sparsity())!r}"]
        if self.structured is not None:
            options = [f"kind={self.structured}", *options, f"importance={self.importance}"]
        else:
            options.append(f"method={self.method}")
            if self.pattern != "unstructured":
                options.append(f"pattern={self.parsed_pattern().text()}")
            if self.scope != "local":
                options.append(f"scope={self.scope}")
            if self.max_layer_sparsity != DEFAULT_MAX_LAYER_SPARSITY:
                options.append(f"max-layer-sparsity={float(self.max_layer_sparsity)!r}")
            if self.skip_first_last:
                options.append("skip-first-last=true")
            if not self.sequential and self.method == "sparsegpt":
                options.append("sequential=false")
        if self.exclude:
            options.append("exclude=" + ";".join(dict.fromkeys(self.exclude)))
        if self.correct:
            options.append("correct=true")
        name = "prune" if self.structured is None else "prune-structured"
        return f"{name}{{{','.join(options)}}}"

    def pipeline_text(self) -> str:
        """The whole pipeline: `cleanup,` (unless cleanup=False) and the pruning step."""
        return ("cleanup," if self.cleanup else "") + self.prune_step()


def _one_of(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise BadInput(f"{option} must be one of {', '.join(valid)}; got '{value}'")


@dataclass
class PruneResult:
    """The pruned model, the pipeline that made it, and what happened (for tables and --json).

    `changed` is False when the pruning pass found nothing it could prune safely: `model` is then
    the input model itself, untouched (not even cleaned up).
    """

    model: onnx.ModelProto
    pipeline: str
    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    changed: bool = True


def prune(
    model: onnx.ModelProto | str | Path,
    output: str | Path | None = None,
    *,
    calib: Any = None,
    options: PruneOptions | None = None,
    eval_data: tuple[dict[str, np.ndarray], np.ndarray] | str | Path | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    image: Any = None,
    cache_dir: str | Path | None = None,
    threads: int = 1,
    seed: int = 0,
    force: bool = False,
    progress: Progress = no_progress,
    **option_values: Any,
) -> PruneResult:
    """Prune `model`, measure the result against the dense model and, with `output`, save it.

    Options are a `PruneOptions` or its field names (`sparsity=0.9, method="wanda"`). `calib` is
    a CalibrationSource or anything `polaris_opt.calib_data.open_calibration` accepts; wanda,
    sparsegpt, taylor and `correct` need it. `eval_data` is (inputs, labels) or an .npz path
    (`--eval`) for top-1 accuracy before and after. `output` is written atomically and never
    over the input unless `force`.
    """
    from polaris_opt.graph_io import check_output_path, load_model, save_model
    from polaris_opt.pruning.report import build_prune_report
    from polaris_opt.quantization import load_eval_data

    from_file = isinstance(model, (str, Path))
    chosen = _options(options, option_values)
    chosen.check(has_calibration=calib is not None)
    if output is not None:
        check_output_path(output, input_path=model if from_file else None, force=force)
    source_model = load_model(model) if from_file else model
    if isinstance(eval_data, (str, Path)):
        eval_data = load_eval_data(eval_data, source_model)
    source = _open_source(calib, source_model, batch_size=batch_size, limit=limit, image=image, seed=seed)
    ctx = PassContext(
        model_dir=Path(model).parent if from_file else None,
        seed=seed,
        cache_dir=Path(cache_dir) if cache_dir else None,
        calib=source,
        threads=threads,
        progress=progress,
    )
    dense, reports, warnings = (
        _run(source_model, "cleanup", ctx) if chosen.cleanup else (source_model, [], [])
    )
    pruned, prune_reports, prune_warnings = _run(dense, chosen.prune_step(), ctx)
    changed = prune_reports[-1].modified
    result_model = pruned if changed else source_model
    report = build_prune_report(
        dense,
        result_model,
        chosen.pipeline_text(),
        reports + prune_reports,
        source,
        eval_data=eval_data,
        threads=threads,
        progress=progress,
    )
    warnings = list(getattr(source, "warnings", []) or []) + warnings + prune_warnings
    warnings += _fallback_warnings(report, chosen)
    if output is not None:
        pipeline = chosen.pipeline_text() if changed else None
        save_model(
            result_model, output, pipeline=pipeline, input_path=model if from_file else None, force=force
        )
    return PruneResult(result_model, chosen.pipeline_text(), report, warnings, changed)


def _options(options: PruneOptions | None, values: dict[str, Any]) -> PruneOptions:
    chosen = options or PruneOptions()
    valid = {f.name for f in fields(PruneOptions)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise TypeError(f"prune() got unknown options {unknown}; valid: {sorted(valid)}")
    exclude = values.get("exclude")
    if isinstance(exclude, (list, str)):
        values = {**values, "exclude": tuple([exclude] if isinstance(exclude, str) else exclude)}
    return replace(chosen, **values)


def _open_source(calib: Any, model: onnx.ModelProto, **how: Any):
    """A CalibrationSource as given, else what open_calibration makes of `calib`; None for none."""
    from polaris_opt.calib_data import CalibrationSource, open_calibration

    if calib is None or isinstance(calib, CalibrationSource):
        return calib
    return open_calibration(calib, model, **how)


def _run(model: onnx.ModelProto, text: str, ctx: PassContext):
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.pipeline import Pipeline

    result = run_pipeline(model, Pipeline.parse(text), ctx=ctx)
    return result.model, result.reports, result.warnings


def _fallback_warnings(report: dict[str, Any], options: PruneOptions) -> list[str]:
    """Layers a data-driven method could not see (no activation statistics) were pruned by magnitude."""
    if options.structured is not None or options.method == "magnitude":
        return []
    fell_back = [row["layer"] for row in report["layers"] if row.get("method") == "magnitude"]
    if not fell_back:
        return []
    shown = ", ".join(fell_back[:3]) + (f" and {len(fell_back) - 3} more" if len(fell_back) > 3 else "")
    return [f"--method {options.method}: no activation statistics for {shown}; pruned by magnitude"]
