"""`polaris-opt bench`: the table, the --json file and document, the polaris runtime, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import MODELS, op_counts, run_pass

from polaris_opt.cli import main
from polaris_opt.compiler import run_pipeline
from polaris_opt.passes.prune import Prune
from polaris_opt.passes.sparsify import Sparsify
from polaris_opt.pipeline import Pipeline

RESNET, MOBILENET = MODELS / "resnet_s.onnx", MODELS / "mobilenetv2_s.onnx"
MLP, CNN = MODELS / "digits_mlp.onnx", MODELS / "digits_cnn.onnx"
QUICK = ["--warmup", "1", "--runs", "4"]


def bench(capsys, *args) -> tuple[int, str, str]:
    code = main(["bench", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def sparse_pair(tmp_path_factory):
    """digits_mlp pruned to 90 % (dense, for ONNX Runtime) and the same sparsified (ai.polaris)."""
    folder = tmp_path_factory.mktemp("sparse")
    cleaned = run_pipeline(onnx.load(MLP), Pipeline.parse("cleanup")).model
    pruned = run_pass(Prune(sparsity=0.9), cleaned)
    sparse = run_pass(Sparsify(), pruned)
    assert op_counts(sparse) == {"ai.polaris.SparseMatMul": 3}
    onnx.save(pruned, folder / "mlp90.onnx")
    onnx.save(sparse, folder / "mlp90.polaris.onnx")
    return folder / "mlp90.onnx", folder / "mlp90.polaris.onnx"


def test_table_and_json_file_of_two_zoo_models(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, stderr = bench(capsys, RESNET, MOBILENET, "--batch", "1,2", *QUICK, "--json", out)
    assert code == 0, stderr
    assert stdout.splitlines()[0] == "bench: 2 models x 2 batches, 4 runs each after 1 warm-up, interleaved"
    for expected in ("resnet_s", "mobilenetv2_s", "p50", "speed", "1.00x", "worst spread", f"wrote {out}"):
        assert expected in stdout
    document = json.loads(out.read_text())
    assert document["polaris_opt_bench"] == 1
    settings = {"runtime": "ort", "threads": 1, "warmup": 1, "runs": 4, "seconds": None, "input": "random"}
    assert document["settings"] == settings | {"shapes": []}
    rows = document["results"]
    order = [(Path(row["model"]), row["batch"]) for row in rows]
    assert order == [(RESNET, 1), (MOBILENET, 1), (RESNET, 2), (MOBILENET, 2)]
    assert all(row["runs"] == 4 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] for row in rows)
    assert rows[1]["size_ratio"] == MOBILENET.stat().st_size / RESNET.stat().st_size


def test_global_json_flag_prints_the_document(capsys):
    code = main(
        ["--json", "bench", str(RESNET), "--runs", "3", "--warmup", "0", "--shape", "input=2x3x32x32"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    (row,) = document["results"]
    assert (row["batch"], row["runs"], row["speedup"], row["size_ratio"]) == (2, 3, 1.0, 1.0)
    assert document["settings"]["shapes"] == ["input=2x3x32x32"]


def test_input_file_rows_are_tiled_to_the_batch_and_seconds_replace_runs(tmp_path, capsys):
    data = tmp_path / "x.npz"
    np.savez(data, input=np.ones((2, 64), np.float32), labels=np.zeros(2, np.int64))
    args = [MLP, MLP, "--input", data, "--batch", "5", "--seconds", "0.02", "--warmup", "1"]
    code, stdout, stderr = bench(capsys, *args, "--json", tmp_path / "b.json")
    assert code == 0, stderr
    assert "no model takes labels; left out" in " ".join(stderr.split())  # Rich wraps at 80
    document = json.loads((tmp_path / "b.json").read_text())
    assert document["settings"]["seconds"] == 0.02 and document["settings"]["runs"] is None
    assert [row["batch"] for row in document["results"]] == [5, 5]
    assert all(row["runs"] >= 1 for row in document["results"])


def test_polaris_runtime_on_a_sparsified_model_against_its_dense_twin(sparse_pair, tmp_path, capsys):
    dense, sparse = sparse_pair
    out = tmp_path / "b.json"
    args = [dense, sparse, "--runtime", "ort,polaris", "--input", MODELS / "digits_mlp.input.npz"]
    code, stdout, stderr = bench(capsys, *args, *QUICK, "--json", out)
    assert code == 0, stderr
    document = json.loads(out.read_text())
    rows = document["results"]
    order = [(Path(row["model"]), row["runtime"], row["batch"]) for row in rows]
    assert order == [(dense, "ort", 2), (sparse, "polaris", 2)]
    assert rows[1]["size_ratio"] == sparse.stat().st_size / dense.stat().st_size < 0.5
    assert document["settings"]["runtime"] == "ort,polaris"
    devices = document["machine"]["opencl_devices"]
    assert isinstance(devices, list) and ("found no OpenCL device" in stderr) == (not devices)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/absent.onnx"], "absent.onnx: no such file"),
        (["{tmp}/text.onnx"], "text.onnx: not an ONNX model"),
        ([MLP, CNN], "input 'input' has shape [batch, 1, 8, 8], but"),
        ([RESNET, "--shape", "input:1x3x32x32"], "expected NAME=AxBxC"),
        ([RESNET, "--shape", "image=1x3x32x32"], "the models have no input 'image'"),
        (["{tmp}/tokens.onnx"], "dimension 1 ('seq') is dynamic; set it with --shape tokens=NxN"),
        ([MLP, "--input", "{tmp}/other.npz"], "no array 'input' for the models' input (it holds x)"),
        ([MLP, "--input", "{tmp}/double.npz"], "'input' is float64, the models take float32"),
        ([MLP, "--input", "{tmp}/absent.npz"], "absent.npz: no such file"),
        ([MLP, "--input", "{tmp}/text.onnx"], "not a readable .npz"),
        ([MLP, "--batch", "0"], "--batch '0': expected positive whole numbers"),
        ([MLP, "--batch", "one"], "--batch 'one': expected positive whole numbers"),
        ([MLP, "--runs", "0"], "--runs 0: give at least 1"),
        ([MLP, "--runs", "5", "--seconds", "1"], "--runs and --seconds both given"),
        ([MLP, "--seconds", "0"], "--seconds 0.0: give a time above 0"),
        ([MLP, "--threads", "0"], "--threads 0: give at least 1"),
        ([MLP, "--json", "{tmp}/no/such/b.json"], "does not exist"),
        ([MLP, "--json", MLP], "is one of the models"),
        ([MLP, "--runtime", "tvm"], "unknown runtime 'tvm'"),
        ([MLP, MLP, MLP, "--runtime", "ort,polaris"], "2 runtimes for 3 models"),
        (["{sparse}"], "has ai.polaris ops, which ONNX Runtime cannot run; use --runtime polaris"),
        ([MLP, "--input", "{tmp}/x.npz", "--shape", "input=1x64"], "with --input FILE.npz the file gives"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(sparse_pair, tmp_path, capsys, args, message):
    (tmp_path / "text.onnx").write_text("a text file, not a model")
    np.savez(tmp_path / "other.npz", x=np.zeros((1, 64), np.float32))
    np.savez(tmp_path / "double.npz", input=np.zeros((1, 64), np.float64))
    np.savez(tmp_path / "x.npz", input=np.zeros((1, 64), np.float32))
    tokens = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, seq] tokens) => (int64[batch, seq] y) { y = Identity(tokens) }""")
    onnx.save(tokens, tmp_path / "tokens.onnx")
    args = [str(arg).format(tmp=tmp_path, sparse=sparse_pair[1]) for arg in args]
    extra = [] if "--json" in args else ["--json", tmp_path / "out.json"]
    before = sorted(tmp_path.iterdir())
    code, stdout, stderr = bench(capsys, *args, *extra)
    assert code == 2
    assert message in one_line_error(stderr)
    assert stdout == "" and sorted(tmp_path.iterdir()) == before


def test_bench_help_does_not_import_onnxruntime():
    probe = (
        "import sys\n"
        "from polaris_opt.cli import main\n"
        "main(['bench', '--help'])\n"
        "print('HEAVY', [m for m in ('onnxruntime', 'pyopencl') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "--runtime" in out and "HEAVY []" in out


def test_table_numbers_keep_three_significant_digits():
    from polaris_opt.cli.bench_cmd import _ms, _ratio, _short_names

    assert [_ms(v) for v in (0.0123, 0.38, 3.8, 99.96, 123.4, None)] == [
        "0.0123",
        "0.380",
        "3.80",
        "100",
        "123",
        "-",
    ]
    assert [_ratio(v) for v in (1.0, 0.3149, 0.0297, None)] == ["1.00x", "0.31x", "0.03x", "-"]
    assert _short_names(["models/a.onnx", "build/b.onnx"]) == {"models/a.onnx": "a", "build/b.onnx": "b"}
    same_stem = ["models/a.onnx", "build/a.onnx"]
    assert _short_names(same_stem) == {path: path for path in same_stem}
