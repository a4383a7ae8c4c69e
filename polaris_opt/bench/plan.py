"""From the command line's words to what will run: models, runtimes and the inputs of each batch.

Everything is checked here, before any worker starts: the model files, that the models take
the same inputs, the runtimes, --batch, --shape and the input file, and that the arrays made
fit every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polaris_opt.bench.feeds import (
    Feeds,
    check_feeds_fit,
    file_batch,
    file_feeds,
    load_npz,
    random_batch,
    random_feeds,
    unused_arrays,
)
from polaris_opt.bench.inputs import check_same_inputs, parse_batches, parse_shapes
from polaris_opt.bench.models import BenchModel, pair_models, parse_runtimes, read_model
from polaris_opt.errors import BadInput

RANDOM = "random"


@dataclass(frozen=True)
class BenchPlan:
    pairs: list[tuple[BenchModel, str]]  # (model, runtime) per contender, the baseline first
    feeds_by_batch: dict[int, Feeds]  # the same arrays go to every contender of a batch
    unused_arrays: list[str]  # arrays of the --input file that no model takes


def plan_bench(
    model_paths: list[Path],
    *,
    runtime: str = "ort",
    batch: str | None = None,
    input: str = RANDOM,
    shapes: list[str] | None = None,
    seed: int = 0,
) -> BenchPlan:
    """Check every argument and make the inputs; any problem is a one-line BadInput."""
    if not model_paths:
        raise BadInput("no model given; bench takes one or more ONNX files")
    models = [read_model(Path(path)) for path in model_paths]
    pairs = pair_models(models, parse_runtimes(runtime, len(models)))
    check_same_inputs([(model.path, model.inputs) for model in models])
    batches = parse_batches(batch) if batch is not None else None
    if input == RANDOM:
        feeds, unused = _random(models[0], batches, shapes or [], seed), []
    else:
        if shapes:
            raise BadInput(
                "--shape sets the shapes of random inputs; with --input FILE.npz the file gives them"
            )
        feeds, unused = _from_file(models[0], batches, Path(input))
    for model in models:
        for arrays in feeds.values():
            check_feeds_fit(model.path, model.inputs, arrays)
    return BenchPlan(pairs, feeds, unused)


def _random(first: BenchModel, batches: list[int] | None, shape_texts: list[str], seed: int) -> dict:
    shapes = parse_shapes(shape_texts, first.inputs)
    batches = batches or [random_batch(first.inputs, shapes)]
    return {batch: random_feeds(first.inputs, shapes, batch, seed) for batch in batches}


def _from_file(first: BenchModel, batches: list[int] | None, path: Path) -> tuple[dict, list[str]]:
    arrays = load_npz(path)
    batches = batches or [file_batch(arrays, first.inputs)]
    feeds = {batch: file_feeds(arrays, first.inputs, batch, path) for batch in batches}
    return feeds, unused_arrays(arrays, first.inputs)
