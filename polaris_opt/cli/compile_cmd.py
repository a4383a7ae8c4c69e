"""`polaris-opt compile`: run a pipeline or recipe over a model, the CI conversion step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polaris_opt.cli.calib_options import CacheDirOpt, CalibOpt, NoCacheFlag, ThreadsOpt
from polaris_opt.cli.options import DebugFlag, ForceFlag, JsonFlag, ModelArg, OutputOpt, QuietFlag

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
    calib: CalibOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheFlag = False,
    threads: ThreadsOpt = 1,
    force: ForceFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Run a pipeline (--pipeline) or recipe (--recipe) over MODEL and write the result to -o."""
    import gc

    from polaris_opt.cli import OUTPUT
    from polaris_opt.cli.calib_options import cache_folder
    from polaris_opt.compiler import run_pipeline
    from polaris_opt.graph_io import check_output_path, load_model, save_model
    from polaris_opt.passes_api import PassContext
    from polaris_opt.recipe import save_recipe as write_recipe

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    # Everything the command line says is checked before the model is read.
    chosen, steps, verify_mode = _choose_recipe(pipeline, recipe, verify)
    check_output_path(output, input_path=model, force=force)
    feeds = _load_feeds(sample_input) if sample_input else None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)

    source = load_model(model)
    ctx = PassContext(
        model_dir=model.parent,
        seed=chosen.seed,
        cache_dir=cache_folder(cache_dir, no_cache),
        calib=_calibration(chosen, calib, source),
        threads=threads,
        progress=out.progress,
    )
    for warning in getattr(ctx.calib, "warnings", []):
        out.warn(warning)
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
    # graph of the input holds them in reference cycles, which only a collection breaks.
    del source
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
    out.result(_summary(model, output, result), lambda console: _render(console, model, output, result))


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
    import numpy as np

    from polaris_opt.errors import BadInput

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: not a readable .npz of input arrays ({exc})") from None


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
        "passes": [asdict(report) for report in result.reports],
        "warnings": result.warnings,
    }


def _render(console, model: Path, output: Path, result) -> None:
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


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"
