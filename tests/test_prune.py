"""prune: the pruned weights against NumPy references, outputs through ONNX Runtime, every pattern
on every layer kind, scope=global against local, shared and transposed weights, float16, the
zoo models, exclusion, data-driven methods (sequential, in rounds, and from the dense model in
one pass) and correction, and the bad inputs."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import export_like
import numpy as np
import onnx
import pytest
from helpers import ListSource, zoo_source
from onnx import numpy_helper

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.fidelity import compare_models, overall
from polaris_opt.inspect import summarize
from polaris_opt.numerics import make_session, run_model
from polaris_opt.passes.prune import Prune
from polaris_opt.passes_api import PassContext, Progress
from polaris_opt.pipeline import Pipeline
from polaris_opt.pruning.activations import layer_statistics
from polaris_opt.pruning.patterns import Pattern, select
from polaris_opt.pruning.sparsegpt import sparsegpt
from polaris_opt.pruning.targets import find_targets, target_rounds, to_matrix
from polaris_opt.pruning.wanda import wanda_scores

MODELS = Path(__file__).resolve().parent.parent / "models"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)
ZOO = ["digits_mlp", "digits_cnn", "resnet_s", "mobilenetv2_s", "transformer_s"]


def floats(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def parse(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def prune(model: onnx.ModelProto, text: str = "prune", calib=None):
    """Run pipeline `text` (structure verified after each pass); (model, stats, details) of the last pass."""
    result = run_pipeline(model, Pipeline.parse(text), ctx=PassContext(calib=calib))
    report = result.reports[-1]
    return result.model, report.stats, report.details


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def zoo(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    with np.load(MODELS / f"{name}.input.npz") as archive:
        return onnx.load(MODELS / f"{name}.onnx"), {k: archive[k] for k in archive.files}


def output_sqnr(dense: onnx.ModelProto, pruned: onnx.ModelProto, batches) -> float:
    return overall(compare_models(make_session(dense), make_session(pruned), batches)).sqnr_db


def matrices(model: onnx.ModelProto, rows: list[dict]) -> dict[str, np.ndarray]:
    """Each row's weight in the matrix view of its first node, read back from `model`."""
    graph = to_graph(model)
    nodes = {node.name: node for node in graph.nodes}
    values = weights(model)
    return {row["weight"]: to_matrix(nodes[row["layer"]], values[row["weight"]]) for row in rows}


# ------------------------------------------------------------------------ one layer, by hand

MATMUL = """
  g (float[3,{k}] x) => (float[3,{n}] y) <float[{k},{n}] w> {{
    [mm] y = MatMul(x, w) }}"""


def test_unstructured_zeroes_exactly_the_smallest_magnitudes_and_ort_computes_with_them():
    w = floats(20, 12)
    model = parse(MATMUL.format(k=20, n=12), w=w)
    out, stats, details = prune(model, "prune{sparsity=0.7}")
    pruned = weights(out)["w"]
    expected = w.copy()
    expected[np.abs(w) <= np.sort(np.abs(w).ravel())[167]] = 0  # round(0.7 * 240) = 168 smallest
    np.testing.assert_array_equal(pruned, expected)
    x = floats(3, 20)
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], x @ expected, rtol=1e-5, atol=1e-5)
    assert stats == {
        "layers": 1,
        "skipped": 0,
        "params": 240,
        "nonzeros_before": 240,
        "nonzeros_after": 72,
        "sparsity": pytest.approx(0.7),
    }
    (row,) = details["layers"]
    assert row == {
        "layer": "mm",
        "nodes": ["mm"],
        "weight": "w",
        "op": "MatMul",
        "pattern": "unstructured",
        "method": "magnitude",
        "shape": [20, 12],
        "params": 240,
        "nonzeros_before": 240,
        "nonzeros_after": 72,
        "sparsity": pytest.approx(0.7),
        "bytes": 960,
    }


LAYERS = {
    "MatMul": (
        """g (float[2,24] x) => (float[2,10] y) <float[24,10] w> { [layer] y = MatMul(x, w) }""",
        (24, 10),
    ),
    "Gemm transB=0": (
        """g (float[2,24] x) => (float[2,10] y) <float[24,10] w> { [layer] y = Gemm(x, w) }""",
        (24, 10),
    ),
    "Gemm transB=1": (
        """g (float[2,24] x) => (float[2,10] y) <float[10,24] w> { [layer] y = Gemm<transB=1>(x, w) }""",
        (10, 24),
    ),
    "Conv": (
        """g (float[1,3,6,6] x) => (float[1,8,4,4] y) <float[8,3,3,3] w> { [layer] y = Conv(x, w) }""",
        (8, 3, 3, 3),
    ),
    "Conv group=2": (
        """g (float[1,4,6,6] x) => (float[1,8,4,4] y) <float[8,2,3,3] w> {
             [layer] y = Conv<group=2>(x, w) }""",
        (8, 2, 3, 3),
    ),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.6), ("2:4", 0.5), ("block:2x4", 0.5)])
def test_every_pattern_on_every_layer_kind_follows_the_matrix_view(layer, pattern, sparsity):
    text, shape = LAYERS[layer]
    w = floats(*shape)
    model = parse(text, w=w)
    out, _, details = prune(model, f"prune{{sparsity={sparsity},pattern={pattern}}}")
    node = to_graph(model).nodes[0]
    view = to_matrix(node, w)
    keep = select(np.abs(view), Pattern.parse(pattern), sparsity)
    np.testing.assert_array_equal(to_matrix(node, weights(out)["w"]), np.where(keep, view, 0))
    assert details["layers"][0]["nonzeros_after"] == keep.sum()
    x = floats(*[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    np.testing.assert_allclose(
        run_model(out, {"x": x})["y"], run_model(parse(text, w=weights(out)["w"]), {"x": x})["y"]
    )


def test_two_four_groups_run_along_the_reduction_axis_of_each_layout():
    # MatMul W [K, N]: groups of 4 along K (axis 0); Gemm transB=1 W [N, K]: along axis 1.
    w = floats(16, 6)
    out, _, _ = prune(parse(MATMUL.format(k=16, n=6), w=w), "prune{pattern=2:4}")
    groups = weights(out)["w"].reshape(4, 4, 6)  # [group, 4 along K, N]
    assert (np.count_nonzero(groups, axis=1) == 2).all()
    text, _ = LAYERS["Gemm transB=1"]
    out, _, _ = prune(parse(text, w=floats(10, 24)), "prune{pattern=2:4}")
    assert (np.count_nonzero(weights(out)["w"].reshape(10, 6, 4), axis=2) == 2).all()


def test_float16_weights_stay_float16():
    model = parse(
        """g (float16[2,32] x) => (float16[2,8] y) <float16[32,8] w> { [mm] y = MatMul(x, w) }""",
        w=floats(32, 8, dtype=np.float16),
    )
    out, stats, _ = prune(model, "prune{sparsity=0.75}")
    pruned = weights(out)["w"]
    assert pruned.dtype == np.float16
    assert np.count_nonzero(pruned) == 64
    assert stats["sparsity"] == 0.75


def test_a_weight_already_sparse_enough_is_left_unchanged():
    w = floats(8, 8)
    w[:, :6] = 0  # 75 % zeros
    model = parse(MATMUL.format(k=8, n=8), w=w)
    graph = to_graph(model)
    result = Prune(sparsity=0.5).run(graph, PassContext())
    assert not result.modified
    assert result.details["layers"][0]["nonzeros_after"] == 16
    np.testing.assert_array_equal(graph.nodes[0].inputs[1].values, w)


# ------------------------------------------------------------------- shared and folded weights


def test_a_shared_initializer_is_pruned_once_and_both_readers_see_the_same_zeros():
    w = floats(16, 16)
    model = parse(
        """g (float[2,16] x) => (float[2,16] y) <float[16,16] w> {
             [first] h = MatMul(x, w)
             [second] y = MatMul(h, w) }""",
        w=w,
    )
    out, stats, details = prune(model, "prune{sparsity=0.5}")
    assert stats["layers"] == 1 and stats["params"] == 256
    (row,) = details["layers"]
    assert row["nodes"] == ["first", "second"] and row["nonzeros_after"] == 128
    pruned = weights(out)["w"]
    assert len([t for t in out.graph.initializer if t.name == "w"]) == 1
    x = floats(2, 16)
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], x @ pruned @ pruned, rtol=1e-4, atol=1e-4)


def test_a_weight_reaching_its_matmul_through_transpose_is_pruned_after_cleanup():
    w = floats(12, 20)  # stored [N, K]; the graph transposes it to [K, N]
    model = parse(
        """g (float[2,20] x) => (float[2,12] y) <float[12,20] w> {
             t = Transpose<perm=[1,0]>(w)
             [mm] y = MatMul(x, t) }""",
        w=w,
    )
    out, stats, details = prune(model, "cleanup,prune{sparsity=0.5}")
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    (row,) = details["layers"]
    folded = weights(out)[row["weight"]]
    assert folded.shape == (20, 12) and np.count_nonzero(folded) == 120
    expected = w.T.copy()
    expected[~select(np.abs(expected.T), Pattern("unstructured"), 0.5).T] = 0
    np.testing.assert_array_equal(folded, expected)
    x = floats(2, 20)
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], x @ expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "route",
    [
        "s = Constant<value = int64[2] {20, 12}>()\n             t = Reshape(w, s)",
        "t = Cast<to = 1>(w)",
    ],
    ids=["reshape", "cast"],
)
def test_a_weight_reaching_its_matmul_through_reshape_or_cast_is_pruned_after_cleanup(route):
    stored = np.float16 if "Cast" in route else np.float32
    w = floats(20, 12).astype(stored)
    kind = "float16" if stored is np.float16 else "float"
    shape = "[20,12]" if "Cast" in route else "[240]"
    model = parse(
        f"""g (float[2,20] x) => (float[2,12] y) <{kind}{shape} w> {{
             {route}
             [mm] y = MatMul(x, t) }}""",
        w=w.reshape(-1) if "Reshape" in route else w,
    )
    out, _, details = prune(model, "cleanup,prune{sparsity=0.5}")
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    (row,) = details["layers"]
    folded = weights(out)[row["weight"]]
    assert folded.shape == (20, 12) and folded.dtype == np.float32
    assert np.count_nonzero(folded) == 120
    kept = folded != 0
    np.testing.assert_array_equal(folded[kept], w.astype(np.float32)[kept])
    # The pruned half is the smaller half of the layer's magnitudes.
    assert np.abs(folded[kept]).min() >= np.abs(w.astype(np.float32)[~kept]).max()


def test_weights_in_if_branches_are_left_alone_and_the_model_still_runs():
    model, feeds = export_like.with_if()
    out, _, _ = prune(model, "cleanup,prune{sparsity=0.5}")
    assert all(np.isfinite(v).all() for v in run_model(out, feeds).values())


# ------------------------------------------------------------------------------- zoo models


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_run_after_pruning_and_inspect_shows_the_requested_sparsity(name):
    model, feeds = zoo(name)
    out, stats, details = prune(model, "cleanup,prune{sparsity=0.7}")
    outputs = run_model(out, feeds)
    assert all(np.isfinite(v).all() for v in outputs.values())
    inspected = {row["name"]: row for row in summarize(out)["initializers"]}
    for row in details["layers"]:
        expected = round(0.7 * row["params"]) / row["params"]
        assert inspected[row["weight"]]["sparsity"] == pytest.approx(expected, abs=1e-12)
    assert stats["layers"] == len(details["layers"]) > 0


@pytest.mark.parametrize("name", ["digits_cnn", "mobilenetv2_s", "transformer_s"])
def test_zoo_models_take_nm_and_block_patterns(name):
    model, feeds = zoo(name)
    out, _, details = prune(model, "cleanup,prune{pattern=2:4}")
    assert all(np.isfinite(v).all() for v in run_model(out, feeds).values())
    for view in matrices(out, details["layers"]).values():
        full = view.shape[1] // 4 * 4
        assert (np.count_nonzero(view[:, :full].reshape(-1, 4), axis=1) <= 2).all()
    out, _, details = prune(model, "cleanup,prune{pattern=block:4x4,sparsity=0.5}")
    assert all(np.isfinite(v).all() for v in run_model(out, feeds).values())
    assert 0.3 < sum(r["params"] - r["nonzeros_after"] for r in details["layers"]) / sum(
        r["params"] for r in details["layers"]
    )


# ------------------------------------------------------------------------ exclude, first/last


def test_exclude_keeps_matching_nodes_and_weights_dense():
    model, _ = zoo("digits_mlp")
    out, stats, details = prune(model, "prune{exclude=/fc1/*;fc3.weight}")
    assert [row["layer"] for row in details["layers"]] == ["/fc2/Gemm"]
    assert details["skipped"] == [
        {"name": "/fc1/Gemm", "reason": "excluded"},
        {"name": "/fc3/Gemm", "reason": "excluded"},
    ]
    dense, pruned = weights(model), weights(out)
    np.testing.assert_array_equal(pruned["fc1.weight"], dense["fc1.weight"])
    np.testing.assert_array_equal(pruned["fc3.weight"], dense["fc3.weight"])
    assert np.count_nonzero(pruned["fc2.weight"]) == 1024
    assert stats["skipped"] == 2


def test_excluding_one_reader_of_a_shared_weight_keeps_it_dense_for_both():
    model = parse(
        """g (float[2,16] x) => (float[2,16] y) <float[16,16] w> {
             [first] h = MatMul(x, w)
             [second] y = MatMul(h, w) }""",
        w=floats(16, 16),
    )
    out, stats, details = prune(model, "prune{exclude=second}")
    np.testing.assert_array_equal(weights(out)["w"], weights(model)["w"])
    assert details["layers"] == [] and stats["layers"] == 0
    assert {"name": "first", "reason": "weight 'w' is shared with an excluded node"} in details["skipped"]


def test_skip_first_last_keeps_the_input_and_classifier_layers_dense():
    model, _ = zoo("digits_mlp")
    out, _, details = prune(model, "prune{skip-first-last=true}")
    assert [row["layer"] for row in details["layers"]] == ["/fc2/Gemm"]
    reasons = {row["name"]: row["reason"] for row in details["skipped"]}
    assert reasons == {n: "first or last layer (--skip-first-last)" for n in ["/fc1/Gemm", "/fc3/Gemm"]}
    np.testing.assert_array_equal(weights(out)["fc1.weight"], weights(model)["fc1.weight"])


# ------------------------------------------------------------------------------ global scope


def test_global_prunes_the_exact_overall_count_and_layers_differ():
    model, _ = zoo("digits_mlp")
    local, local_stats, local_details = prune(model, "prune{sparsity=0.6}")
    glob, glob_stats, glob_details = prune(model, "prune{sparsity=0.6,scope=global}")
    total = local_stats["params"]
    assert glob_stats["params"] == total == 64 * 64 + 32 * 64 + 10 * 32
    assert total - glob_stats["nonzeros_after"] == round(0.6 * total)
    per_layer = [row["sparsity"] for row in glob_details["layers"]]
    assert len(set(round(s, 6) for s in per_layer)) == 3  # not one sparsity for all
    for row in local_details["layers"]:
        assert row["params"] - row["nonzeros_after"] == round(0.6 * row["params"])
    # Global magnitude pruning is one threshold: every kept weight outweighs every pruned one.
    dense, pruned = weights(model), weights(glob)
    names = [row["weight"] for row in glob_details["layers"]]
    kept = np.concatenate([np.abs(dense[n][pruned[n] != 0]) for n in names])
    gone = np.concatenate([np.abs(dense[n][pruned[n] == 0]) for n in names])
    assert kept.min() >= gone.max()


def test_global_respects_max_layer_sparsity():
    model, _ = zoo("digits_mlp")
    _, stats, details = prune(model, "prune{sparsity=0.8,scope=global,max-layer-sparsity=0.82}")
    assert all(row["sparsity"] <= 0.82 for row in details["layers"])
    assert stats["params"] - stats["nonzeros_after"] == round(0.8 * stats["params"])


def test_global_block_pattern_prunes_whole_blocks_ranked_across_layers():
    model, _ = zoo("digits_mlp")
    out, _, details = prune(model, "prune{sparsity=0.5,scope=global,pattern=block:4x4}")
    for view in matrices(out, details["layers"]).values():
        rows, cols = view.shape[0] // 4 * 4, view.shape[1] // 4 * 4
        tiles = view[:rows, :cols].reshape(rows // 4, 4, cols // 4, 4)
        nonzero = np.count_nonzero(tiles, axis=(1, 3))
        assert ((nonzero == 0) | (nonzero == 16)).all()
    blocks = 16 * 16 + 8 * 16 + 3 * 8  # fc3 has 10 rows: three block rows, one partial
    assert 0.45 < sum(r["params"] - r["nonzeros_after"] for r in details["layers"]) / (blocks * 16) < 0.55


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("sparsity=-0.1", r"sparsity -0.1 is outside \[0, 1\)"),
        ("sparsity=1.0", r"sparsity 1.0 is outside \[0, 1\)"),
        ("sparsity=1.5", r"sparsity 1.5 is outside \[0, 1\)"),
        ("max-layer-sparsity=0", r"max-layer-sparsity 0.0 is outside \(0, 1\]"),
        ("max-layer-sparsity=1.5", r"max-layer-sparsity 1.5 is outside \(0, 1\]"),
        ("pattern=3:2", r"pattern '3:2' is not valid; use 'unstructured'"),
        ("pattern=0:4", r"pattern '0:4' is not valid"),
        ("pattern=block:0x4", r"pattern 'block:0x4' is not valid"),
        ("pattern=blk:4x4", r"pattern 'blk:4x4' is not valid"),
        ("pattern=2:4,sparsity=0.7", r"pattern 2:4 means sparsity 0.5 .*not 0.7"),
        ("pattern=1:4", r"pattern 1:4 means sparsity 0.75 .*not 0.5"),
        (
            "method=wanda",
            r"^prune: --method wanda needs calibration data: give --calib DATA \(a .npz, a fold",
        ),
        ("method=sparsegpt", r"--method sparsegpt needs calibration data: give --calib DATA"),
        ("correct=true", r"--correct needs calibration data: give --calib DATA"),
        ("damp=0", r"damp 0.0 must be a positive number"),
        ("block-size=0", r"block-size 0 must be a positive number"),
    ],
)
def test_bad_options_are_bad_input_and_leave_the_model_unchanged(options, message):
    w = floats(8, 8)
    model = parse(MATMUL.format(k=8, n=8), w=w)
    graph = to_graph(model)
    with pytest.raises(BadInput, match=message):
        Pipeline.parse(f"prune{{{options}}}").passes()[0][1].run(graph, PassContext())
    np.testing.assert_array_equal(graph.nodes[0].inputs[1].values, w)


def test_a_global_budget_beyond_the_layer_cap_is_bad_input():
    model, _ = zoo("digits_mlp")
    with pytest.raises(BadInput, match="cannot be met with max-layer-sparsity 0.5"):
        prune(model, "prune{sparsity=0.9,scope=global,max-layer-sparsity=0.5}")


def test_a_weight_holding_nan_is_bad_input_naming_it():
    w = floats(8, 8)
    w[2, 3] = np.nan
    with pytest.raises(BadInput, match="weight 'w' of node 'mm' holds NaN or Inf.*exclude=mm"):
        prune(parse(MATMUL.format(k=8, n=8), w=w))


def test_an_nm_pattern_with_its_own_sparsity_is_accepted_in_pipeline_text():
    model = parse(MATMUL.format(k=8, n=8), w=floats(8, 8))
    text = "prune{pattern=1:4,sparsity=0.75}"
    assert Pipeline.parse(text).text() == text
    _, stats, _ = prune(model, text)
    assert stats["sparsity"] == 0.75


# ------------------------------------------------------------------ wanda, sparsegpt, correct


def digits_mlp_calibration() -> ListSource:
    return zoo_source("digits_mlp", 256, 64)


def digits_test_batches(name: str = "digits_mlp") -> list[dict[str, np.ndarray]]:
    """The held-out digits test set (450 rows) shaped for zoo model `name`."""
    with np.load(MODELS / "digits_test.npz") as archive:
        x = archive["x_mlp" if name == "digits_mlp" else "x_cnn"]
    return [{"input": x[i : i + 150]} for i in range(0, len(x), 150)]


def test_wanda_beats_magnitude_in_output_sqnr_on_digits_mlp():
    model, _ = zoo("digits_mlp")
    calib = digits_mlp_calibration()
    batches = digits_test_batches()
    by_method = {}
    for method in ["magnitude", "wanda", "sparsegpt"]:
        out, stats, details = prune(model, f"prune{{sparsity=0.5,method={method}}}", calib=calib)
        assert stats["params"] - stats["nonzeros_after"] == round(0.5 * stats["params"])
        assert {row["method"] for row in details["layers"]} == {method}
        by_method[method] = output_sqnr(model, out, batches)
    assert by_method["wanda"] > by_method["magnitude"]
    assert by_method["sparsegpt"] > by_method["magnitude"]


def test_wanda_compares_weights_within_each_output_row():
    model, _ = zoo("digits_mlp")
    out, _, details = prune(model, "prune{sparsity=0.5,method=wanda}", calib=digits_mlp_calibration())
    for view in matrices(out, details["layers"]).values():
        per_row = view.shape[1] - np.count_nonzero(view, axis=1)
        assert per_row.max() - per_row.min() <= 1  # floor or ceil of each row's share


@pytest.mark.parametrize("sequential", ["true", "false"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.7), ("2:4", 0.5), ("block:4x4", 0.5)])
def test_every_pattern_works_with_every_data_driven_method(method, pattern, sparsity, sequential):
    model, feeds = zoo("digits_cnn")
    calib = zoo_source("digits_cnn", 64, 32)
    options = f"sparsity={sparsity},method={method},pattern={pattern},sequential={sequential}"
    out, stats, details = prune(model, f"cleanup,prune{{{options}}}", calib=calib)
    assert {row["method"] for row in details["layers"]} == {method}
    assert all(np.isfinite(v).all() for v in run_model(out, feeds).values())
    views = matrices(out, details["layers"])
    if pattern == "unstructured":
        assert stats["params"] - stats["nonzeros_after"] == sum(
            round(sparsity * row["params"]) for row in details["layers"]
        )
    elif pattern == "2:4":
        for view in views.values():
            full = view.shape[1] // 4 * 4
            assert (np.count_nonzero(view[:, :full].reshape(-1, 4), axis=1) <= 2).all()
    else:
        for view in views.values():
            rows, cols = view.shape[0] // 4 * 4, view.shape[1] // 4 * 4
            nonzero = np.count_nonzero(view[:rows, :cols].reshape(rows // 4, 4, cols // 4, 4), axis=(1, 3))
            assert ((nonzero == 0) | (nonzero == 16)).all() and (nonzero == 0).any()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_global_data_driven_pruning_is_exact_overall(method):
    model, _ = zoo("digits_mlp")
    _, stats, details = prune(
        model, f"prune{{sparsity=0.7,method={method},scope=global}}", calib=digits_mlp_calibration()
    )
    assert stats["params"] - stats["nonzeros_after"] == round(0.7 * stats["params"])
    assert len({round(row["sparsity"], 6) for row in details["layers"]}) > 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_layer_without_statistics_falls_back_to_magnitude_and_says_so(method):
    # Input statistics are not collected for ConvTranspose: it is pruned by magnitude.
    w1, w2 = floats(8, 4, 3, 3), floats(8, 4, 3, 3)
    model = parse(
        """g (float[N,4,6,6] x) => (float[N,4,6,6] y) <float[8,4,3,3] w1, float[8,4,3,3] w2> {
             r = Relu(x)
             [conv] h = Conv(r, w1)
             [up] y = ConvTranspose(h, w2) }""",
        w1=w1,
        w2=w2,
    )
    calib = ListSource([{"x": floats(4, 4, 6, 6)}])
    out, _, details = prune(model, f"prune{{sparsity=0.5,method={method}}}", calib=calib)
    assert {row["layer"]: row["method"] for row in details["layers"]} == {"conv": method, "up": "magnitude"}
    view = to_matrix(to_graph(model).nodes[1], w2)
    keep = select(np.abs(view), Pattern("unstructured"), 0.5)
    np.testing.assert_array_equal(
        to_matrix(to_graph(out).nodes[1], weights(out)["w2"]), np.where(keep, view, 0)
    )


# --------------------------------------------------------------------------- sequential

BRANCHES = """
  g (float[N,8] x) => (float[N,4] y) <float[8,6] a, float[8,6] b, float[6,4] c> {
    [left] p = MatMul(x, a)
    [right] q = MatMul(x, b)
    s = Add(p, q)
    r = Relu(s)
    [join] y = MatMul(r, c) }"""


def branches() -> tuple[onnx.ModelProto, ListSource]:
    """Two parallel layers (round 0) and the layer that joins them (round 1), with 3 calibration batches."""
    model = parse(BRANCHES, a=floats(8, 6), b=floats(8, 6), c=floats(6, 4))
    return model, ListSource([{"x": floats(16, 8)} for _ in range(3)])


def recorder(seen: list) -> Progress:
    """A progress callback that notes [description, total, advanced] for every bar opened."""

    @contextmanager
    def progress(description, total):
        seen.append([description, total, 0])
        bar = seen[-1]
        yield lambda n=1: bar.__setitem__(2, bar[2] + n)

    return progress


@pytest.mark.parametrize(
    ("method", "scope", "sequential", "passes"),
    [
        ("sparsegpt", "local", True, 2),
        ("sparsegpt", "global", True, 3),  # the dense model ranks the layers first
        ("sparsegpt", "local", False, 1),
        # wanda reads the dense model's norms once, whatever `sequential` says.
        ("wanda", "local", True, 1),
        ("wanda", "global", True, 1),
        ("wanda", "global", False, 1),
    ],
)
def test_two_parallel_branches_and_a_join_take_one_statistics_pass_per_round(
    method, scope, sequential, passes
):
    model, calib = branches()
    graph = to_graph(model)
    targets, _ = find_targets(graph)
    assert [t.node.name for t in targets] == ["left", "right", "join"]
    assert target_rounds(graph, targets) == [0, 0, 1]
    seen = []
    text = f"prune{{method={method},scope={scope},sequential={str(sequential).lower()}}}"
    run_pipeline(model, Pipeline.parse(text), ctx=PassContext(calib=calib, progress=recorder(seen)))
    assert [bar for bar in seen if bar[0] == "collecting layer statistics"] == [
        ["collecting layer statistics", 3, 3]
    ] * passes
    assert (["pruning layer by layer", 2, 2] in seen) == (sequential and method == "sparsegpt")


def test_sequential_sparsegpt_fits_the_join_to_the_dense_outputs_from_the_pruned_branches():
    model, calib = branches()
    out, _, details = prune(model, "prune{sparsity=0.5,method=sparsegpt}", calib=calib)
    dense, pruned = weights(model), weights(out)
    x = np.concatenate([b["x"] for b in calib.batches()]).astype(np.float64)
    # Round 0 reads the graph input, the same in both models: plain SparseGPT from XᵀX.
    for name in ("a", "b"):
        expected = sparsegpt(dense[name].T, (x.T @ x)[None], Pattern("unstructured"), 0.5)
        np.testing.assert_allclose(pruned[name], expected.T, rtol=1e-5, atol=1e-6)
    # Round 1: the join's inputs come from the pruned branches; its weights first map them to the
    # dense outputs (damped least squares), then SparseGPT prunes them on the pruned inputs' XᵀX.
    inputs = np.maximum(x @ pruned["a"] + x @ pruned["b"], 0)
    dense_inputs = np.maximum(x @ dense["a"] + x @ dense["b"], 0)
    hessian = inputs.T @ inputs
    lam = 0.01 * np.mean(np.diag(hessian))
    view = dense["c"].T.astype(np.float64)  # [4 outputs, 6 inputs]
    lhs = np.vstack([inputs, np.sqrt(lam) * np.eye(6)])
    rhs = np.vstack([dense_inputs @ view.T, np.sqrt(lam) * view.T])
    fitted = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    expected = sparsegpt(fitted, hessian[None], Pattern("unstructured"), 0.5)
    np.testing.assert_allclose(pruned["c"], expected.T, rtol=1e-4, atol=1e-5)
    assert [row["method"] for row in details["layers"]] == ["sparsegpt"] * 3


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sequential_sparsegpt_beats_one_shot_from_dense_on_the_held_out_digits(name, sparsity):
    model, _ = zoo(name)
    calib = zoo_source(name, 256, 64)
    batches = digits_test_batches(name)
    sqnr = {}
    for sequential in ("true", "false"):
        text = f"cleanup,prune{{sparsity={sparsity},method=sparsegpt,sequential={sequential}}}"
        out, stats, details = prune(model, text, calib=calib)
        pruned = stats["params"] - stats["nonzeros_after"]
        assert pruned == sum(round(sparsity * row["params"]) for row in details["layers"])
        sqnr[sequential] = output_sqnr(model, out, batches)
    assert sqnr["true"] > sqnr["false"] + 0.5, sqnr


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_false_prunes_every_layer_from_the_dense_statistics(method):
    dense, _ = zoo("digits_cnn")
    model = run_pipeline(dense, Pipeline.parse("cleanup"), ctx=PassContext()).model
    calib = zoo_source("digits_cnn", 64, 32)
    targets, _ = find_targets(to_graph(model))
    statistics = layer_statistics(model, targets, calib, diagonal_only=method == "wanda")
    views = {}
    for sequential in ("false", "true"):
        out, _, details = prune(
            model, f"prune{{sparsity=0.6,method={method},sequential={sequential}}}", calib
        )
        views[sequential] = matrices(out, details["layers"])
    for target in targets:
        view, stats = target.matrix(), statistics[target.name]
        if method == "sparsegpt":
            expected = sparsegpt(view, stats.hessian, Pattern("unstructured"), 0.6)
        else:
            keep = select(wanda_scores(view, stats.sq_norms), Pattern("unstructured"), 0.6, per_row=True)
            expected = np.where(keep, view, 0)
        np.testing.assert_array_equal(views["false"][target.name], expected)
    first, *later = [target.name for target in targets]
    np.testing.assert_array_equal(views["true"][first], views["false"][first])
    if method == "wanda":  # always from the dense model
        assert all(np.array_equal(views["true"][name], views["false"][name]) for name in later)
    else:  # sequentially only the first layer, which reads the graph input, sees the same statistics
        assert all(not np.array_equal(views["true"][name], views["false"][name]) for name in later)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_global_allocation_is_decided_once_from_the_dense_model(method):
    model, _ = zoo("digits_mlp")
    kept = {}
    for sequential in ("true", "false"):
        text = f"prune{{sparsity=0.7,method={method},scope=global,sequential={sequential}}}"
        _, stats, details = prune(model, text, calib=digits_mlp_calibration())
        assert stats["params"] - stats["nonzeros_after"] == round(0.7 * stats["params"])
        kept[sequential] = [row["nonzeros_after"] for row in details["layers"]]
    assert kept["true"] == kept["false"]


def test_sequential_is_an_option_of_the_pipeline_text():
    text = "prune{method=sparsegpt,sequential=false}"
    assert Pipeline.parse(text).text() == text
    assert Pipeline.parse("prune{method=wanda}").passes()[0][1].sequential is True


def test_correct_merges_the_correction_rows_into_the_layer_rows():
    model, _ = zoo("digits_mlp")
    calib = digits_mlp_calibration()
    out, _, details = prune(model, "prune{sparsity=0.7,correct=true}", calib=calib)
    plain, _, _ = prune(model, "prune{sparsity=0.7}")
    for row in details["layers"]:
        assert row["refit"] == "scale+bias"
        assert row["gain_db"] == pytest.approx(row["sqnr_after_db"] - row["sqnr_before_db"], abs=2e-3)
    assert {c["layer"] for c in details["correction"]} == {"/fc1/Gemm", "/fc2/Gemm", "/fc3/Gemm"}
    # The pruned weights keep their zeros (each output row is only scaled), and the output moved
    # closer to dense.
    for n in ["fc1.weight", "fc2.weight", "fc3.weight"]:
        corrected, pruned = weights(out)[n], weights(plain)[n]
        np.testing.assert_array_equal(corrected == 0, pruned == 0)
        row_scale = np.abs(corrected).sum(axis=1) / np.abs(pruned).sum(axis=1)
        np.testing.assert_allclose(corrected, pruned * row_scale[:, None], rtol=1e-5)
    batches = list(calib.batches())
    assert output_sqnr(model, out, batches) > output_sqnr(model, plain, batches)
