"""`polaris-opt compile` end to end, through the real console script: results and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from polaris_opt.numerics import compare_outputs, run_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CLI = Path(sys.executable).parent / "polaris-opt"


def polaris(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


def sample(name: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{name}.input.npz") as archive:
        return {key: archive[key] for key in archive.files}


def test_version():
    result = polaris("--version")
    assert result.returncode == 0 and result.stdout.startswith("polaris-opt ")


def test_compile_cleanup_keeps_outputs_and_records_the_pipeline(tmp_path):
    out = tmp_path / "resnet.clean.onnx"
    result = polaris(
        "compile", MODELS / "resnet_s.onnx", "--pipeline", "cleanup", "--verify", "numeric", "-o", out
    )
    assert result.returncode == 0, result.stderr
    cleaned = onnx.load(out)
    assert not any(node.op_type == "BatchNormalization" for node in cleaned.graph.node)
    props = {p.key: p.value for p in cleaned.metadata_props}
    assert props["polaris-opt.pipeline"] == "cleanup"
    feeds = sample("resnet_s")
    assert not compare_outputs(
        run_model(onnx.load(MODELS / "resnet_s.onnx"), feeds), run_model(cleaned, feeds)
    )
    for column in ("fold-batchnorm", "infer-shapes", "nodes"):
        assert column in result.stdout


def test_compile_json_reports_every_pass(tmp_path):
    out = tmp_path / "o.onnx"
    result = polaris("--json", "compile", MODELS / "digits_cnn.onnx", "-p", "cleanup", "-o", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [p["step"] for p in report["passes"]][0] == "lift-constants"
    assert len(report["passes"]) == 6
    folded = next(p for p in report["passes"] if p["step"] == "fold-batchnorm")
    assert folded["stats"]["folded"] == 2 and folded["nodes_after"] < folded["nodes_before"]
    assert report["output_bytes"] == out.stat().st_size


def test_saved_recipe_reproduces_the_run_byte_for_byte(tmp_path):
    first, second, recipe = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "r.yaml"
    model = MODELS / "mobilenetv2_s.onnx"
    result = polaris(
        "compile", model, "-p", "cleanup,fold-constants{max-size-mb=8}", "-o", first, "--save-recipe", recipe
    )
    assert result.returncode == 0, result.stderr
    assert polaris("compile", model, "--recipe", recipe, "-o", second).returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_the_input_is_never_changed(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(MODELS / "digits_cnn.onnx", model)
    before = model.read_bytes()
    result = polaris("compile", model, "-p", "cleanup", "-o", model)
    assert result.returncode == 2 and "overwrite the input" in one_line_error(result)
    assert model.read_bytes() == before
    assert polaris("compile", model, "-p", "cleanup", "-o", model, "--force").returncode == 0
    assert model.read_bytes() != before


def bad_files(tmp_path: Path) -> dict[str, Path]:
    whole = (MODELS / "resnet_s.onnx").read_bytes()
    files = {
        "not-onnx": ("notes.onnx", b"hello, this is a text file\n" * 20),
        "empty": ("empty.onnx", b""),
        "truncated": ("cut.onnx", whole[: len(whole) // 2]),
    }
    paths = {}
    for key, (name, content) in files.items():
        paths[key] = tmp_path / name
        paths[key].write_bytes(content)
    return paths


def external_model(folder: Path, location: str) -> Path:
    model = onnx.load(MODELS / "digits_mlp.onnx")
    tensor = model.graph.initializer[0]
    data = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        tensor.external_data.add(key=key, value=value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("kind", ["not-onnx", "empty", "truncated"])
def test_bad_model_files(tmp_path, kind):
    out = tmp_path / "out.onnx"
    result = polaris("compile", bad_files(tmp_path)[kind], "-p", "cleanup", "-o", out)
    assert result.returncode == 2
    assert one_line_error(result).startswith("polaris-opt: error: ")
    assert not out.exists()


def test_missing_external_data(tmp_path):
    out = tmp_path / "out.onnx"
    result = polaris("compile", external_model(tmp_path / "m", "weights.bin"), "-p", "cleanup", "-o", out)
    assert result.returncode == 2 and "missing" in one_line_error(result)
    assert not out.exists()


def test_external_data_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(os.urandom(64 * 64 * 4))
    out = tmp_path / "out.onnx"
    result = polaris("compile", external_model(tmp_path / "m", "../secret.bin"), "-p", "cleanup", "-o", out)
    assert result.returncode == 2 and "outside the model's folder" in one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize("where", ["no/such/folder/out.onnx", "afile/out.onnx"])
def test_unwritable_output(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    result = polaris("compile", MODELS / "digits_mlp.onnx", "-p", "cleanup", "-o", tmp_path / where)
    assert result.returncode == 2 and "cannot write" in one_line_error(result)


@pytest.mark.parametrize(
    "pipeline, expected",
    [
        ("cleanup,frobnicate", "valid passes: calibrate, convert-fp16, correct-bias, eliminate-dead-code"),
        ("fold-constants{turbo=1}", "valid options:"),
    ],
)
def test_unknown_pass_or_option(tmp_path, pipeline, expected):
    out = tmp_path / "out.onnx"
    result = polaris("compile", MODELS / "digits_mlp.onnx", "-p", pipeline, "-o", out)
    assert result.returncode == 2 and expected in one_line_error(result)
    assert not out.exists()


def test_recipe_with_a_wrong_type(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: cleanup\nseed: [1, 2]\n")
    out = tmp_path / "out.onnx"
    result = polaris("compile", MODELS / "digits_mlp.onnx", "--recipe", recipe, "-o", out)
    assert result.returncode == 2 and "'seed' must be int" in one_line_error(result)
    assert not out.exists()


def test_pipeline_and_recipe_together_is_a_usage_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: cleanup\n")
    result = polaris(
        "compile", MODELS / "digits_mlp.onnx", "-p", "cleanup", "-r", recipe, "-o", tmp_path / "o.onnx"
    )
    assert result.returncode == 2 and "exactly one of" in one_line_error(result)


def test_debug_shows_the_traceback(tmp_path):
    bad = bad_files(tmp_path)["empty"]
    result = polaris("--debug", "compile", bad, "-p", "cleanup", "-o", tmp_path / "o.onnx")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_passes_lists_every_pass_with_its_options():
    from polaris_opt.passes import ALIASES, PASSES

    result = polaris("passes", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [row["name"] for row in listed["passes"]] == list(PASSES)
    assert [row["name"] for row in listed["aliases"]] == list(ALIASES)
    fold = next(row for row in listed["passes"] if row["name"] == "fold-constants")
    assert "max-size-mb: float = 64.0" in fold["options"]
