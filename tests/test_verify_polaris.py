"""Verification of models holding ai.polaris nodes: numerics through the host references, and the
onnx checker with the ai.polaris schemas wherever such a model is loaded or verified."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import PassFailed
from polaris_opt.fidelity import sqnr_db
from polaris_opt.numerics import run_model
from polaris_opt.passes.sparsify import Sparsify
from polaris_opt.pipeline import Pipeline
from polaris_opt.runtime import Session
from polaris_opt.verify import VerifyMode

MODELS = Path(__file__).resolve().parent.parent / "models"
CLI = Path(sys.executable).parent / "polaris-opt"
# prune{sparsity=0.9} leaves digits_mlp's logits near 0 dB SQNR, under the verifier's lossy
# floor; 30% keeps 17.8 dB on the digits test rows, and sparsify is told to rewrite at that sparsity.
SPARSE_PIPELINE = "cleanup,prune{sparsity=0.3},sparsify{min-sparsity=0.25}"


def digits_feeds() -> dict[str, np.ndarray]:
    with np.load(MODELS / "digits_test.npz") as archive:
        return {"input": archive["x_mlp"][:32]}


def sparse_digits_mlp() -> onnx.ModelProto:
    model = onnx.load(MODELS / "digits_mlp.onnx")
    return run_pipeline(model, Pipeline.parse(SPARSE_PIPELINE), verify=VerifyMode.NONE).model


def polaris_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == "ai.polaris"]


def test_compile_verify_numeric_runs_the_sparse_model_on_the_host_references(tmp_path):
    out = tmp_path / "sparse.onnx"
    result = subprocess.run(
        [str(CLI), "compile", MODELS / "digits_mlp.onnx", "-p", SPARSE_PIPELINE, "--verify", "numeric"]
        + ["-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "verify: numeric" in result.stdout
    sparse = onnx.load(out)
    assert [node.op_type for node in polaris_ops(sparse)] == ["SparseMatMul"] * 3
    dense = run_model(onnx.load(MODELS / "digits_mlp.onnx"), digits_feeds())["logits"]
    got = Session(sparse, placement="host").run(None, digits_feeds())[0]
    assert got.shape == dense.shape
    assert sqnr_db(dense, got) > 10.0


def pruned_digits_mlp() -> onnx.ModelProto:
    model = onnx.load(MODELS / "digits_mlp.onnx")
    return run_pipeline(model, Pipeline.parse("cleanup,prune{sparsity=0.3}"), verify=VerifyMode.NONE).model


def strict_sparsify(model: onnx.ModelProto, monkeypatch):
    """sparsify verified as a lossless pass is: outputs must match the input's within rounding."""
    monkeypatch.setattr(Sparsify, "lossy", False)
    return run_pipeline(
        model, Pipeline.parse("sparsify{min-sparsity=0.25}"), verify=VerifyMode.NUMERIC, feeds=digits_feeds()
    )


def test_exact_sparsify_passes_the_strict_comparison(monkeypatch):
    # With fp32 values sparsify computes the pruned model's numbers, so the strict comparison,
    # run through the host references, must accept it.
    result = strict_sparsify(pruned_digits_mlp(), monkeypatch)
    assert len(polaris_ops(result.model)) == 3
    assert result.verify is VerifyMode.NUMERIC


def corrupting_sparsify(scale: float):
    """Sparsify.run, then every stored value of the last SparseMatMul multiplied by `scale`."""
    real_run = Sparsify.run

    def run(self, graph, ctx):
        outcome = real_run(self, graph, ctx)
        last = [node for node in (outcome.graph or graph).nodes if node.op == "SparseMatMul"][-1]
        data = last.inputs[1]
        data.values = (data.values * np.float32(scale)).astype(data.values.dtype)
        return outcome

    return run


def test_a_wrong_sparse_matmul_is_caught_naming_sparsify(monkeypatch):
    monkeypatch.setattr(Sparsify, "run", corrupting_sparsify(-1.0))
    model = onnx.load(MODELS / "digits_mlp.onnx")
    with pytest.raises(PassFailed) as caught:
        run_pipeline(model, Pipeline.parse(SPARSE_PIPELINE), verify=VerifyMode.NUMERIC, feeds=digits_feeds())
    assert caught.value.pass_name == "sparsify"
    assert "SQNR" in caught.value.reason and "below 10 dB" in caught.value.reason


def test_a_slightly_wrong_sparse_matmul_fails_the_strict_comparison(monkeypatch):
    pruned = pruned_digits_mlp()
    monkeypatch.setattr(Sparsify, "run", corrupting_sparsify(1.01))
    with pytest.raises(PassFailed) as caught:
        strict_sparsify(pruned, monkeypatch)
    assert caught.value.pass_name == "sparsify"
    assert "outputs changed" in caught.value.reason and "logits" in caught.value.reason


def test_an_input_with_polaris_nodes_is_verified_numerically():
    result = run_pipeline(
        sparse_digits_mlp(),
        Pipeline.parse("eliminate-dead-code"),
        verify=VerifyMode.NUMERIC,
        feeds=digits_feeds(),
    )
    assert result.verify is VerifyMode.NUMERIC
    assert result.warnings == []


def test_a_malformed_sparse_node_is_refused_naming_the_pass(monkeypatch):
    real_run = Sparsify.run

    def run(self, graph, ctx):
        outcome = real_run(self, graph, ctx)
        first = next(node for node in (outcome.graph or graph).nodes if node.op == "SparseMatMul")
        first.inputs[3].values = first.inputs[3].values[:2]  # indptr too short for its rows
        return outcome

    monkeypatch.setattr(Sparsify, "run", run)
    with pytest.raises(PassFailed) as caught:
        run_pipeline(
            onnx.load(MODELS / "digits_mlp.onnx"),
            Pipeline.parse(SPARSE_PIPELINE),
            verify=VerifyMode.NUMERIC,
            feeds=digits_feeds(),
        )
    assert caught.value.pass_name == "sparsify"
    assert "indptr" in caught.value.reason


# The schema registry is process-wide: a fresh interpreter shows that load_model and the verifier
# register the ai.polaris schemas themselves, not some earlier test.
_FRESH_LOAD = """
import sys
from polaris_opt.errors import BadInput
from polaris_opt.graph_io import load_model
try:
    load_model(sys.argv[1])
except BadInput as exc:
    print(exc)
    sys.exit(2)
print("loaded")
"""

_FRESH_VERIFY = """
import sys, onnx
from polaris_opt.errors import PassFailed
from polaris_opt.export import to_graph
from polaris_opt.verify import Verifier, VerifyMode
good, bad = onnx.load(sys.argv[1]), onnx.load(sys.argv[2])
verifier = Verifier.for_input(good, to_graph(good), VerifyMode.STRUCTURE)
try:
    verifier.check(to_graph(bad), good, "edit")
except PassFailed as exc:
    print(exc)
    sys.exit(3)
print("verified")
"""


def without_format(model: onnx.ModelProto) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    node = polaris_ops(broken)[0]
    kept = [attr for attr in node.attribute if attr.name != "format"]
    del node.attribute[:]
    node.attribute.extend(kept)
    return broken


def fresh_python(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_load_model_checks_a_polaris_model_against_its_schemas(tmp_path):
    sparse = sparse_digits_mlp()
    broken = without_format(sparse)
    onnx.save(sparse, tmp_path / "good.onnx")
    onnx.save(broken, tmp_path / "bad.onnx")

    good = fresh_python(_FRESH_LOAD, tmp_path / "good.onnx")
    assert good.returncode == 0 and good.stdout.strip() == "loaded", good.stderr
    bad = fresh_python(_FRESH_LOAD, tmp_path / "bad.onnx")
    assert bad.returncode == 2, bad.stderr
    assert "Required attribute 'format' is missing" in bad.stdout


def test_the_verifier_checks_polaris_nodes_against_their_schemas(tmp_path):
    sparse = sparse_digits_mlp()
    onnx.save(sparse, tmp_path / "good.onnx")
    onnx.save(without_format(sparse), tmp_path / "bad.onnx")

    result = fresh_python(_FRESH_VERIFY, tmp_path / "good.onnx", tmp_path / "bad.onnx")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "pass 'edit' failed: the graph no longer passes onnx.checker" in result.stdout
    assert "format" in result.stdout
