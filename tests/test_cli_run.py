"""`polaris-opt run`: outputs equal ONNX Runtime's, ai.polaris models run, bad input exits 2, -o is atomic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.cli import main
from polaris_opt.numerics import make_session
from polaris_opt.sparse.formats import from_dense, to_dense

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CLI = Path(sys.executable).parent / "polaris-opt"


def polaris(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """x [batch, 12] → Relu → SparseMatMul(csr, W [7, 12]) → y; returns the file and the dense W."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 12)).astype(np.float32)
    w[rng.random(w.shape) > 0.4] = 0.0
    m = from_dense(w, "csr")
    weights = [
        numpy_helper.from_array(a, f"w.{k}")
        for k, a in (("data", m.data), ("indices", m.indices), ("indptr", m.indptr))
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node(
            "SparseMatMul",
            ["r", "w.data", "w.indices", "w.indptr"],
            ["y"],
            domain="ai.polaris",
            format="csr",
            shape=[7, 12],
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7])],
        initializer=weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.polaris", 1)]
    path = tmp_path_factory.mktemp("model") / "sparse.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), path)
    return path, to_dense(m)


def test_outputs_written_equal_ort_exactly(tmp_path):
    """Through the real console script: --json on stdout, the .npz holds ORT's outputs bit for bit."""
    out = tmp_path / "out.npz"
    result = polaris(
        "run", MODELS / "digits_cnn.onnx", "--input", MODELS / "digits_cnn.input.npz", "-o", out, "--json"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    with np.load(MODELS / "digits_cnn.input.npz") as archive:
        feeds = {k: archive[k] for k in archive.files}
    session = make_session(onnx.load(MODELS / "digits_cnn.onnx"))
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    with np.load(out) as written:
        assert sorted(written.files) == sorted(expected)
        for name, value in expected.items():
            assert np.array_equal(written[name], value)
    (row,) = summary["outputs"]
    assert row["name"] == "logits" and row["shape"] == [2, 10] and row["dtype"] == "float32"
    assert row["min"] == pytest.approx(float(expected["logits"].min()))
    assert summary["output"] == str(out) and [s["placement"] for s in summary["steps"]] == ["onnxruntime"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]  # no temporary file left behind


@pytest.mark.parametrize("placement", ["host", "device"])
def test_sparse_model_runs_on_host_and_device(sparse_model, tmp_path, capsys, placement):
    from polaris_opt.cl_env import open_env

    if placement == "device" and open_env() is None:
        pytest.skip("no OpenCL device")
    path, dense = sparse_model
    x = np.random.default_rng(0).standard_normal((4, 12), dtype=np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "y.npz"
    code = main(
        ["run", str(path), "-i", str(tmp_path / "x.npz"), "-o", str(out), "--placement", placement, "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(s["op_type"], s["placement"]) for s in summary["steps"]] == [
        ("onnxruntime", "onnxruntime"),
        ("SparseMatMul", placement),
    ]
    with np.load(out) as written:
        np.testing.assert_allclose(written["y"], np.maximum(x, 0) @ dense.T, rtol=1e-5, atol=1e-5)


def test_table_shows_outputs_and_steps(sparse_model, tmp_path, capsys):
    path, _ = sparse_model
    np.savez(tmp_path / "x.npz", x=np.ones((1, 12), np.float32))
    assert main(["run", str(path), "-i", str(tmp_path / "x.npz"), "--placement", "host"]) == 0
    text = capsys.readouterr().out
    for expected in ("Outputs", "Steps", "[1, 7]", "SparseMatMul", "host", "onnxruntime"):
        assert expected in text


def test_bad_input_exits_2_with_one_line(tmp_path):
    np.savez(tmp_path / "wrong.npz", tokens=np.zeros((1, 64), np.float32))
    cases = [
        (["run", MODELS / "digits_mlp.onnx", "-i", tmp_path / "absent.npz"], "absent.npz: no such file"),
        (["run", MODELS / "digits_mlp.onnx", "-i", tmp_path / "wrong.npz"], "missing input 'input'"),
        (["run", tmp_path / "absent.onnx", "-i", tmp_path / "wrong.npz"], "absent.onnx: no such file"),
    ]
    for args, message in cases:
        result = polaris(*args)
        assert result.returncode == 2, result.stderr
        assert message in one_line_error(result.stderr)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--placement", "gpu"], "placement must be one of auto, device, host"),
        (["-o", "{tmp}/no/such/dir/out.npz"], "does not exist"),
        (["-o", "{x}"], "is the input file"),
    ],
)
def test_bad_options_exit_2(tmp_path, capsys, extra, message):
    x = tmp_path / "x.npz"
    np.savez(x, input=np.zeros((1, 64), np.float32))
    extra = [arg.format(tmp=tmp_path, x=x) for arg in extra]
    assert main(["run", str(MODELS / "digits_mlp.onnx"), "-i", str(x), *extra]) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_not_an_npz_is_refused(tmp_path, capsys):
    bad = tmp_path / "x.npz"
    bad.write_text("not a zip file")
    assert main(["run", str(MODELS / "digits_mlp.onnx"), "-i", str(bad)]) == 2
    assert "not a readable .npz" in one_line_error(capsys.readouterr().err)


def test_failed_run_leaves_an_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "out.npz"
    out.write_bytes(b"previous result")
    np.savez(tmp_path / "x.npz", input=np.zeros((1, 63), np.float32))  # wrong shape: the run fails
    assert main(["run", str(MODELS / "digits_mlp.onnx"), "-i", str(tmp_path / "x.npz"), "-o", str(out)]) == 2
    assert "has shape [1, 63]" in one_line_error(capsys.readouterr().err)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz", "x.npz"]


def test_a_device_that_does_not_exist_is_refused(sparse_model, tmp_path, capsys):
    from polaris_opt.devices import list_devices

    if not list_devices():
        pytest.skip("no OpenCL device: --device is then ignored and ai.polaris ops run on the host")
    path, _ = sparse_model
    np.savez(tmp_path / "x.npz", x=np.ones((1, 12), np.float32))
    assert main(["run", str(path), "-i", str(tmp_path / "x.npz"), "--device", "no-such-device"]) == 2
    assert "no OpenCL device matches 'no-such-device'" in one_line_error(capsys.readouterr().err)


def test_write_npz_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    from polaris_opt.cli import run_cmd
    from polaris_opt.errors import BadInput

    out = tmp_path / "out.npz"
    out.write_bytes(b"previous result")

    def full_disk(handle, **arrays):
        handle.write(b"half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(BadInput, match="out.npz: cannot write \\(No space left on device\\)"):
        run_cmd.write_npz(out, {"y": np.zeros(3)})
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
