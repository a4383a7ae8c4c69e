"""Recipe files: a pipeline plus its run settings, in YAML (safe_load) or JSON.

    # polaris-opt recipe
    pipeline: cleanup,calibrate{method=entropy},quantize
    verify: numeric
    seed: 0
    calibration:              # only for pipelines that calibrate
      data: models/resnet_s.calib.npz
      batch_size: 16

`pipeline` may also be a list of steps. A calibration `data` path is read relative to the
working directory, as it would be on the command line. Keys and types are checked strictly: a recipe from a
stranger is data, never code (DESIGN.md §10).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from polaris_opt import __version__
from polaris_opt.errors import BadInput
from polaris_opt.pipeline import Pipeline
from polaris_opt.verify import VerifyMode


@dataclass(frozen=True)
class Recipe:
    pipeline: str
    verify: str = VerifyMode.STRUCTURE.value
    seed: int = 0
    # Where calibration batches come from and how they are cut: data, batch_size, limit, image.
    calibration: dict | None = None

    def parsed_pipeline(self) -> Pipeline:
        return Pipeline.parse(self.pipeline)


_TYPES = {"pipeline": (str, list), "verify": (str,), "seed": (int,), "calibration": (dict,)}
_CALIBRATION_TYPES = {"data": (str,), "batch_size": (int,), "limit": (int,), "image": (dict,)}
_IMAGE_KEYS = {"size", "mean", "std", "layout", "bgr"}
# Written by --save-recipe for the reader's information; accepted and ignored on load.
_INFORMATIONAL = {"polaris-opt"}


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    data = _read_mapping(path)
    valid = {f.name for f in fields(Recipe)}
    for key, value in data.items():
        if key in _INFORMATIONAL:
            continue
        if key not in valid:
            raise BadInput(f"recipe {path}: unknown key '{key}'; valid keys: {', '.join(sorted(valid))}")
        _check_type(path, key, value)
    if "pipeline" not in data:
        raise BadInput(f"recipe {path}: missing required key 'pipeline'")
    pipeline = data["pipeline"]
    if isinstance(pipeline, list):
        if not all(isinstance(step, str) for step in pipeline):
            raise BadInput(f"recipe {path}: 'pipeline' must be a string or a list of strings")
        pipeline = ",".join(pipeline)
    verify = data.get("verify", Recipe.verify)
    if verify not in {m.value for m in VerifyMode}:
        raise BadInput(f"recipe {path}: 'verify' must be one of none, structure, numeric; got '{verify}'")
    calibration = data.get("calibration")
    if calibration is not None:
        _check_calibration(path, calibration)
    recipe = Recipe(
        pipeline=pipeline, verify=verify, seed=data.get("seed", Recipe.seed), calibration=calibration
    )
    recipe.parsed_pipeline()  # fail now, naming the recipe, rather than after loading the model
    return recipe


def _check_calibration(path: Path, calibration: dict) -> None:
    for key, value in calibration.items():
        if key not in _CALIBRATION_TYPES:
            valid = ", ".join(sorted(_CALIBRATION_TYPES))
            raise BadInput(f"recipe {path}: unknown key 'calibration.{key}'; valid keys: {valid}")
        allowed = _CALIBRATION_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise BadInput(f"recipe {path}: 'calibration.{key}' must be {allowed[0].__name__}, got {value!r}")
    if "data" not in calibration:
        raise BadInput(f"recipe {path}: 'calibration' needs a 'data' key (a file, a folder or 'random')")
    unknown = set(calibration.get("image", {})) - _IMAGE_KEYS
    if unknown:
        raise BadInput(f"recipe {path}: unknown key(s) in 'calibration.image': {', '.join(sorted(unknown))}")


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"recipe {path}: cannot read ({exc})") from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise BadInput(f"recipe {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _parse(path: Path, text: str):
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"recipe {path}: invalid JSON ({exc})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInput(f"recipe {path}: invalid YAML ({str(exc).splitlines()[0]})") from None


def _check_type(path: Path, key: str, value) -> None:
    allowed = _TYPES[key]
    # bool is an int in Python; `seed: true` is still a mistake.
    if isinstance(value, bool) or not isinstance(value, allowed):
        names = " or ".join("list" if t is list else t.__name__ for t in allowed)
        raise BadInput(f"recipe {path}: '{key}' must be {names}, got {type(value).__name__} ({value!r})")


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write `recipe` atomically; JSON for a .json name, YAML otherwise."""
    path = Path(path)
    data = {"polaris-opt": __version__, **asdict(recipe)}
    if data["calibration"] is None:
        del data["calibration"]
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = "# polaris-opt recipe: re-run with `polaris-opt compile MODEL --recipe THIS -o OUT`\n"
        text += yaml.safe_dump(data, sort_keys=False)
    parent = path.parent if str(path.parent) else Path(".")
    staged = None
    try:
        handle, staged = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(staged, path)
    except OSError as exc:
        if staged is not None:
            Path(staged).unlink(missing_ok=True)  # never leave a half-written recipe behind
        raise BadInput(f"recipe {path}: cannot write ({exc.strerror or exc})") from None
    return path
