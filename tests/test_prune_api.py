"""`polaris_opt.prune` and PruneOptions: checks, pipeline text, and results measured on the zoo."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import MODELS
from onnx import numpy_helper

import polaris_opt
from polaris_opt.errors import BadInput
from polaris_opt.numerics import run_model
from polaris_opt.pipeline import Pipeline
from polaris_opt.pruning.api import PruneOptions, prune

MLP = MODELS / "digits_mlp.onnx"
MLP_CALIB = MODELS / "digits_mlp.calib.npz"
CALIBRATION_HINT = "give --calib DATA (a .npz, a folder, or 'random')"


def gemm_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each Gemm's weight (transB=1: [output features, inputs], the matrix view itself)."""
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {node.name: tensors[node.input[1]] for node in model.graph.node if node.op_type == "Gemm"}


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"sparsity": 1.5},
            "--sparsity 1.5 is outside [0, 1): give the fraction of weights to remove, such as 0.9",
        ),
        ({"sparsity": 1.0}, "--sparsity 1 is outside [0, 1)"),
        ({"sparsity": -0.1}, "--sparsity -0.1 is outside [0, 1)"),
        ({"method": "random"}, "--method must be one of magnitude, wanda, sparsegpt; got 'random'"),
        ({"scope": "model"}, "--scope must be one of local, global"),
        ({"pattern": "3:2"}, "--pattern '3:2' is not valid; use 'unstructured', 'N:M'"),
        ({"pattern": "block:0x4"}, "--pattern 'block:0x4' is not valid"),
        (
            {"pattern": "2:4", "sparsity": 0.9},
            "--sparsity 0.9 conflicts with --pattern 2:4, which prunes 0.5",
        ),
        ({"max_layer_sparsity": 0.0}, "--max-layer-sparsity 0 is outside (0, 1]"),
        ({"importance": "taylor"}, "--importance taylor ranks channels: it goes with --structured"),
        ({"structured": "neuron"}, "--structured must be one of channel, filter, head"),
        (
            {"structured": "channel", "pattern": "2:4"},
            "--structured channel does not combine with --pattern 2:4",
        ),
        ({"structured": "head", "method": "wanda"}, "--structured head does not combine with --method wanda"),
        (
            {"structured": "channel", "scope": "global"},
            "--structured channel does not combine with --scope global",
        ),
        ({"structured": "filter", "skip_first_last": True}, "does not combine with --skip-first-last"),
        ({"exclude": ("a,b",)}, "--exclude 'a,b': names may not be empty or hold"),
    ],
)
def test_bad_options_are_one_line(values, message):
    with pytest.raises(BadInput) as raised:
        PruneOptions(**values).check(has_calibration=True)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "values, reason",
    [
        ({"method": "wanda"}, "--method wanda"),
        ({"method": "sparsegpt"}, "--method sparsegpt"),
        ({"structured": "channel", "importance": "taylor"}, "--importance taylor"),
        ({"correct": True}, "--correct"),
        ({"structured": "head", "correct": True}, "--correct"),
    ],
)
def test_data_driven_options_need_calibration(values, reason):
    options = PruneOptions(**values)
    assert options.needs_calibration() and options.calibration_reason() == reason
    options.check(has_calibration=True)
    with pytest.raises(BadInput, match=f"^{reason} needs calibration data: give --calib DATA"):
        options.check(has_calibration=False)


def test_magnitude_needs_no_calibration():
    assert not PruneOptions(sparsity=0.9).needs_calibration()
    PruneOptions(sparsity=0.9, pattern="block:4x4").check(has_calibration=False)


@pytest.mark.parametrize(
    "values, text",
    [
        ({}, "cleanup,prune{sparsity=0.5,method=magnitude}"),
        ({"sparsity": 0.9, "method": "wanda"}, "cleanup,prune{sparsity=0.9,method=wanda}"),
        ({"pattern": "2:4"}, "cleanup,prune{sparsity=0.5,method=magnitude,pattern=2:4}"),
        (
            {"pattern": "1:4", "method": "sparsegpt"},
            "cleanup,prune{sparsity=0.75,method=sparsegpt,pattern=1:4}",
        ),
        (
            {"pattern": "block:4x4", "sparsity": 0.8},
            "cleanup,prune{sparsity=0.8,method=magnitude,pattern=block:4x4}",
        ),
        (
            {"scope": "global", "max_layer_sparsity": 0.95, "skip_first_last": True, "cleanup": False},
            "prune{sparsity=0.5,method=magnitude,scope=global,max-layer-sparsity=0.95,skip-first-last=true}",
        ),
        (
            {"exclude": ("/fc*", "fc3.weight"), "correct": True},
            "cleanup,prune{sparsity=0.5,method=magnitude,exclude=/fc*;fc3.weight,correct=true}",
        ),
        (
            {"method": "sparsegpt", "sequential": False},
            "cleanup,prune{sparsity=0.5,method=sparsegpt,sequential=false}",
        ),
        # wanda always reads the dense model, so one-shot adds nothing to its pipeline.
        ({"method": "wanda", "sequential": False}, "cleanup,prune{sparsity=0.5,method=wanda}"),
        (
            {"structured": "channel", "sparsity": 0.25, "correct": True},
            "cleanup,prune-structured{kind=channel,sparsity=0.25,importance=l2,correct=true}",
        ),
        (
            {"structured": "head", "importance": "taylor"},
            "cleanup,prune-structured{kind=head,sparsity=0.5,importance=taylor}",
        ),
    ],
)
def test_pipeline_text_names_the_passes_and_parses(values, text):
    options = PruneOptions(**values)
    assert options.pipeline_text() == text
    # The real passes accept every option written, and the text prints back unchanged.
    assert Pipeline.parse(text).text() == text


def test_magnitude_prunes_each_layer_exactly_and_saves(tmp_path):
    out = tmp_path / "mlp.sparse.onnx"
    result = prune(MLP, out, sparsity=0.75)
    assert result.changed and result.pipeline == "cleanup,prune{sparsity=0.75,method=magnitude}"
    saved = onnx.load(out)
    props = {p.key: p.value for p in saved.metadata_props}
    assert props["polaris-opt.pipeline"] == result.pipeline
    dense, pruned = gemm_weights(onnx.load(MLP)), gemm_weights(saved)
    for name, weight in pruned.items():
        assert np.count_nonzero(weight == 0) == round(0.75 * weight.size)
        # Magnitude keeps the largest weights: every kept |w| ≥ every pruned dense |w|.
        kept = weight != 0
        assert np.abs(dense[name][kept]).min() >= np.abs(dense[name][~kept]).max()
        assert np.array_equal(weight[kept], dense[name][kept])
    rows = {row["layer"]: row for row in result.report["layers"]}
    assert set(rows) == set(pruned)
    assert all(row["sparsity_after"] == pytest.approx(0.75, abs=1e-3) for row in rows.values())


def test_nm_without_sparsity_gets_the_fixed_sparsity():
    result = prune(MLP, pattern="2:4")
    assert "sparsity=0.5" in result.pipeline and "pattern=2:4" in result.pipeline
    for weight in gemm_weights(result.model).values():
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(axis=2)
        assert groups.max() == 2 and groups.min() == 2


def test_wanda_with_data_beats_magnitude_on_its_fidelity_figure():
    data = {"input": np.load(MLP_CALIB)["input"]}
    magnitude = prune(MLP, calib=data, sparsity=0.5)
    wanda = prune(MLP, calib=data, sparsity=0.5, method="wanda")
    assert wanda.report["fidelity"]["data"] == "the first 8 batches of the calibration data"
    assert wanda.report["fidelity"]["sqnr_db"] > magnitude.report["fidelity"]["sqnr_db"]
    assert {row["method"] for row in wanda.report["layers"]} == {"wanda"}
    assert not wanda.warnings


def test_fidelity_without_data_is_on_random_inputs_and_matches_numpy():
    result = prune(MLP, sparsity=0.5)
    fidelity = result.report["fidelity"]
    assert fidelity["data"] == "random inputs"
    # Recompute over the same seeded inputs (numerics.sample_inputs: 4 seeds, batch 8).
    from polaris_opt.numerics import make_session, sample_inputs

    session = make_session(onnx.load(MLP))
    signal = noise = 0.0
    for seed in range(4):
        feeds = sample_inputs(session, seed=seed, dynamic_size=8)
        ref = run_model(onnx.load(MLP), feeds)["logits"].astype(np.float64)
        got = run_model(result.model, feeds)["logits"].astype(np.float64)
        signal += np.sum(ref**2)
        noise += np.sum((ref - got) ** 2)
    assert fidelity["sqnr_db"] == pytest.approx(10 * np.log10(signal / noise), abs=1e-3)


def test_eval_data_gives_top1_before_and_after():
    with np.load(MODELS / "digits_test.npz") as test:
        inputs, labels = {"input": test["x_mlp"]}, test["y"]
    result = prune(MLP, sparsity=0.5, eval_data=(inputs, labels))
    accuracy = result.report["accuracy"]
    after = np.mean(run_model(result.model, inputs)["logits"].argmax(axis=1) == labels)
    before = np.mean(run_model(onnx.load(MLP), inputs)["logits"].argmax(axis=1) == labels)
    assert accuracy["top1_after"] == pytest.approx(after) and accuracy["top1_before"] == pytest.approx(before)
    assert accuracy["top1_drop"] == pytest.approx(100 * (before - after))


def test_nothing_to_prune_returns_the_input_model_untouched(tmp_path):
    source = onnx.load(MLP)
    result = prune(source, tmp_path / "same.onnx", exclude=["*"])
    assert not result.changed and result.model is source
    assert onnx.load(tmp_path / "same.onnx").graph == source.graph
    assert {row["reason"] for row in result.report["skipped"]} == {"excluded"}


def test_lazy_attribute_and_unknown_options():
    assert polaris_opt.prune is prune
    with pytest.raises(TypeError, match="unknown options"):
        prune(MLP, sparsty=0.5)


def test_bad_input_before_any_work(tmp_path):
    out = tmp_path / "never.onnx"
    with pytest.raises(BadInput, match="--method sparsegpt needs calibration data"):
        prune(MLP, out, method="sparsegpt")
    with pytest.raises(BadInput, match="refusing to overwrite the input model"):
        prune(MLP, MLP, sparsity=0.5)
    assert not out.exists()
