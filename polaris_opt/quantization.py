"""`polaris_opt.quantize`: one call from a float model to a quantized one, with a report.

The function only chooses a pipeline and runs it (polaris_opt.compiler); everything it does can
be replayed with `polaris-opt compile --recipe`, from the recipe `QuantizeResult.recipe()` gives:

    cleanup,calibrate{method=entropy},quantize{per-channel=true,activations=uint8}

Fidelity is measured on the calibration data (or on random inputs, said so, when there is
none) against the input model, so every result carries its own evidence.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from polaris_opt.errors import BadInput
from polaris_opt.passes_api import PassContext, Progress, no_progress


class Mode(enum.Enum):
    INT8 = "int8"  # static: QDQ with calibrated activation ranges
    INT8_DYNAMIC = "int8-dynamic"  # weights int8, activations quantized at run time
    FP16 = "fp16"
    INT4 = "int4"  # weight-only MatMulNBits


# What an option value in pipeline text cannot hold (polaris_opt.pipeline), and the list separator.
_UNWRITABLE = re.compile(r"[,;{}=\s]")


def writable(name: str) -> bool:
    """Whether a node name can be written in an exclude list of pipeline text."""
    return bool(name) and not _UNWRITABLE.search(name)


# How many calibration batches the report's fidelity figures are measured on, at most.
FIDELITY_BATCHES = 8

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
INT4_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything that decides the output model; `pipeline_text()` turns it into passes."""

    mode: Mode = Mode.INT8
    method: str | None = None  # calibration method for int8, rtn|gptq for int4
    percentile: float = 99.99
    per_channel: bool = True
    activations: str = "uint8"
    exclude: tuple[str, ...] = ()
    bias_correction: bool = False
    block_size: int = 32
    symmetric: bool = True
    keep_io_types: bool = True

    def resolved_method(self) -> str:
        if self.mode is Mode.INT4:
            return self.method or "rtn"
        return self.method or "minmax"

    def needs_calibration(self) -> bool:
        if self.mode is Mode.INT8:
            return True
        return self.mode is Mode.INT4 and self.resolved_method() == "gptq"

    def check(self) -> None:
        method = self.resolved_method()
        if self.mode is Mode.INT4 and method not in INT4_METHODS:
            raise BadInput(f"--method for --int4 must be one of {', '.join(INT4_METHODS)}; got '{method}'")
        if self.mode is Mode.INT8 and method not in CALIBRATION_METHODS:
            valid = ", ".join(CALIBRATION_METHODS)
            raise BadInput(f"--method for --int8 must be one of {valid}; got '{method}'")
        if self.mode in (Mode.FP16, Mode.INT8_DYNAMIC) and self.method is not None:
            raise BadInput(f"--method does not apply to {self.mode.value} (it has no calibration step)")
        if self.activations not in ("uint8", "int8"):
            raise BadInput(f"--activations must be uint8 or int8; got '{self.activations}'")
        if not 0.0 < self.percentile <= 100.0:
            raise BadInput(f"--percentile must be in (0, 100]; got {self.percentile}")
        for name in self.exclude:
            if not writable(name):
                raise BadInput(f"--exclude '{name}': names may not be empty or hold , ; {{ }} = or spaces")

    def pipeline_text(self, exclude: Iterable[str] = ()) -> str:
        """The pipeline that makes this model from the input; `exclude` adds layers kept in float."""
        if self.mode is Mode.INT8:
            return f"cleanup,{self.calibrate_step()},{self.quantize_steps(exclude)}"
        excluded = self.excluded(exclude)
        if self.mode is Mode.INT8_DYNAMIC:
            return "cleanup," + _step(
                "quantize-dynamic", [f"per-channel={_flag(self.per_channel)}"], excluded
            )
        if self.mode is Mode.FP16:
            return f"cleanup,convert-fp16{{keep-io-types={_flag(self.keep_io_types)}}}"
        options = [
            f"block-size={self.block_size}",
            f"symmetric={_flag(self.symmetric)}",
            f"method={self.resolved_method()}",
        ]
        return "cleanup," + _step("quantize-int4", options, excluded)

    def excluded(self, exclude: Iterable[str] = ()) -> str:
        """The user's exclusions and `exclude`, as one ';'-separated option value."""
        return ";".join(dict.fromkeys([*self.exclude, *exclude]))

    def calibrate_step(self) -> str:
        method = self.resolved_method()
        if method == "percentile":
            return f"calibrate{{method=percentile,percentile={self.percentile:g}}}"
        return f"calibrate{{method={method}}}"

    def quantize_steps(self, exclude: Iterable[str] = ()) -> str:
        """INT8 static after calibration: [correct-bias,] quantize, with `exclude` kept in float —
        bias correction included, since its correction only cancels against a quantized weight."""
        excluded = self.excluded(exclude)
        per_channel = f"per-channel={_flag(self.per_channel)}"
        quantize = _step("quantize", [per_channel, f"activations={self.activations}"], excluded)
        if not self.bias_correction:
            return quantize
        return _step("correct-bias", [per_channel], excluded) + "," + quantize


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _step(name: str, options: list[str], excluded: str) -> str:
    if excluded:
        options = [*options, f"exclude={excluded}"]
    return f"{name}{{{','.join(options)}}}"


@dataclass
class QuantizeResult:
    """The quantized model, the pipeline that made it, and what happened (for tables and --json)."""

    model: onnx.ModelProto
    pipeline: str
    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def quantize(
    model: onnx.ModelProto | str | Path,
    calib: Any = None,
    *,
    options: QuantizeOptions | None = None,
    target_sqnr: float | None = None,
    max_top1_drop: float | None = None,
    eval_data: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    image: Any = None,
    cache_dir: str | Path | None = None,
    threads: int = 1,
    seed: int = 0,
    progress: Progress = no_progress,
    **option_values: Any,
) -> QuantizeResult:
    """Quantize `model` and measure the result against it.

    `calib` is anything `polaris_opt.calib_data.open_calibration` accepts: an .npz path, a
    folder, "random", a dict of arrays, or an ONNX Runtime CalibrationDataReader. Options are
    given as a `QuantizeOptions` or as its field names (`mode="int8", method="entropy"`).
    With `target_sqnr` (dB) or `max_top1_drop` (points, needs `eval_data` = (inputs, labels)),
    the most sensitive layers are moved back to float until the target holds.
    """
    from polaris_opt.graph_io import load_model

    source_model = load_model(model) if isinstance(model, (str, Path)) else model
    chosen = _options(options, option_values)
    chosen.check()
    if (target_sqnr is not None or max_top1_drop is not None) and chosen.mode is not Mode.INT8:
        raise BadInput("--target-sqnr and --max-top1-drop apply to --int8 (static) only")
    if max_top1_drop is not None and eval_data is None:
        raise BadInput("--max-top1-drop needs labelled data: give --eval DATA.npz")
    source = _open_source(
        calib, source_model, chosen, batch_size=batch_size, limit=limit, image=image, seed=seed
    )
    ctx = PassContext(
        model_dir=Path(model).parent if isinstance(model, (str, Path)) else None,
        seed=seed,
        cache_dir=Path(cache_dir) if cache_dir else None,
        calib=source,
        threads=threads,
        progress=progress,
    )
    warnings = list(getattr(source, "warnings", []) or [])
    if target_sqnr is not None or max_top1_drop is not None:
        from polaris_opt import mixed_precision

        searched = mixed_precision.search(
            source_model,
            source,
            options=chosen,
            target_sqnr=target_sqnr,
            max_top1_drop=max_top1_drop,
            eval_data=eval_data,
            threads=threads,
            progress=progress,
        )
        pipeline_text, reports, quantized = searched.pipeline_text, searched.reports, searched.model
        mixed = searched.summary()
        if not searched.reached:
            warnings.append(f"target not reached: {searched.describe_shortfall()}")
    else:
        pipeline_text, reports, quantized, compile_warnings = _run(source_model, chosen.pipeline_text(), ctx)
        warnings += compile_warnings
        mixed = None
    report = build_report(source_model, quantized, pipeline_text, reports, source, eval_data, threads)
    if mixed is not None:
        report["mixed_precision"] = mixed
    return QuantizeResult(quantized, pipeline_text, report, warnings)


def _options(options: QuantizeOptions | None, values: dict[str, Any]) -> QuantizeOptions:
    from dataclasses import fields, replace

    chosen = options or QuantizeOptions()
    valid = {f.name for f in fields(QuantizeOptions)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise TypeError(f"quantize() got unknown options {unknown}; valid: {sorted(valid)}")
    if isinstance(values.get("mode"), str):
        values = {**values, "mode": Mode(values["mode"])}
    if isinstance(values.get("exclude"), (list, str)):
        exclude = values["exclude"]
        values = {**values, "exclude": tuple([exclude] if isinstance(exclude, str) else exclude)}
    return replace(chosen, **values)


def _open_source(calib, model: onnx.ModelProto, options: QuantizeOptions, **how):
    if calib is None:
        if options.needs_calibration():
            what = "--int8" if options.mode is Mode.INT8 else "--int4 --method gptq"
            raise BadInput(
                f"{what} needs calibration data: give --calib DATA (.npz, a folder, or images), "
                "or --calib random to try it out"
            )
        return None
    from polaris_opt.calib_data import open_calibration

    return open_calibration(calib, model, **how)


def _run(model: onnx.ModelProto, text: str, ctx: PassContext):
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.pipeline import Pipeline

    result = run_pipeline(model, Pipeline.parse(text), ctx=ctx)
    return result.pipeline, result.reports, result.model, result.warnings


def build_report(source, quantized, pipeline_text, reports, calib, eval_data, threads) -> dict[str, Any]:
    """Sizes, fidelity against the input model, per-layer precision and the per-pass table."""
    from dataclasses import asdict

    report: dict[str, Any] = {
        "pipeline": pipeline_text,
        "input_bytes": source.ByteSize(),
        "output_bytes": quantized.ByteSize(),
        "passes": [asdict(r) for r in reports],
        "layers": _layers(reports),
        "float_ops": _float_ops(reports),
    }
    report["size_ratio"] = report["output_bytes"] / max(report["input_bytes"], 1)
    report["fidelity"] = measure_fidelity(source, quantized, calib, threads=threads)
    if eval_data is not None:
        report["accuracy"] = measure_accuracy(source, quantized, eval_data, threads=threads)
    return report


def _layers(reports) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for r in reports:
        # Layers a pass left alone are listed apart by some passes ("skipped"): report them too.
        rows = r.details.get("layers", []) + r.details.get("skipped", [])
        # Only passes that decide a precision per layer (not bias correction) fill the table.
        layers += [row for row in rows if "precision" in row]
    return layers


def _float_ops(reports) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in reports:
        for op, count in r.details.get("float_ops", {}).items():
            counts[op] = counts.get(op, 0) + count
    return counts


def measure_fidelity(
    source, quantized, calib, *, threads: int = 1, random_batches: int = 4
) -> dict[str, Any]:
    """SQNR, cosine and top-1 agreement of `quantized` against `source` on the calibration batches,
    or on seeded random inputs when there is no calibration data (the report says which)."""
    from polaris_opt.fidelity import compare_models, overall
    from polaris_opt.numerics import make_session, sample_inputs

    reference = make_session(source, threads=threads)
    candidate = make_session(quantized, threads=threads)
    if calib is not None:
        # A bounded sample: the figure is an indicator (--eval measures properly), and running
        # both models over a large calibration set would cost more than calibrating did.
        batches, data = itertools.islice(calib.batches(), FIDELITY_BATCHES), "calibration data"
        if calib.num_batches is None or calib.num_batches > FIDELITY_BATCHES:
            data = f"the first {FIDELITY_BATCHES} batches of the calibration data"
    else:
        batches = (sample_inputs(reference, seed=seed, dynamic_size=8) for seed in range(random_batches))
        data = "random inputs"
    pooled = overall(compare_models(reference, candidate, batches))
    return {**pooled.as_dict(), "data": data}


def measure_accuracy(source, quantized, eval_data, *, threads: int = 1) -> dict[str, float]:
    """Top-1 accuracy of both models on labelled data, and the drop in points."""
    from polaris_opt.fidelity import top1_accuracy
    from polaris_opt.numerics import make_session

    inputs, labels = eval_data
    before = top1_accuracy(make_session(source, threads=threads), [inputs], labels)
    after = top1_accuracy(make_session(quantized, threads=threads), [inputs], labels)
    return {"top1_before": before, "top1_after": after, "top1_drop": 100.0 * (before - after)}


def load_eval_data(path: str | Path, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An evaluation .npz: the model's inputs by name plus `labels` (integer class per row)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise BadInput(f"--eval {path}: not a readable .npz ({exc})") from None
    if "labels" not in arrays:
        raise BadInput(
            f"--eval {path}: needs a 'labels' array beside the model's inputs; has {sorted(arrays)}"
        )
    labels = arrays.pop("labels")
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadInput(f"--eval {path}: missing model input(s) {missing}; has {sorted(arrays)}")
    for name in names:
        if len(arrays[name]) != len(labels):
            rows = len(arrays[name])
            raise BadInput(f"--eval {path}: input '{name}' has {rows} rows for {len(labels)} labels")
    return {n: arrays[n] for n in names}, labels
