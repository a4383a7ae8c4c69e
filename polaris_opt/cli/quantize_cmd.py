"""`polaris-opt quantize`: INT8 static or dynamic, FP16 or INT4 — a thin layer over polaris_opt.quantize."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polaris_opt.cli.calib_options import (
    BatchSizeOpt,
    BgrOpt,
    CacheDirOpt,
    CalibOpt,
    LayoutOpt,
    LimitOpt,
    MeanOpt,
    NoCacheFlag,
    SizeOpt,
    StdOpt,
    ThreadsOpt,
)
from polaris_opt.cli.options import (
    DebugFlag,
    ForceFlag,
    JsonFlag,
    ModelArg,
    OutputOpt,
    QuietFlag,
    ReportOpt,
)

# Help panels, so `quantize --help` reads by topic.
MODE = "What to quantize to"
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT8 = "INT8"
INT4 = "INT4"
FP16 = "FP16"
MIXED = "Mixed precision"

Int8Flag = Annotated[
    bool,
    typer.Option("--int8", rich_help_panel=MODE, help="INT8: static QDQ with calibration (or --dynamic)."),
]
Fp16Flag = Annotated[bool, typer.Option("--fp16", rich_help_panel=MODE, help="FP16 weights and compute.")]
Int4Flag = Annotated[
    bool,
    typer.Option("--int4", rich_help_panel=MODE, help="INT4 weight-only MatMul (com.microsoft.MatMulNBits)."),
]
DynamicFlag = Annotated[
    bool,
    typer.Option(
        "--dynamic",
        rich_help_panel=MODE,
        help="With --int8: quantize activations at run time; no calibration.",
    ),
]
MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method",
        rich_help_panel=MODE,
        help="--int8: minmax|percentile|entropy|mse (default minmax); --int4: rtn|gptq (default rtn).",
    ),
]
PercentileOpt = Annotated[
    float, typer.Option("--percentile", rich_help_panel=INT8, help="Percentile kept by --method percentile.")
]
PerTensorFlag = Annotated[
    bool,
    typer.Option(
        "--per-tensor",
        rich_help_panel=INT8,
        help="One weight scale per tensor instead of per output channel.",
    ),
]
ActivationsOpt = Annotated[
    str,
    typer.Option(
        "--activations", rich_help_panel=INT8, help="Activations: uint8 (asymmetric) or int8 (symmetric)."
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", rich_help_panel=INT8, help="Keep this node name or op type in float (repeatable)."
    ),
]
BiasCorrectionFlag = Annotated[
    bool,
    typer.Option(
        "--bias-correction",
        rich_help_panel=INT8,
        help="Re-fit biases for the mean shift weight rounding causes.",
    ),
]
BlockSizeOpt = Annotated[
    int, typer.Option("--block-size", rich_help_panel=INT4, help="--int4: weights per scale (32, 64, 128).")
]
AsymmetricFlag = Annotated[
    bool, typer.Option("--asymmetric", rich_help_panel=INT4, help="--int4: a zero point per block.")
]
KeepIoFlag = Annotated[
    bool,
    typer.Option(
        "--keep-io-types/--no-keep-io-types",
        rich_help_panel=FP16,
        help="--fp16: keep float32 inputs and outputs.",
    ),
]
TargetSqnrOpt = Annotated[
    float | None,
    typer.Option(
        "--target-sqnr",
        rich_help_panel=MIXED,
        help="Mixed precision: keep the most sensitive layers float until SQNR ≥ DB.",
    ),
]
MaxDropOpt = Annotated[
    float | None,
    typer.Option(
        "--max-top1-drop",
        rich_help_panel=MIXED,
        help="Mixed precision: allow at most PCT points of top-1 loss (--eval).",
    ),
]
EvalOpt = Annotated[
    Path | None,
    typer.Option(
        "--eval",
        rich_help_panel=MIXED,
        help="Labelled data (.npz: the model's inputs + 'labels') for accuracy.",
    ),
]
SaveRecipeOpt = Annotated[
    Path | None, typer.Option("--save-recipe", help="Write a recipe that reproduces this model exactly.")
]


def quantize(
    model: ModelArg,
    output: OutputOpt,
    int8: Int8Flag = False,
    fp16: Fp16Flag = False,
    int4: Int4Flag = False,
    dynamic: DynamicFlag = False,
    calib: CalibOpt = None,
    method: MethodOpt = None,
    percentile: PercentileOpt = 99.99,
    per_tensor: PerTensorFlag = False,
    activations: ActivationsOpt = "uint8",
    exclude: ExcludeOpt = None,
    bias_correction: BiasCorrectionFlag = False,
    block_size: BlockSizeOpt = 32,
    asymmetric: AsymmetricFlag = False,
    keep_io_types: KeepIoFlag = True,
    target_sqnr: TargetSqnrOpt = None,
    max_top1_drop: MaxDropOpt = None,
    eval_data: EvalOpt = None,
    save_recipe: SaveRecipeOpt = None,
    report: ReportOpt = None,
    batch_size: BatchSizeOpt = 16,
    limit: LimitOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = "nchw",
    bgr: BgrOpt = False,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheFlag = False,
    threads: ThreadsOpt = 1,
    force: ForceFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Quantize MODEL to INT8 (static or --dynamic), FP16 or INT4 and report the fidelity it keeps."""
    from polaris_opt.cli import OUTPUT
    from polaris_opt.cli.calib_options import cache_folder, image_spec
    from polaris_opt.graph_io import check_output_path, load_model, save_model
    from polaris_opt.quantization import QuantizeOptions, load_eval_data, quantize
    from polaris_opt.report import check_report_paths, write_reports
    from polaris_opt.report.commands import quantize_report

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    check_report_paths(report, model, output)
    options = QuantizeOptions(
        mode=_mode(int8, fp16, int4, dynamic),
        method=method,
        percentile=percentile,
        per_channel=not per_tensor,
        activations=activations,
        exclude=tuple(exclude or ()),
        bias_correction=bias_correction,
        block_size=block_size,
        symmetric=not asymmetric,
        keep_io_types=keep_io_types,
    )
    options.check()
    image = image_spec(size, mean, std, layout, bgr)
    check_output_path(output, input_path=model, force=force)
    source = load_model(model)
    labelled = load_eval_data(eval_data, source) if eval_data is not None else None
    result = quantize(
        source,
        calib,
        options=options,
        target_sqnr=target_sqnr,
        max_top1_drop=max_top1_drop,
        eval_data=labelled,
        batch_size=batch_size,
        limit=limit,
        image=image,
        cache_dir=cache_folder(cache_dir, no_cache),
        threads=threads,
        progress=out.progress,
    )
    for warning in result.warnings:
        out.warn(warning)
    save_model(result.model, output, pipeline=result.pipeline, input_path=model, force=force)
    if save_recipe is not None:
        _write_recipe(save_recipe, result.pipeline, calib, batch_size, limit, image)
    summary = {"input": str(model), "output": str(output), **result.report, "warnings": result.warnings}
    summary["input_bytes"], summary["output_bytes"] = model.stat().st_size, output.stat().st_size
    summary["size_ratio"] = summary["output_bytes"] / max(summary["input_bytes"], 1)
    if report:
        calib_options = {"batch_size": batch_size, "limit": limit, "image": image}
        with out.progress("measuring layers for the report", total=None):
            document = quantize_report(
                model,
                output,
                summary,
                source=source,
                quantized=result.model,
                calib=calib,
                calib_options=calib_options,
                threads=threads,
            )
        write_reports(document, report)
    out.result(summary, lambda console: render(console, summary))
    for path in report or []:
        out.note(f"wrote report {path}")
    mixed = result.report.get("mixed_precision")
    if mixed is not None and not mixed["reached"]:
        from polaris_opt.errors import GateFailed

        # The model is written (the best found), but it misses what was asked: exit 1, like a gate.
        raise GateFailed("mixed precision: the target was not reached (see the warning above)")


def _mode(int8: bool, fp16: bool, int4: bool, dynamic: bool):
    from polaris_opt.errors import BadInput
    from polaris_opt.quantization import Mode

    chosen = [name for name, on in (("--int8", int8), ("--fp16", fp16), ("--int4", int4)) if on]
    if len(chosen) != 1:
        raise BadInput("give exactly one of --int8, --fp16 or --int4")
    if dynamic and not int8:
        raise BadInput("--dynamic goes with --int8")
    if int8:
        return Mode.INT8_DYNAMIC if dynamic else Mode.INT8
    return Mode.FP16 if fp16 else Mode.INT4


def _write_recipe(path: Path, pipeline: str, calib, batch_size: int, limit, image) -> None:
    from dataclasses import asdict

    from polaris_opt.recipe import Recipe, save_recipe

    calibration = None
    if calib is not None:
        calibration = {"data": calib, "batch_size": batch_size}
        if limit is not None:
            calibration["limit"] = limit
        if image is not None:
            calibration["image"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(image).items()
            }
    save_recipe(Recipe(pipeline=pipeline, calibration=calibration), path)


def render(console, summary: dict) -> None:
    from rich.markup import escape

    layers = summary.get("layers", [])
    kept_float = sum(layer.get("precision") == "float" for layer in layers)
    if layers:
        what = f"{len(layers) - kept_float} layers quantized, {kept_float} kept in float"
    else:  # FP16 converts nodes, not layers: say what its pass counted
        last = summary["passes"][-1]
        what = ", ".join(f"{key} {value}" for key, value in last["stats"].items())
    console.print(f"{escape(Path(summary['input']).name)} → {escape(Path(summary['output']).name)}: {what}")
    if layers:
        console.print(_precision_table(layers))
    # Weighted layers kept in float are named; the ops between them are in the table's counts.
    kept = [layer for layer in layers if layer.get("precision") == "float" and layer.get("op") in WEIGHTED]
    for layer in kept:
        reason = f": {escape(str(layer['reason']))}" if layer.get("reason") else ""
        console.print(
            f"[dim]kept {escape(str(layer.get('precision')))}[/] {escape(str(layer['name']))}{reason}"
        )
    if summary.get("float_ops"):
        left = ", ".join(f"{op} ×{count}" for op, count in summary["float_ops"].items())
        console.print(f"ops left in float: {escape(left)}")
    console.print(_fidelity_line(summary))
    console.print(
        f"wrote {escape(summary['output'])}: {summary['output_bytes'] / 1e6:.3f} MB "
        f"({summary['size_ratio']:.2f}× the input's {summary['input_bytes'] / 1e6:.3f} MB)\n"
        f"[dim]{escape(summary['pipeline'])}[/]"
    )


def _precision_table(layers: list[dict]):
    """Layers counted by op type and precision: the shape of the result at a glance."""
    from collections import Counter

    from rich.table import Table

    counts = Counter((str(layer.get("op", "")), str(layer.get("precision", ""))) for layer in layers)
    precisions = sorted({precision for _, precision in counts})
    table = Table()
    table.add_column("op")
    for precision in precisions:
        table.add_column(precision, justify="right")
    for op in sorted({op for op, _ in counts}):
        table.add_row(op, *[str(counts.get((op, p), "")) or "" for p in precisions])
    return table


def _fidelity_line(summary: dict) -> str:
    fidelity = summary["fidelity"]
    line = (
        f"fidelity on {fidelity['data']}: SQNR {fidelity['sqnr_db']:.1f} dB, cosine {fidelity['cosine']:.5f}"
    )
    if fidelity.get("top1_agreement") is not None:
        line += f", top-1 agreement {100 * fidelity['top1_agreement']:.2f}%"
    accuracy = summary.get("accuracy")
    if accuracy:
        line += (
            f"\naccuracy: top-1 {100 * accuracy['top1_before']:.2f}% → {100 * accuracy['top1_after']:.2f}%"
            f" ({'drop' if accuracy['top1_drop'] >= 0 else 'gain'} {abs(accuracy['top1_drop']):.2f} points)"
        )
    return line
