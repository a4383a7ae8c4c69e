"""`--report` on quantize, prune and sparsify, and `polaris-opt report`, run in-process like the console
script (polaris_opt.cli.main): the documents against figures recomputed here, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_cli_compile import MODELS

from polaris_opt.capture import with_outputs
from polaris_opt.cli import main
from polaris_opt.numerics import run_model
from polaris_opt.report import load_report, render_html
from polaris_opt.report.files import strict

CNN, CNN_CALIB = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.calib.npz"
MLP, MLP_CALIB = MODELS / "digits_mlp.onnx", MODELS / "digits_mlp.calib.npz"
# What the commands measure fidelity on: the first 8 batches of 16 of the calibration data.
FIDELITY_ROWS = 8 * 16
BENCH_ROW = {
    "model": "m.onnx",
    "runtime": "ort",
    "batch": 1,
    "p50_ms": 1.0,
    "p90_ms": 1.2,
    "p99_ms": 1.5,
    "throughput": 1000.0,
    "peak_rss_mb": 90.0,
    "file_bytes": 17000,
    "speedup": 1.0,
    "size_ratio": 1.0,
}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def calibration_rows(path, rows: int = FIDELITY_ROWS) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {"input": archive["input"][:rows]}


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return 10 * math.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))


def weights_of(model: onnx.ModelProto) -> list[np.ndarray]:
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weighted = ("Conv", "Gemm", "MatMul")
    return [tensors[n.input[1]] for n in model.graph.node if n.op_type in weighted and n.input[1] in tensors]


# ------------------------------------------------------------------------------------ quantize


@pytest.fixture(scope="module")
def quantized_cnn(tmp_path_factory):
    """digits_cnn quantized to INT8 with both reports; (folder, --json document, report)."""
    folder = tmp_path_factory.mktemp("quantize")
    args = ["quantize", CNN, "--int8", "--calib", CNN_CALIB, "-o", folder / "q.onnx", "--json"]
    code = main([str(a) for a in [*args, "--report", folder / "q.html", "--report", folder / "q.json"]])
    assert code == 0
    return folder, load_report(folder / "q.json")


def test_quantize_report_holds_the_result_and_figures_of_both_files(quantized_cnn, capsys):
    folder, report = quantized_cnn
    assert report["command"] == "quantize" and report["result"]["output"] == str(folder / "q.onnx")
    source, quantized = onnx.load(CNN), onnx.load(folder / "q.onnx")
    assert report["input"]["parameters"] == sum(math.prod(t.dims) for t in source.graph.initializer)
    int8 = sum(math.prod(t.dims) for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert report["output"]["precision"]["int8"] == int8
    assert report["output"]["bytes"] == (folder / "q.onnx").stat().st_size
    assert report["size_ratio"] == pytest.approx(report["output"]["bytes"] / CNN.stat().st_size)
    fidelity = report["fidelity"]
    assert (
        fidelity["sqnr_db"] == report["result"]["fidelity"]["sqnr_db"]
        and fidelity["samples"] == FIDELITY_ROWS
    )
    html = (folder / "q.html").read_text(encoding="utf-8")
    assert html == render_html(report) and "Per-layer SQNR" in html


def test_quantize_layer_sqnr_matches_numpy_on_the_same_data(quantized_cnn):
    folder, report = quantized_cnn
    layers = {row["name"]: row for row in report["layers"]}
    assert set(layers) == {row["name"] for row in report["result"]["layers"]}
    feeds = calibration_rows(CNN_CALIB)
    # MaxPool moves int8 data: its float output in the input model against what the next layer reads.
    ref = run_model(with_outputs(onnx.load(CNN), ["/pool/MaxPool_output_0"]), feeds)["/pool/MaxPool_output_0"]
    wanted = "/pool/MaxPool_output_0_dequantized"
    got = run_model(with_outputs(onnx.load(folder / "q.onnx"), [wanted]), feeds)[wanted]
    assert layers["/pool/MaxPool"]["sqnr_db"] == pytest.approx(sqnr(ref, got), rel=1e-6)
    # The last layer writes the model output: its SQNR is the model's.
    assert layers["/fc/Gemm"]["sqnr_db"] == pytest.approx(report["fidelity"]["sqnr_db"], rel=1e-9)
    assert all(row["precision"] == "int8" and row["sqnr_db"] > 20 for row in layers.values())


def test_fp16_report_lists_the_weighted_layers_it_converted(tmp_path, capsys):
    code, _, err = run(
        capsys, "quantize", MLP, "--fp16", "-o", tmp_path / "h.onnx", "--report", tmp_path / "h.json"
    )
    assert code == 0, err
    report = load_report(tmp_path / "h.json")
    weighted = [n.name for n in onnx.load(MLP).graph.node if n.op_type in ("Gemm", "MatMul")]
    assert [row["name"] for row in report["layers"]] == weighted
    assert all(row["precision"] == "float16" and row["sqnr_db"] > 50 for row in report["layers"])
    assert set(report["output"]["precision"]) == {"float16"}
    assert report["fidelity"]["data"] == "random inputs" and report["fidelity"]["samples"] == 4 * 8


# ---------------------------------------------------------------------------- prune, sparsify


@pytest.fixture(scope="module")
def pruned_mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune")
    args = ["prune", MLP, "--sparsity", "0.8", "--calib", MLP_CALIB, "-o", folder / "p.onnx", "--json"]
    assert main([str(a) for a in [*args, "--report", folder / "p.json"]]) == 0
    return folder, load_report(folder / "p.json")


def test_prune_report_reuses_its_measured_layer_sqnr_and_fidelity(pruned_mlp):
    folder, report = pruned_mlp
    result = report["result"]
    assert [row["name"] for row in report["layers"]] == [row["layer"] for row in result["layers"]]
    for row, measured in zip(report["layers"], result["layers"], strict=True):
        assert row["sqnr_db"] == measured["sqnr_db"] and row["sparsity"] == pytest.approx(
            measured["sparsity_after"]
        )
    assert report["fidelity"]["sqnr_db"] == result["fidelity"]["sqnr_db"]
    assert report["fidelity"]["samples"] == FIDELITY_ROWS
    weights = weights_of(onnx.load(folder / "p.onnx"))
    zeros = sum(int(np.sum(w == 0)) for w in weights)
    assert report["output"]["sparsity"] == pytest.approx(zeros / sum(w.size for w in weights))


def test_sparsify_report_measures_fidelity_on_the_polaris_runtime(pruned_mlp, tmp_path, capsys):
    folder, _ = pruned_mlp
    out, path = tmp_path / "s.onnx", tmp_path / "s.json"
    code, stdout, err = run(capsys, "sparsify", folder / "p.onnx", "-o", out, "--report", path, "--json")
    assert code == 0, err
    report = load_report(path)
    assert report["result"] == strict(json.loads(stdout))
    # fp32 values: the same products summed in another order.
    fidelity = report["fidelity"]
    assert fidelity["cosine"] == pytest.approx(1.0, abs=1e-9) and fidelity["samples"] == 4 * 8
    assert fidelity["sqnr_db"] is None or fidelity["sqnr_db"] > 100
    rows = report["result"]["layers"]
    assert [(r["bytes_before"], r["bytes_after"]) for r in report["layers"]] == [
        (r["bytes_before"], r["bytes_after"]) for r in rows
    ]
    data = [numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if t.name.endswith("data")]
    assert report["output"]["parameters"] < report["input"]["parameters"]
    assert report["output"]["sparsity"] == pytest.approx(report["input"]["sparsity"], abs=1e-6)
    assert data, "sparsify wrote no sparse weight"


# ------------------------------------------------------------------------------------ report


def test_report_command_renders_again_and_merges_bench_rows(quantized_cnn, tmp_path, capsys):
    folder, report = quantized_cnn
    bench = tmp_path / "bench.json"
    row = {**BENCH_ROW, "runs": 20, "spread": 1.1, "overhead_ms": 0.01}
    bench.write_text(json.dumps({"polaris_opt_bench": 1, "machine": {}, "settings": {}, "results": [row]}))
    code, out, err = run(capsys, "report", folder / "q.json", "-o", tmp_path / "r.json", "--bench", bench)
    assert code == 0, err
    assert "1 bench rows (1 added)" in out
    merged = load_report(tmp_path / "r.json")
    assert merged == {**report, "bench": [BENCH_ROW]}
    code, _, err = run(capsys, "report", tmp_path / "r.json", "-o", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page == render_html(merged) and "Latency (lower is better)" in page


def test_report_command_takes_sensitivity_from_analyze(quantized_cnn, tmp_path, capsys):
    folder, _ = quantized_cnn
    code, analyzed, err = run(capsys, "analyze", CNN, "--calib", CNN_CALIB, "--json")
    assert code == 0, err
    (tmp_path / "a.json").write_text(analyzed)
    expected = {row["name"]: row["sqnr_db"] for row in json.loads(analyzed)["layers"]}
    code, out, err = run(
        capsys, "report", folder / "q.json", "-o", tmp_path / "r.json", "--analyze", tmp_path / "a.json"
    )
    assert code == 0, err
    assert f"sensitivity of {len(expected)} layers" in out.replace("\n", " ")
    layers = load_report(tmp_path / "r.json")["layers"]
    assert {row["name"]: row["sensitivity_db"] for row in layers if row["name"] in expected} == expected
    assert all(row["sensitivity_db"] is None for row in layers if row["name"] not in expected)
    assert "Per-layer sensitivity" in render_html(load_report(tmp_path / "r.json"))


# --------------------------------------------------------------------------------- bad input


def bad_report_cases():
    quantize = ["quantize", CNN, "--int8", "--calib", CNN_CALIB, "-o", "q.onnx"]
    prune = ["prune", MLP, "--sparsity", "0.5", "-o", "p.onnx"]
    sparsify = ["sparsify", MLP, "-o", "s.onnx"]
    return [
        ([*quantize, "--report", "r.txt"], "--report r.txt: give a .html or .json file name"),
        ([*quantize, "--report", "missing/r.html"], "--report missing/r.html: folder missing does not exist"),
        ([*quantize, "--report", "r.json", "--report", CNN], f"--report {CNN}: give a .html or .json"),
        (
            ["quantize", "in.json", "--int8", "-o", "q.onnx", "--report", "in.json"],
            "is the input or the output",
        ),
        ([*prune, "--report", "r.onnx"], "--report r.onnx: give a .html or .json file name"),
        (
            ["prune", MLP, "-o", "p.html", "--report", "p.html"],
            "--report p.html: is the input or the output model",
        ),
        ([*sparsify, "--report", "missing/r.json"], "folder missing does not exist"),
        (["sparsify", MLP, "-o", "s.json", "--report", "./s.json"], "is the input or the output model"),
        (["report", "missing.json", "-o", "r.html"], "missing.json: no such file"),
        (["report", CNN, "-o", "r.html"], "not a JSON report file"),
        (["report", "v2.json", "-o", "r.html"], "report format version 2; this polaris-opt reads 1"),
        (["report", "good.json", "-o", "r.txt"], "--output r.txt: give a .html or .json file name"),
        (["report", "good.json", "-o", "r.html", "--bench", "good.json"], "not a polaris-opt bench JSON"),
        (
            ["report", "good.json", "-o", "r.html", "--analyze", "good.json"],
            "not a `polaris-opt analyze --json`",
        ),
    ]


@pytest.mark.parametrize("args, message", bad_report_cases())
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v2.json").write_text(json.dumps({"polaris_opt_report": 2}))
    good = {"polaris_opt_report": 1, "command": "quantize", "layers": [], "bench": []}
    model = {"path": "m.onnx", "bytes": 1, "parameters": 0, "precision": {}, "sparsity": 0.0}
    (tmp_path / "good.json").write_text(json.dumps({**good, "input": model, "output": model}))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("polaris-opt: error: ") and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
