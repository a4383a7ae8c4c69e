"""Recipes: strict loading of YAML/JSON, and --save-recipe round trips."""

from __future__ import annotations

import pytest

from polaris_opt.errors import BadInput
from polaris_opt.recipe import Recipe, load_recipe, save_recipe


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_yaml_with_a_list_pipeline(tmp_path):
    path = write(
        tmp_path, "r.yaml", "pipeline:\n  - cleanup\n  - fold-constants{max-size-mb=8}\nverify: numeric\n"
    )
    assert load_recipe(path) == Recipe("cleanup,fold-constants{max-size-mb=8}", verify="numeric")


def test_loads_json(tmp_path):
    path = write(tmp_path, "r.json", '{"pipeline": "cleanup", "seed": 3}')
    assert load_recipe(path) == Recipe("cleanup", seed=3)


@pytest.mark.parametrize("name", ["r.yaml", "r.json"])
def test_save_then_load_gives_the_same_recipe(tmp_path, name):
    recipe = Recipe("cleanup,fold-constants{max-size-mb=8}", verify="none", seed=7)
    assert load_recipe(save_recipe(recipe, tmp_path / name)) == recipe
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


@pytest.mark.parametrize("name", ["r.yaml", "r.json"])
def test_calibration_settings_round_trip(tmp_path, name):
    calibration = {"data": "images/", "batch_size": 8, "limit": 64, "image": {"size": [32, 32], "bgr": True}}
    recipe = Recipe("cleanup,calibrate{method=entropy},quantize", calibration=calibration)
    assert load_recipe(save_recipe(recipe, tmp_path / name)) == recipe


@pytest.mark.parametrize(
    "text, message",
    [
        ("pipeline: 3\n", "'pipeline' must be str or list, got int"),
        ("pipeline: cleanup\nseed: abc\n", "'seed' must be int, got str"),
        ("pipeline: cleanup\nseed: true\n", "'seed' must be int, got bool"),
        ("pipeline: [cleanup, 4]\n", "string or a list of strings"),
        ("pipeline: cleanup\nverify: sometimes\n", "'verify' must be one of"),
        (
            "pipeline: cleanup\ncolour: blue\n",
            "unknown key 'colour'; valid keys: calibration, pipeline, seed, verify",
        ),
        ("pipeline: cleanup\ncalibration: {batch_size: 4}\n", "'calibration' needs a 'data' key"),
        ("pipeline: cleanup\ncalibration: {data: x.npz, rows: 4}\n", "unknown key 'calibration.rows'"),
        (
            "pipeline: cleanup\ncalibration: {data: x.npz, batch_size: '4'}\n",
            "'calibration.batch_size' must be int",
        ),
        (
            "pipeline: cleanup\ncalibration: {data: d, image: {zoom: 2}}\n",
            "unknown key\\(s\\) in 'calibration.image'",
        ),
        ("verify: none\n", "missing required key 'pipeline'"),
        ("- cleanup\n", "expected a mapping"),
        ("pipeline: [unclosed\n", "invalid YAML"),
        ("pipeline: nosuchpass\n", "unknown pass 'nosuchpass'"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ],
)
def test_bad_recipes_are_refused(tmp_path, text, message):
    with pytest.raises(BadInput, match=message):
        load_recipe(write(tmp_path, "bad.yaml", text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_recipe(tmp_path / "absent.yaml")


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import polaris_opt.recipe as recipe_module

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recipe_module.os, "replace", refuse)
    with pytest.raises(BadInput, match="No space left"):
        save_recipe(Recipe("cleanup"), tmp_path / "r.yaml")
    assert list(tmp_path.iterdir()) == []
