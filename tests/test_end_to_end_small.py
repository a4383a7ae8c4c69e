"""The end-to-end chain of benchmarks/bench_end_to_end.py at a tiny size (d_model 64): the zoo
encoder, pruned 90 % by magnitude, sparsified, and run through Session, gives the pruned dense
model's outputs on ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import op_counts

from polaris_opt.numerics import make_session
from polaris_opt.runtime import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_end_to_end import TOLERANCE, build_chain, relative_error, tokens  # noqa: E402
from zoo.transformer import EncoderSize  # noqa: E402  (bench_end_to_end put models/ on the path)

SMALL = EncoderSize(seq=8, d_model=64, heads=4, d_ff=256, layers=2)
WEIGHT_MATMULS = 6 * SMALL.layers  # q, k, v, out_proj, linear1, linear2


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_chain(SMALL, tmp_path_factory.mktemp("e2e"))


def test_prune_leaves_90_percent_zeros_in_every_weight_matmul(chain):
    pruned = onnx.load(chain.pruned)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    matmul_weights = [
        weights[n.input[1]] for n in pruned.graph.node if n.op_type == "MatMul" and n.input[1] in weights
    ]
    assert len(matmul_weights) == WEIGHT_MATMULS
    for weight in matmul_weights:
        assert np.mean(weight == 0) == pytest.approx(0.9, abs=0.01)


def test_sparsify_turns_every_weight_matmul_into_sparse_matmul(chain):
    counts = op_counts(onnx.load(chain.sparse))
    assert counts.get("ai.polaris.SparseMatMul", 0) == WEIGHT_MATMULS
    assert len(chain.layers) == WEIGHT_MATMULS


@pytest.mark.parametrize("placement", ["host", "auto", "device"])
@pytest.mark.parametrize("batch", [1, 3])
def test_session_on_sparse_model_equals_pruned_dense_model(chain, placement, batch):
    if placement == "device":
        from polaris_opt.cl_env import open_env

        if open_env() is None:
            pytest.skip("no OpenCL device")
    feeds = tokens(SMALL, batch)
    reference = make_session(onnx.load(chain.pruned)).run(None, feeds)[0]
    got = Session(chain.sparse, placement=placement).run(None, feeds)[0]
    assert got.shape == (batch, SMALL.seq, SMALL.d_model)
    assert relative_error(got, reference) <= TOLERANCE


def test_pruning_changed_the_outputs(chain):
    """The comparison above would be empty if pruning left the model as it was."""
    feeds = tokens(SMALL, 1)
    dense = make_session(onnx.load(chain.dense)).run(None, feeds)[0]
    pruned = make_session(onnx.load(chain.pruned)).run(None, feeds)[0]
    assert relative_error(pruned, dense) > 1e-2
