"""The models under test: read once in the parent (sizes, inputs, ops) and paired with a runtime.

The parent reads each model without its external data, which is enough to check every model
and every input before a worker starts; the workers load the models themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from polaris_opt.bench.inputs import DeclaredInput, declared_inputs
from polaris_opt.errors import BadInput

RUNTIMES = ("ort", "polaris")  # onnxruntime.InferenceSession | polaris_opt.runtime.Session


@dataclass(frozen=True)
class BenchModel:
    path: Path
    file_bytes: int  # the .onnx file plus the external data files it names
    inputs: tuple[DeclaredInput, ...]
    polaris_ops: bool  # has ai.polaris nodes, which only the polaris runtime runs


def read_model(path: Path) -> BenchModel:
    """Check and describe the model at `path`; a missing or malformed file is a BadInput."""
    from polaris_opt.graph_io import load_model
    from polaris_opt.runtime.partition import has_polaris_nodes

    model = load_model(path, load_external_data=False)
    return BenchModel(
        path=path,
        file_bytes=path.stat().st_size + _external_bytes(model, path.parent),
        inputs=declared_inputs(model, path),
        polaris_ops=has_polaris_nodes(model),
    )


def _external_bytes(model: onnx.ModelProto, folder: Path) -> int:
    """Bytes of the side files the model's tensors point at, each file counted once."""
    from polaris_opt.graph_io import iter_model_tensors

    locations = {
        entry.value
        for tensor in iter_model_tensors(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    # load_model has checked each location stays inside the model's folder and exists.
    return sum((folder / location).stat().st_size for location in locations if (folder / location).is_file())


def parse_runtimes(text: str, model_count: int) -> list[str]:
    """`--runtime` → one runtime per contender model.

    One name applies to every model; as many names as models pair them in order (a dense model
    on ort against its sparsified twin on polaris); several names for one model run it on each.
    """
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown:
        raise BadInput(
            f"--runtime '{text}': unknown runtime '{unknown[0]}'; choose from {', '.join(RUNTIMES)}"
        )
    if len(names) == 1:
        return names * model_count
    if len(names) == model_count or model_count == 1:
        return names
    raise BadInput(
        f"--runtime '{text}': {len(names)} runtimes for {model_count} models; give one runtime, "
        "or one per model"
    )


def pair_models(models: list[BenchModel], runtimes: list[str]) -> list[tuple[BenchModel, str]]:
    """(model, runtime) per contender, refusing ai.polaris models on plain ONNX Runtime."""
    if len(models) == 1:
        models = models * len(runtimes)
    for model, runtime in zip(models, runtimes, strict=True):
        if runtime == "ort" and model.polaris_ops:
            raise BadInput(
                f"{model.path}: has ai.polaris ops, which ONNX Runtime cannot run; use --runtime polaris "
                "(or one runtime per model, e.g. --runtime ort,polaris)"
            )
    return list(zip(models, runtimes, strict=True))
