"""Accuracy-driven mixed precision: full INT8, then the most sensitive layers back to FP32 until a
target holds.

    search(model, source, options=QuantizeOptions(method="entropy"), target_sqnr=35.0)

The layers are ranked by `polaris_opt.analysis` (model output SQNR with only that layer in
INT8, worst first). The candidates are "the k most sensitive layers in float" for k = 0..L;
the search tries k = 0 (all INT8) and k = L (every layer in float), then bisects on k, so it
needs about log2(L) + 2 quantize runs instead of L. Bisection assumes that keeping more
layers in float does not hurt, which holds closely for a ranked prefix though not exactly:
the k it returns meets the target, and k − 1 did not.

Layers moved out of INT8 stay FP32: they are excluded from `quantize` (and from
`correct-bias`, whose correction only cancels against a quantized weight). FP16 islands
inside a QDQ model are not made.

The result carries the pipeline text that made its model; replayed on the same model with the
same calibration data (`run_pipeline(model, Pipeline.parse(text), ctx=PassContext(calib=...))`)
it gives the same bytes. A target that even the all-float candidate misses is not an error:
the best candidate comes back with `reached=False`, and the caller decides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from polaris_opt.analysis import ReferenceOutputs, SensitivityReport, analyze_calibrated, finite_or_none
from polaris_opt.errors import BadInput
from polaris_opt.numerics import make_session
from polaris_opt.passes_api import PassContext, Progress, no_progress
from polaris_opt.quantization import Mode, QuantizeOptions, writable

log = logging.getLogger("polaris_opt.mixed_precision")


@dataclass
class MixedPrecisionResult:
    model: onnx.ModelProto
    pipeline_text: str  # replays to `model`
    layers_float: list[str]  # the layers moved to FP32, most sensitive first
    achieved: dict[str, float | None]  # sqnr_db, cosine, top1, top1_fp32, top1_drop (points)
    steps: list[dict[str, Any]]  # every candidate tried, in order
    reached: bool
    target: dict[str, float | None] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer precision (quantize details)
    reports: list = field(default_factory=list)  # PassReports of the run that made `model`

    def describe_shortfall(self) -> str:
        """One line on how far the best candidate stays from the target."""
        misses = []
        if self.target.get("sqnr_db") is not None:
            misses.append(f"SQNR {self.achieved['sqnr_db']:.2f} dB (target {self.target['sqnr_db']:g} dB)")
        if self.target.get("max_top1_drop") is not None:
            drop, limit = self.achieved["top1_drop"], self.target["max_top1_drop"]
            misses.append(f"top-1 drop {drop:.2f} points (at most {limit:g})")
        return f"{' and '.join(misses)} with {len(self.layers_float)} layer(s) in FP32"

    def summary(self) -> dict[str, Any]:
        """For reports and --json: an SQNR of +inf (a candidate equal to FP32) becomes null."""
        return finite_or_none(
            {
                "pipeline": self.pipeline_text,
                "reached": self.reached,
                "target": self.target,
                "achieved": self.achieved,
                "layers_float": self.layers_float,
                "steps": self.steps,
            }
        )


def search(
    model: onnx.ModelProto,
    source,
    *,
    options: QuantizeOptions | None = None,
    target_sqnr: float | None = None,
    max_top1_drop: float | None = None,
    eval_data: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
    sensitivity: SensitivityReport | None = None,
    threads: int = 1,
    progress: Progress = no_progress,
) -> MixedPrecisionResult:
    """The fewest most-sensitive layers in FP32 for which the target holds.

    `target_sqnr` (dB) is measured on `eval_data`'s inputs when given, else on the calibration
    batches; `max_top1_drop` (accuracy points) needs `eval_data` = (inputs, labels).
    """
    options = options or QuantizeOptions()
    if options.mode is not Mode.INT8:
        raise BadInput("mixed precision starts from INT8 static quantization (--int8)")
    options.check()
    _check_targets(target_sqnr, max_top1_drop, eval_data)
    ctx = PassContext(calib=source, threads=threads, progress=progress)
    # Cleaned and calibrated once, as the final pipeline does; each candidate reuses ctx.calibration.
    cleaned = _run_text(model, f"cleanup,{options.calibrate_step()}", ctx).model
    if sensitivity is None:
        sensitivity = analyze_calibrated(
            model, cleaned, ctx, per_channel=options.per_channel, activations=options.activations
        )
    ranked = writable_layers(sensitivity.ranked_names(), options.exclude)
    judge = Judge(model, source, eval_data, target_sqnr, max_top1_drop, threads)

    def try_float(count: int) -> dict[str, Any]:
        text = options.quantize_steps(ranked[:count])
        candidate = _run_text(cleaned, text, ctx).model
        step = {"layers_float": count, **judge.measure(candidate)}
        step["holds"] = judge.holds(step)
        return step

    chosen, steps = fewest_float_layers(len(ranked), try_float, progress)
    text = options.pipeline_text(ranked[:chosen])
    # The final model is the replay itself, so the text returned is exactly what made it.
    replay = _run_text(model, text, PassContext(calib=source, threads=threads, progress=progress))
    achieved = judge.measure(replay.model)
    return MixedPrecisionResult(
        model=replay.model,
        pipeline_text=text,
        layers_float=ranked[:chosen],
        achieved=achieved,
        steps=steps,
        reached=judge.holds(achieved),
        target={"sqnr_db": target_sqnr, "max_top1_drop": max_top1_drop},
        layers=[row for r in replay.reports for row in r.details.get("layers", [])],
        reports=replay.reports,
    )


def fewest_float_layers(
    count: int, try_float: Callable[[int], dict[str, Any]], progress: Progress
) -> tuple[int, list[dict[str, Any]]]:
    """The smallest k in 0..count whose candidate holds, assuming more float never hurts.

    When even k = count fails, the best candidate tried is returned (the caller sees it fail).
    """
    steps: list[dict[str, Any]] = []
    with progress("mixed precision search", None) as advance:

        def tried(k: int) -> bool:
            steps.append(try_float(k))
            advance(1)
            return steps[-1]["holds"]

        if tried(0):
            return 0, steps
        if count == 0 or not tried(count):
            best = max(steps, key=_closeness)
            return best["layers_float"], steps
        failing, holding = 0, count
        while holding - failing > 1:
            middle = (failing + holding) // 2
            if tried(middle):
                holding = middle
            else:
                failing = middle
    return holding, steps


def _closeness(step: dict[str, Any]) -> tuple[float, float]:
    # Fewer accuracy points lost first, then a higher SQNR.
    drop = step.get("top1_drop")
    return (-drop if drop is not None else 0.0, step["sqnr_db"])


# --------------------------------------------------------------------------------- measuring


class Judge:
    """Measures a candidate against the FP32 model and tells whether the targets hold."""

    def __init__(self, model, source, eval_data, target_sqnr, max_top1_drop, threads: int):
        self.target_sqnr, self.max_top1_drop, self.threads = target_sqnr, max_top1_drop, threads
        self.eval_data = eval_data
        batches = (lambda: [eval_data[0]]) if eval_data is not None else source.batches
        self.reference = ReferenceOutputs(model, batches, threads)
        self.top1_fp32 = None
        if eval_data is not None:
            self.top1_fp32 = top1(self.reference.outputs[0][0], eval_data[1])

    def measure(self, candidate: onnx.ModelProto) -> dict[str, float | None]:
        session = make_session(candidate, threads=self.threads)
        agreement = self.reference.agreement(session)
        measured = {
            "sqnr_db": agreement.sqnr_db,
            "cosine": agreement.cosine,
            "top1": None,
            "top1_fp32": self.top1_fp32,
            "top1_drop": None,
        }
        if self.eval_data is not None:
            inputs, labels = self.eval_data
            logits = session.run([self.reference.names[0]], inputs)[0]
            measured["top1"] = top1(logits, labels)
            measured["top1_drop"] = 100.0 * (self.top1_fp32 - measured["top1"])
        return measured

    def holds(self, measured: dict[str, float | None]) -> bool:
        if self.target_sqnr is not None and not measured["sqnr_db"] >= self.target_sqnr:
            return False
        return self.max_top1_drop is None or measured["top1_drop"] <= self.max_top1_drop


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    predicted = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    if len(predicted) != len(labels):
        raise BadInput(f"evaluation data: {len(predicted)} predictions for {len(labels)} labels")
    return float(np.mean(predicted == labels))


# ------------------------------------------------------------------------------ pipeline text


def writable_layers(ranked: list[str], excluded: Iterable[str]) -> list[str]:
    """The ranked layers that can move to float: not excluded already, and nameable in text."""
    excluded = set(excluded)
    usable = []
    for name in ranked:
        if name in excluded:
            continue
        if writable(name):
            usable.append(name)
        else:
            log.warning("layer '%s' stays INT8: its name cannot be written in an exclude list", name)
    return usable


def _run_text(model: onnx.ModelProto, text: str, ctx: PassContext):
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.pipeline import Pipeline

    return run_pipeline(model, Pipeline.parse(text), ctx=ctx)


# ------------------------------------------------------------------------------------ checks


def _check_targets(target_sqnr, max_top1_drop, eval_data) -> None:
    if target_sqnr is None and max_top1_drop is None:
        raise BadInput("mixed precision needs a target: --target-sqnr DB or --max-top1-drop PCT")
    if target_sqnr is not None and not math.isfinite(target_sqnr):
        raise BadInput(f"--target-sqnr must be a finite number of dB; got {target_sqnr}")
    if max_top1_drop is not None:
        if eval_data is None:
            raise BadInput("--max-top1-drop needs labelled data: give --eval DATA.npz")
        if not max_top1_drop >= 0:
            raise BadInput(f"--max-top1-drop must be 0 or more accuracy points; got {max_top1_drop}")
