"""`polaris-opt compile`: run a pipeline or recipe over a model, the CI conversion step.

With `--check` gates the output model is measured against the input model (polaris_opt.gates,
polaris_opt.gate_fidelity) and the command exits 1 when a gate fails, after writing the output
model and any --report, so a CI job can upload both for inspection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polaris_opt.cli.calib_options import CacheDirOpt, CalibOpt, NoCacheFlag, ThreadsOpt
from polaris_opt.cli.options import DebugFlag, ForceFlag, JsonFlag, ModelArg, OutputOpt, QuietFlag, ReportOpt

GATES = "Quality gates"
# Inputs with this many bytes of weights are collected from memory before the output is saved.
COLLECT_ABOVE = 64 * 2**20

PipelineOpt = Annotated[
    str | None, typer.Option("--pipeline", "-p", help="Pipeline text, e.g. 'cleanup' or 'a,b{k=v}'.")
]
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="A recipe file (YAML or JSON).")]
VerifyOpt = Annotated[
    str | None,
    typer.Option(
        "--verify", help="Check after each pass: none | structure | numeric (outputs vs the input model)."
    ),
]
SampleOpt = Annotated[
    Path | None,
    typer.Option("--input", help="Sample inputs (.npz, input name → array) for --verify numeric."),
]
SaveRecipeOpt = Annotated[
    Path | None, typer.Option("--save-recipe", help="Write the recipe that reproduces this run.")
]
ExternalDataOpt = Annotated[
    bool,
    typer.Option("--external-data", help="Store weights in a side file OUT.data (automatic above 2 GB)."),
]
DumpOpt = Annotated[Path | None, typer.Option("--dump-dir", help="Save the graph after every pass here.")]
CheckOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--check",
        rich_help_panel=GATES,
        show_default=False,
        help="A quality gate 'METRIC OP NUMBER' (repeatable), e.g. 'sqnr>=30', 'top1_drop <= 0.5'. "
        "OP: >=, <=, >, <, ==. METRIC: sqnr (dB), cosine, top1_agreement (%), top1 (accuracy %, "
        "needs labels), top1_drop (points, needs labels), size_ratio (output/input bytes), "
        "max_abs_err. Exit code 1 when a gate fails; the output model is still written, for inspection.",
    ),
]
EvalOpt = Annotated[
    Path | None,
    typer.Option(
        "--eval",
        rich_help_panel=GATES,
        show_default=False,
        help="Data the gates measure on (.npz): the model's inputs by name, plus labels: the array "
        "'labels', else 'y', else the one array not named after an input. Without it: the "
        "calibration data, else --input, else seeded random inputs.",
    ),
]


def compile(
    model: ModelArg,
    output: OutputOpt,
    pipeline: PipelineOpt = None,
    recipe: RecipeOpt = None,
    verify: VerifyOpt = None,
    sample_input: SampleOpt = None,
    save_recipe: SaveRecipeOpt = None,
    external_data: ExternalDataOpt = False,
    dump_dir: DumpOpt = None,
    check: CheckOpt = None,
    eval_path: EvalOpt = None,
    report: ReportOpt = None,
    calib: CalibOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheFlag = False,
    threads: ThreadsOpt = 1,
    force: ForceFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Run a pipeline (--pipeline) or recipe (--recipe) over MODEL and write the result to -o;
    with --check, measure it against MODEL and exit 1 when a quality gate fails."""
    import gc

    from polaris_opt.cli import OUTPUT
    from polaris_opt.cli.calib_options import cache_folder
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.gate_fidelity import ModelFile
    from polaris_opt.gates import parse_checks
    from polaris_opt.graph_io import check_output_path, load_model, save_model, tensor_bytes
    from polaris_opt.passes_api import PassContext
    from polaris_opt.recipe import save_recipe as write_recipe
    from polaris_opt.runtime.partition import has_polaris_nodes

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    # Everything the command line says is checked before the model is read.
    checks = parse_checks(check)
    chosen, steps, verify_mode = _choose_recipe(pipeline, recipe, verify)
    check_output_path(output, input_path=model, force=force)
    _check_reports(report, model, output)
    _check_labels_given(checks, eval_path)
    feeds = _load_feeds(sample_input) if sample_input else None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    for warning in filter(None, (c.warning() for c in checks)):
        out.warn(warning)

    source = load_model(model)
    cache = cache_folder(cache_dir, no_cache)
    ctx = PassContext(
        model_dir=model.parent,
        seed=chosen.seed,
        cache_dir=cache,
        calib=_calibration(chosen, calib, source),
        threads=threads,
        progress=out.progress,
    )
    for warning in getattr(ctx.calib, "warnings", []):
        out.warn(warning)
    measuring = bool(checks or eval_path or report)
    # The data is chosen and checked before any pass runs: a bad --eval fails at once.
    data = _fidelity_data(checks, eval_path, ctx, feeds, source, chosen.seed, out) if measuring else None
    reference = ModelFile(model, polaris=has_polaris_nodes(source))
    with out.progress("passes", total=len(steps.passes())) as advance:
        result = run_pipeline(
            source,
            steps,
            ctx=ctx,
            verify=verify_mode,
            feeds=feeds,
            dump_dir=dump_dir,
            on_pass=lambda _report: advance(1),
        )
    # Free the input's weights before the result is serialised beside them; graphsurgeon's
    # graph of the input holds them in reference cycles, which only a collection breaks. A
    # collection costs ~25 ms (a CI re-run's whole pipeline is ~150 ms): only where it pays.
    big_input = tensor_bytes(source) >= COLLECT_ABOVE
    del source
    if big_input:
        gc.collect()
    for warning in result.warnings:
        out.warn(warning)
    save_model(
        result.model,
        output,
        pipeline=result.pipeline,
        external_data=external_data or None,
        input_path=model,
        force=force,
    )
    if save_recipe is not None:
        write_recipe(chosen, save_recipe)
    summary = _summary(model, output, result)
    gates = []
    if data is not None:
        candidate = ModelFile(output, polaris=has_polaris_nodes(result.model))
        gates = _judge(summary, reference, candidate, checks, data, cache=cache, threads=threads, out=out)
    out.result(_strict(summary), lambda console: _render(console, model, output, result, summary, gates))
    if report:
        _write_reports(report, model, output, summary)
    _fail_on_gates(gates, output)


def _check_reports(report: list[Path] | None, model: Path, output: Path) -> None:
    if report:
        from polaris_opt.report import check_report_paths

        check_report_paths(report, model, output)


def _check_labels_given(checks, eval_path: Path | None) -> None:
    from polaris_opt.errors import BadInput
    from polaris_opt.gates import label_checks

    needing = label_checks(checks)
    if needing and eval_path is None:
        raise BadInput(
            f"--check '{needing[0].text}' needs labelled data: give --eval DATA.npz with the "
            "model's inputs and a 'labels' array"
        )


def _fidelity_data(checks, eval_path: Path | None, ctx, feeds, source, seed: int, out):
    """The data the gates measure on, loaded and checked (labels included) before any pass runs."""
    from polaris_opt.errors import BadInput
    from polaris_opt.gate_fidelity import choose_data, load_eval_data
    from polaris_opt.gates import label_checks

    eval_data = load_eval_data(eval_path, source) if eval_path is not None else None
    needing = label_checks(checks)
    if needing and eval_data.labels is None:
        raise BadInput(
            f"--check '{needing[0].text}' needs labels, but --eval {eval_path} has no 'labels' or 'y' "
            "array (nor exactly one array besides the model's inputs)"
        )
    data = choose_data(eval_data, ctx.calib, feeds, source, seed=seed)
    for warning in data.warnings:
        out.warn(warning)
    if not data.trustworthy:
        out.warn(
            f"fidelity is measured on {data.what}, which says nothing about real data; give --eval DATA.npz"
        )
    return data


def _judge(summary: dict, reference, candidate, checks, data, *, cache, threads: int, out):
    """Measure `candidate` against `reference` on `data`, record it in `summary`; the gates, evaluated."""
    from polaris_opt.gate_fidelity import measure
    from polaris_opt.gates import evaluate, measurements

    fidelity = measure(reference, candidate, data, cache_dir=cache, threads=threads, progress=out.progress)
    if fidelity["problem"]:
        out.warn(f"fidelity not measured: {fidelity['problem']}")
    summary["size_ratio"] = candidate.stored_bytes() / max(reference.stored_bytes(), 1)
    summary["fidelity"] = fidelity
    gates = evaluate(checks, measurements(fidelity, summary["size_ratio"]))
    summary["gates"] = [gate.as_dict() for gate in gates]
    return gates


def _write_reports(paths: list[Path], model: Path, output: Path, summary: dict) -> None:
    from polaris_opt.report import build_report, write_reports

    document = build_report(
        "compile",
        model,
        output,
        _strict(summary),
        fidelity=summary.get("fidelity"),
        gates=summary.get("gates"),
    )
    write_reports(document, paths)


def _fail_on_gates(gates, output: Path) -> None:
    """Exit code 1 (GateFailed) when a gate failed, naming each failed gate and what was measured."""
    from polaris_opt.errors import GateFailed
    from polaris_opt.gates import failed

    failures = failed(gates)
    if failures:
        listed = "; ".join(f"{gate.check.text}: measured {gate.shown()}" for gate in failures)
        raise GateFailed(
            f"{len(failures)} of {len(gates)} quality gates failed ({listed}); "
            f"the output model is written to {output} for inspection"
        )


def _strict(value):
    """`value` with non-finite floats as None, for strict JSON (an SQNR of +inf: no error at all)."""
    import math

    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _choose_recipe(pipeline: str | None, recipe_path: Path | None, verify: str | None):
    from dataclasses import replace

    from polaris_opt.errors import BadInput
    from polaris_opt.recipe import Recipe, load_recipe

    if (pipeline is None) == (recipe_path is None):
        raise BadInput("give exactly one of --pipeline TEXT or --recipe FILE")
    chosen = load_recipe(recipe_path) if recipe_path else Recipe(pipeline=pipeline)
    if verify is not None:
        chosen = replace(chosen, verify=verify)
    return chosen, chosen.parsed_pipeline(), _verify_mode(chosen.verify)


def _calibration(recipe, calib: str | None, model):
    """The calibration source: --calib wins over the recipe's `calibration.data`; None when neither."""
    settings = dict(recipe.calibration or {})
    if calib is not None:
        settings["data"] = calib
    if "data" not in settings:
        return None
    from polaris_opt.calib_data import ImageSpec, open_calibration

    image = settings.get("image")
    if image is not None:
        image = ImageSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in image.items()})
    return open_calibration(
        settings["data"],
        model,
        batch_size=settings.get("batch_size", 16),
        limit=settings.get("limit"),
        image=image,
        seed=recipe.seed,
    )


def _verify_mode(text: str):
    from polaris_opt.errors import BadInput
    from polaris_opt.verify import VerifyMode

    try:
        return VerifyMode(text)
    except ValueError:
        raise BadInput(f"--verify must be one of none, structure, numeric; got '{text}'") from None


def _load_feeds(path: Path) -> dict:
    from polaris_opt.bench.feeds import load_npz

    return load_npz(path)


def _summary(model: Path, output: Path, result) -> dict:
    from dataclasses import asdict

    return {
        "input": str(model),
        "output": str(output),
        "pipeline": result.pipeline,
        "verify": result.verify.value,
        "input_bytes": model.stat().st_size,
        "output_bytes": output.stat().st_size,
        "seconds": sum(r.seconds + r.verify_seconds for r in result.reports),
        "calibration": _calibration_status(result),
        "passes": [asdict(report) for report in result.reports],
        "warnings": result.warnings,
    }


def _calibration_status(result) -> str | None:
    """'cached' when every calibrate pass loaded its statistics, 'computed' otherwise, None without one."""
    cached = [report.stats.get("cached") for report in result.reports if report.step.startswith("calibrate")]
    if not cached:
        return None
    return "cached" if all(cached) else "computed"


def _render(console, model: Path, output: Path, result, summary: dict, gates) -> None:
    _render_passes(console, model, output, result)
    if summary["calibration"] == "cached":
        console.print("calibration: statistics loaded from the cache (calibration skipped)")
    if summary.get("fidelity") is not None:
        for line in _fidelity_lines(summary["fidelity"]):
            console.print(line)
    if gates:
        _render_gates(console, gates)


def _render_passes(console, model: Path, output: Path, result) -> None:
    from rich.table import Table

    table = Table(title=f"{model.name} → {output.name}   [dim]{result.pipeline}[/]", title_justify="left")
    for column in ("pass", "time", "verify", "nodes", "changed"):
        table.add_column(column, justify="right" if column in ("time", "verify", "nodes") else "left")
    for report in result.reports:
        nodes = f"{report.nodes_before} → {report.nodes_after}"
        changed = ", ".join(f"{k}={v}" for k, v in report.stats.items() if v) or "—"
        table.add_row(
            report.step,
            f"{report.seconds * 1000:.1f} ms",
            f"{report.verify_seconds * 1000:.1f} ms",
            nodes,
            changed if report.modified else f"[dim]{changed}[/]",
        )
    console.print(table)
    size_in, size_out = model.stat().st_size, output.stat().st_size
    console.print(
        f"wrote {output} ({_megabytes(size_out)}, input {_megabytes(size_in)}); verify: {result.verify.value}"
    )


def _fidelity_lines(fidelity: dict) -> list[str]:
    """What fidelity was measured on, then the figures: agreement with the input model, accuracy."""
    from polaris_opt.gates import METRICS, format_value, measurements

    measured = measurements(fidelity, 0.0)
    lines = [f"fidelity on {fidelity['data']}"]
    agreement = [
        f"{label} {format_value(METRICS[metric], measured[metric])}"
        for label, metric in (("SQNR", "sqnr"), ("cosine", "cosine"), ("top-1 agreement", "top1_agreement"))
        if measured[metric] is not None
    ]
    lines.append("  " + (", ".join(agreement) or "not measured"))
    if measured["top1"] is not None:
        reference = format_value(METRICS["top1"], 100.0 * fidelity["top1_accuracy_reference"])
        lines.append(
            f"  top-1 accuracy {format_value(METRICS['top1'], measured['top1'])} (input model {reference})"
        )
    hits = fidelity["cached"]
    cached = [name for name, hit in (("input", hits["reference"]), ("output", hits["output"])) if hit]
    if cached:
        models = f"{' and '.join(cached)} model{'s' if len(cached) > 1 else ''}"
        lines.append(f"  [dim]outputs of the {models} loaded from the cache[/]")
    return lines


def _render_gates(console, gates) -> None:
    from rich.table import Table

    table = Table(title="quality gates", title_justify="left")
    for column, justify in (("gate", "left"), ("measured", "right"), ("result", "left")):
        table.add_column(column, justify=justify)
    for gate in gates:
        verdict = "[green]pass[/]" if gate.passed else "[bold red]FAIL[/]"
        table.add_row(gate.check.text, gate.shown(), verdict)
    console.print(table)
    failures = sum(not gate.passed for gate in gates)
    if failures:
        console.print(f"[bold red]{failures} of {len(gates)} gates failed[/]")
    else:
        console.print(f"[green]all {len(gates)} gates passed[/]")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"
