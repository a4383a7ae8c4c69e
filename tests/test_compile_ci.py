"""`polaris-opt compile` as a CI step, end to end through the console script: quality gates and
their exit codes, the data they measure on, byte-identical output, the warm cache, the reports,
and the workflow of docs/ci.md run as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from polaris_opt.numerics import run_model
from polaris_opt.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CLI = Path(sys.executable).parent / "polaris-opt"
CNN, CNN_EVAL = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.eval.npz"
MLP = MODELS / "digits_mlp.onnx"
RECIPE = ROOT / "examples" / "ci" / "recipe.yaml"
PASSING = ("top1_drop<=0.5", "sqnr>=12", "size_ratio<=0.7", "top1_agreement>=98", "cosine>=0.98")


def polaris(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    # From the repository root: the CI recipe's calibration path is relative to it, as in CI.
    return subprocess.run(
        [str(CLI), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
    )


def checks(*texts: str) -> list[str]:
    return [arg for text in texts for arg in ("--check", text)]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    return lines[0]


def ci_compile(out: Path, cache: Path, *extra, env=None) -> subprocess.CompletedProcess:
    return polaris("compile", CNN, "--recipe", RECIPE, "-o", out, "--cache-dir", cache, *extra, env=env)


def test_passing_gates_exit_0_and_report_what_they_measured(tmp_path):
    out = tmp_path / "cnn.onnx"
    result = ci_compile(out, tmp_path / "cache", "--eval", CNN_EVAL, "--json", *checks(*PASSING))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [g["check"] for g in summary["gates"]] == list(PASSING)
    assert all(g["passed"] for g in summary["gates"]) and summary["calibration"] == "computed"
    fidelity = summary["fidelity"]
    assert fidelity["samples"] == 450 and fidelity["data"].startswith("--eval digits_cnn.eval.npz")
    # The figures, measured independently: both models on the whole --eval set in ONNX Runtime.
    with np.load(CNN_EVAL) as archive:
        x, labels = archive["input"], archive["labels"]
    ref = run_model(onnx.load(CNN), {"input": x})["logits"]
    got = run_model(onnx.load(out), {"input": x})["logits"]
    assert fidelity["top1_accuracy_reference"] == pytest.approx(444 / 450)  # models/README.md
    assert fidelity["top1_accuracy"] == pytest.approx(np.mean(got.argmax(1) == labels))
    drop = 100 * (np.mean(ref.argmax(1) == labels) - np.mean(got.argmax(1) == labels))
    assert summary["gates"][0]["value"] == pytest.approx(drop)
    noise = np.sum((ref.astype(np.float64) - got) ** 2)
    assert fidelity["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise))
    assert summary["size_ratio"] == pytest.approx(out.stat().st_size / CNN.stat().st_size)


def test_a_failing_gate_exits_1_and_still_writes_the_model_and_the_reports(tmp_path):
    out, html, report = tmp_path / "cnn.onnx", tmp_path / "report.html", tmp_path / "report.json"
    result = ci_compile(
        out, tmp_path / "cache", *checks("sqnr>=60", "size_ratio<=0.7"), "--report", html, "--report", report
    )
    assert result.returncode == 1
    document = json.loads(report.read_text())
    assert [(g["check"], g["passed"]) for g in document["gates"]] == [
        ("sqnr>=60", False),
        ("size_ratio<=0.7", True),
    ]
    assert document["fidelity"]["samples"] == 256  # no --eval: the recipe's calibration data
    sqnr = f"{document['gates'][0]['value']:.1f} dB"
    assert re.search(rf"│ sqnr>=60 +│ +{sqnr} │ FAIL", result.stdout), result.stdout
    assert re.search(r"│ size_ratio<=0\.7 +│ +0\.6222 │ pass", result.stdout)
    assert "1 of 2 gates failed" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"polaris-opt: error: 1 of 2 quality gates failed (sqnr>=60: measured {sqnr})")
    onnx.checker.check_model(onnx.load(out))  # written whole, ready to inspect
    assert "sqnr&gt;=60" in html.read_text()


@pytest.mark.parametrize(
    "text, says",
    [
        ("sqnr 30", "expected METRIC OP NUMBER"),
        ("psnr>=30", "unknown metric 'psnr'"),
        ("sqnr>=high", "'high' is not a number"),
    ],
)
def test_a_bad_check_is_refused_before_any_work(tmp_path, text, says):
    out, cache = tmp_path / "o.onnx", tmp_path / "cache"
    result = ci_compile(out, cache, *checks("sqnr>=12", text))
    assert result.returncode == 2
    line = one_line_error(result)
    assert line.startswith(f"polaris-opt: error: --check '{text}': ") and says in line
    assert not out.exists() and not cache.exists()  # nothing calibrated, nothing written


def test_label_gates_need_labelled_eval_data(tmp_path):
    out, cache = tmp_path / "o.onnx", tmp_path / "cache"
    result = ci_compile(out, cache, *checks("top1_drop<=0.5"))
    assert result.returncode == 2
    assert "--check 'top1_drop<=0.5' needs labelled data: give --eval DATA.npz" in one_line_error(result)
    unlabelled = tmp_path / "inputs.npz"
    with np.load(CNN_EVAL) as archive:
        np.savez(unlabelled, input=archive["input"][:10])
    result = ci_compile(out, cache, "--eval", unlabelled, *checks("top1>=90"))
    assert result.returncode == 2
    assert "needs labels, but --eval" in one_line_error(result)
    assert not out.exists() and not cache.exists()


def test_the_output_is_byte_identical_cold_warm_and_in_any_process(tmp_path):
    cold, other, warm = tmp_path / "cold.onnx", tmp_path / "other.onnx", tmp_path / "warm.onnx"
    # Hash seeds differ per process: an iteration over a set of names would show here.
    first = ci_compile(cold, tmp_path / "cache", env={"PYTHONHASHSEED": "1"})
    second = ci_compile(other, tmp_path / "other-cache", env={"PYTHONHASHSEED": "2"})
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "calibration skipped" not in first.stdout
    rerun = ci_compile(
        warm, tmp_path / "cache", "--eval", CNN_EVAL, *checks("sqnr>=12"), env={"PYTHONHASHSEED": "3"}
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "calibration: statistics loaded from the cache (calibration skipped)" in rerun.stdout
    assert re.search(r"calibrate\{method=entro.*│.*cached=1", rerun.stdout, flags=re.S)
    assert cold.read_bytes() == other.read_bytes() == warm.read_bytes()
    again = ci_compile(tmp_path / "again.onnx", tmp_path / "cache", "--eval", CNN_EVAL, *checks("sqnr>=12"))
    assert "outputs of the input and output models loaded from the cache" in again.stdout


def test_without_eval_the_gates_use_the_input_samples_else_random_inputs(tmp_path):
    result = polaris(
        "compile", MLP, "-p", "cleanup", "-o", tmp_path / "a.onnx", "--no-cache", "--json",
        "--input", MODELS / "digits_mlp.input.npz", *checks("cosine>=0.999999"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fidelity"]["data"] == "the --input samples (2 samples)"
    result = polaris(
        "compile",
        MLP,
        "-p",
        "cleanup",
        "-o",
        tmp_path / "b.onnx",
        "--no-cache",
        "--json",
        *checks("sqnr>=100"),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["fidelity"]["data"] == "random inputs (seed 0, 64 samples)"
    assert "fidelity is measured on random inputs" in result.stderr
    # A clean-up changes no output: SQNR +inf, written null in strict JSON, and the gate passes.
    assert summary["gates"] == [{"check": "sqnr>=100", "metric": "sqnr", "value": None, "passed": True}]
    assert summary["fidelity"]["sqnr_db"] is None and summary["fidelity"]["max_abs_error"] < 1e-5


def test_a_sparsified_output_is_measured_on_the_polaris_runtime(tmp_path):
    pruned, sparse = tmp_path / "pruned.onnx", tmp_path / "sparse.onnx"
    common = ("--eval", MODELS / "digits_mlp.eval.npz", "--no-cache", "--json", *checks("top1_drop<=50"))
    dense = polaris("compile", MLP, "-p", "cleanup,prune{sparsity=0.8}", "-o", pruned, *common)
    result = polaris("compile", MLP, "-p", "cleanup,prune{sparsity=0.8},sparsify", "-o", sparse, *common)
    assert dense.returncode == 0 and result.returncode == 0, dense.stderr + result.stderr
    assert any(node.domain == "ai.polaris" for node in onnx.load(sparse).graph.node)
    # SparseMatMul computes what the dense pruned weights compute: the same fidelity.
    on_polaris, on_ort = json.loads(result.stdout)["fidelity"], json.loads(dense.stdout)["fidelity"]
    assert on_polaris["top1_accuracy"] == on_ort["top1_accuracy"]
    assert on_polaris["sqnr_db"] == pytest.approx(on_ort["sqnr_db"], abs=0.01)


def test_the_ci_recipe_loads_and_calibrates_with_entropy():
    recipe = load_recipe(RECIPE)
    assert recipe.pipeline == "cleanup,prune{sparsity=0.3},calibrate{method=entropy},quantize"
    assert (ROOT / recipe.calibration["data"]).is_file() and recipe.verify == "structure"


def workflow() -> dict:
    text = (ROOT / "docs" / "ci.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "jobs:" in b]
    return yaml.safe_load(block)


def test_the_documented_workflow_runs_as_written(tmp_path):
    job = workflow()["jobs"]["convert"]
    steps = {step.get("name", step.get("uses")): step for step in job["steps"]}
    assert steps["actions/setup-python@v5"]["with"]["python-version"] == "3.11"
    assert steps["Restore the calibration cache"]["with"]["path"] == job["env"]["CACHE"]
    assert steps["Save the calibration cache"]["if"].startswith("always()")
    upload = steps["Upload the optimized model and its report"]
    assert upload["if"] == "always()" and upload["uses"].startswith("actions/upload-artifact@")
    # The conversion step, run by bash in a copy of the repository's layout, as the runner would.
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("models", "examples"):
        (work / name).symlink_to(ROOT / name)
    script = steps["Convert and check"]["run"]
    env = {**os.environ, **job["env"], "PATH": f"{CLI.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "all 3 gates passed" in done.stdout
    for path in upload["with"]["path"].split():
        assert (work / path).is_file(), path
    assert list((work / job["env"]["CACHE"]).glob("calibration-*.npz"))


def test_help_lists_the_gate_options_without_loading_onnxruntime():
    code = (
        "import sys\nfrom polaris_opt.cli import main\n"
        "main(['compile', '--help'])\n"
        "print('HEAVY', [m for m in ('onnxruntime', 'pyopencl') if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    assert "HEAVY []" in done.stdout
    for option in ("--check", "--eval", "--report", "--cache-dir"):
        assert option in done.stdout
    assert "still written" in done.stdout


def test_a_copied_model_folder_still_hits_the_cache(tmp_path):
    # CI checks out into a new folder each time: keys hold content, never paths.
    elsewhere = tmp_path / "checkout"
    elsewhere.mkdir()
    shutil.copy(CNN, elsewhere / "digits_cnn.onnx")
    cache = tmp_path / "cache"
    assert ci_compile(tmp_path / "a.onnx", cache).returncode == 0
    result = polaris(
        "compile",
        elsewhere / "digits_cnn.onnx",
        "--recipe",
        RECIPE,
        "-o",
        tmp_path / "b.onnx",
        "--cache-dir",
        cache,
    )
    assert result.returncode == 0 and "calibration skipped" in result.stdout
