"""Attention head pruning (polaris_opt.pruning.heads): exact equivalence when a removed head
contributes nothing, transformer_s at 50 %, importance against NumPy references and rankings,
the export variants that match, the patterns that are skipped (model unchanged), shared
constants, and bad input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import MODELS, ListSource, zoo_source
from onnx import helper, numpy_helper

from polaris_opt.capture import with_outputs
from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph, to_model
from polaris_opt.numerics import run_model
from polaris_opt.passes_api import PassContext
from polaris_opt.pipeline import Pipeline
from polaris_opt.pruning.attention_blocks import find_attention_blocks
from polaris_opt.pruning.heads import output_energy, prune_heads, weight_importance

D, HEADS, HEAD_DIM, SEQ = 16, 4, 4, 6
FLOAT, INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


# ------------------------------------------------------------------------------ test models


def attention_model(
    *,
    k_perms: tuple[tuple[int, ...], ...] = ((0, 2, 3, 1),),
    scale: str = "div",
    mask: str = "",
    torch_shapes: bool = False,
    runtime_heads: bool = False,
    merge_shape: tuple[int, ...] = (0, 0, D),
    softmax_axis: int = -1,
    extra_output: str = "",
    extra_reader: str = "",
    share_wq: bool = False,
    seq: int = SEQ,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One self-attention block x [batch, seq, D] -> y, node names under 'attn/'.

    k_perms: the Transposes that bring K to [B, H, dh, S]; scale: where the 1/√dh goes: 'div' or
    'mul' on the scores, 'projection' on Q before its split, 'heads' dh^-¼ on Q and K heads (SDPA);
    mask: '' | 'broadcast' (input [batch, 1, S, S]) | 'per_head' (constant [H, S, S]);
    torch_shapes: split and merge shapes built by Shape/Gather/Unsqueeze/Concat from x;
    runtime_heads: with torch_shapes, the head count too is computed from x's shape;
    extra_output / extra_reader: a per-head tensor that is also a graph output / also read by an
    Identity; share_wq: another MatMul reads Wq; seq: the sequence length.
    """
    rng = np.random.default_rng(seed)
    inits = {f"w{r}": rng.standard_normal((D, D)).astype(np.float32) / 4 for r in "qkvo"}
    inits |= {f"b{r}": rng.standard_normal(D).astype(np.float32) * 0.1 for r in "qkvo"}
    nodes: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [output], name=f"attn/{output}", **attrs))
        return output

    def const(name: str, value) -> str:
        inits[name] = np.asarray(value)
        return name

    if torch_shapes:
        split_shape, merge = torch_style_shapes(op, const, runtime_heads)
    else:
        split_shape = const("split_shape", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
        merge = const("merge_shape", np.array(merge_shape, np.int64))
    heads = {}
    for r in "qkv":
        t = op("Add", [op("MatMul", ["x", f"w{r}"], f"{r}_mm"), f"b{r}"], f"{r}_proj")
        if scale == "projection" and r == "q":
            t = op("Mul", [t, const("scale", np.float32(HEAD_DIM**-0.5))], "q_scaled")
        t = op("Reshape", [t, split_shape], f"{r}_split")
        perms = k_perms if r == "k" else ((0, 2, 1, 3),)
        for i, perm in enumerate(perms):
            t = op("Transpose", [t], f"{r}_heads{i}", perm=list(perm))
        if scale == "heads" and r in "qk":
            t = op("Mul", [const("root_scale", np.float32(HEAD_DIM**-0.25)), t], f"{r}_scaled")
        heads[r] = t
    scores = op("MatMul", [heads["q"], heads["k"]], "scores")
    if scale in ("div", "mul"):
        factor = np.float32(HEAD_DIM**0.5 if scale == "div" else HEAD_DIM**-0.5)
        scores = op(scale.capitalize(), [scores, const("scale", factor)], "scaled")
    feeds = {"x": rng.standard_normal((2, seq, D)).astype(np.float32)}
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["batch", seq, D])]
    if mask == "broadcast":
        feeds["mask"] = np.where(rng.random((2, 1, seq, seq)) < 0.3, -1e4, 0).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("mask", FLOAT, ["batch", 1, seq, seq]))
        scores = op("Add", [scores, "mask"], "masked")
    elif mask == "per_head":
        per_head = rng.standard_normal((HEADS, seq, seq)).astype(np.float32)
        scores = op("Add", [scores, const("per_head", per_head)], "masked")
    probs = op("Softmax", [scores], "probs", axis=softmax_axis)
    context = op("Transpose", [op("MatMul", [probs, heads["v"]], "context")], "context_t", perm=[0, 2, 1, 3])
    merged = op("Reshape", [context, merge], "merged")
    op("Add", [op("MatMul", [merged, "wo"], "o_mm"), "bo"], "y")
    outputs = [helper.make_tensor_value_info("y", FLOAT, None)]
    if share_wq:
        outputs.append(helper.make_tensor_value_info(op("MatMul", ["x", "wq"], "also_wq"), FLOAT, None))
    if extra_reader:
        outputs.append(helper.make_tensor_value_info(op("Identity", [extra_reader], "peek"), FLOAT, None))
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, FLOAT, None))
    initializers = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model, feeds


def torch_style_shapes(op, const, runtime_heads: bool) -> tuple[str, str]:
    """`q.view(x.size(0), x.size(1), H, dh)` and `.reshape(x.size(0), x.size(1), D)` as torch.onnx
    writes them; with runtime_heads the head count is x.size(2) // dh, which is not provable."""
    op("Shape", ["x"], "x_shape")
    zero = const("zero", np.array([0], np.int64))

    def dim(axis: int) -> str:
        return op("Gather", ["x_shape", const(f"axis{axis}", np.int64(axis))], f"dim{axis}")

    batch, seq = (op("Unsqueeze", [dim(a), zero], f"size{a}") for a in (0, 1))
    if runtime_heads:
        heads = op("Div", [dim(2), const("dh", np.int64(HEAD_DIM))], "heads_scalar")
        heads = op("Unsqueeze", [heads, zero], "heads")
    else:
        heads = const("heads", np.array([HEADS], np.int64))
    head_dim = const("head_dim", np.array([HEAD_DIM], np.int64))
    split = op("Concat", [batch, seq, heads, head_dim], "split_shape", axis=0)
    merge = op("Concat", [batch, seq, const("width", np.array([D], np.int64))], "merge_shape", axis=0)
    return split, merge


def cleaned_transformer() -> onnx.ModelProto:
    model = onnx.load(MODELS / "transformer_s.onnx")
    return run_pipeline(model, Pipeline.parse("cleanup"), ctx=PassContext()).model


def scale_head(
    model: onnx.ModelProto, weights: dict[str, str], head: int, head_dim: int, factor: float
) -> onnx.ModelProto:
    """A copy with head `head`'s columns of Wq/Wk/Wv and its rows of Wo multiplied by `factor`.
    `weights` maps the roles 'q', 'k', 'v', 'o' to initializer names; roles left out stay."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    part = slice(head * head_dim, (head + 1) * head_dim)
    roles = {name: role for role, name in weights.items()}
    for tensor in changed.graph.initializer:
        if tensor.name in roles:
            values = numpy_helper.to_array(tensor).copy()
            if roles[tensor.name] == "o":
                values[part, :] *= factor
            else:
                values[:, part] *= factor
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return changed


SMALL = {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}


def transformer_weights(layer: int, roles: str = "qkvo") -> dict[str, str]:
    names = {r: f"layers.{layer}.self_attn.{r}_proj.weight" for r in "qkv"}
    names["o"] = f"layers.{layer}.self_attn.out_proj.weight"
    return {r: names[r] for r in roles}


def prune(
    model: onnx.ModelProto,
    sparsity: float,
    importance: str = "l2",
    exclude: list[str] | None = None,
    ctx: PassContext | None = None,
) -> tuple[onnx.ModelProto, list[dict], list[dict]]:
    """prune_heads on a graph of a copy of `model`; the exported result, rows and skipped."""
    graph = to_graph(_copy(model))
    dense = to_model(graph, model)
    rows, skipped = prune_heads(graph, ctx or PassContext(), sparsity, importance, exclude or [], dense)
    return to_model(graph, model), rows, skipped


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def assert_outputs_close(reference: onnx.ModelProto, model: onnx.ModelProto, feeds, atol: float) -> None:
    expected, got = run_model(reference, feeds), run_model(model, feeds)
    assert list(got) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=atol, err_msg=name)


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


# --------------------------------------------------------------------------- exact equivalence


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_removing_heads_that_contribute_nothing_keeps_transformer_outputs(importance):
    # Head 1 of layer 0 and head 2 of layer 1 have zero Wo rows: each is the weakest head by every
    # measure, and removing it changes nothing but the float summation order.
    model = cleaned_transformer()
    model = scale_head(model, transformer_weights(0, "o"), head=1, head_dim=16, factor=0.0)
    model = scale_head(model, transformer_weights(1, "o"), head=2, head_dim=16, factor=0.0)
    ctx = PassContext(calib=zoo_source("transformer_s", 64, 32))
    pruned, rows, skipped = prune(model, 0.25, importance, ctx=ctx)
    assert [r["removed"] for r in rows] == [[1], [2]]
    assert skipped == []
    feeds = dict(np.load(MODELS / "transformer_s.input.npz"))
    assert_outputs_close(model, pruned, feeds, atol=1e-5)


def test_transformer_at_half_keeps_two_of_four_heads_in_both_layers():
    model = cleaned_transformer()
    pruned, rows, skipped = prune(model, 0.5, "l2")
    assert skipped == []
    assert [r["group"] for r in rows] == ["/layers/0/self_attn", "/layers/1/self_attn"]
    assert [(r["heads_before"], r["heads_after"], len(r["removed"])) for r in rows] == [(4, 2, 2)] * 2
    # Q, K, V: 64x64 weight + 64 bias each, Wo 64x64; all halved.
    assert [(r["params_before"], r["params_after"]) for r in rows] == [(16576, 8288)] * 2
    assert params(pruned) == params(model) - 2 * 8288
    assert rows[0]["layers"] == [f"/layers/0/self_attn/{p}_proj/MatMul" for p in ("q", "k", "v", "out")]
    onnx.checker.check_model(pruned, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    shapes = {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in inferred.graph.value_info
    }
    assert shapes["/layers/0/self_attn/q_proj/Add_output_0"] == ["batch", 16, 32]
    assert shapes["/layers/1/self_attn/Softmax_output_0"] == ["batch", 2, 16, 16]
    assert shapes["/layers/1/self_attn/out_proj/Add_output_0"] == ["batch", 16, 64]
    feeds = dict(np.load(MODELS / "transformer_s.input.npz"))
    out = run_model(pruned, feeds)
    assert out["hidden"].shape == (2, 16, 64) and np.isfinite(out["hidden"]).all()
    # The kept heads' weights are the dense ones, column for column.
    kept = [h for h in range(4) if h not in rows[0]["removed"]]
    columns = np.concatenate([np.arange(h * 16, (h + 1) * 16) for h in kept])
    q = "layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(initializer(pruned, q), initializer(model, q)[:, columns])
    o = "layers.0.self_attn.out_proj.weight"
    np.testing.assert_array_equal(initializer(pruned, o), initializer(model, o)[columns])


# ----------------------------------------------------------------------------------- importance


def test_weight_importance_is_the_sum_of_normalized_per_head_norms():
    model, _ = attention_model()
    (block,), _ = find_attention_blocks(to_graph(_copy(model)))
    w = {r: initializer(model, f"w{r}").astype(np.float64) for r in "qkvo"}
    for norm, measure in (("l1", lambda a: np.abs(a).sum()), ("l2", lambda a: np.sqrt((a**2).sum()))):
        expected = np.zeros(HEADS)
        for r in "qkvo":
            parts = [
                w[r][h * HEAD_DIM : (h + 1) * HEAD_DIM]
                if r == "o"
                else w[r][:, h * HEAD_DIM : (h + 1) * HEAD_DIM]
                for h in range(HEADS)
            ]
            norms = np.array([measure(p) for p in parts])
            expected += norms / norms.mean()
        np.testing.assert_allclose(weight_importance(block, norm), expected, rtol=1e-12)


def test_output_energy_is_the_mean_squared_contribution_of_each_head():
    model, _ = attention_model()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((n, SEQ, D)).astype(np.float32)} for n in (3, 2)]
    (block,), _ = find_attention_blocks(to_graph(_copy(model)))
    (energy,) = output_energy([block], model, PassContext(calib=ListSource(batches)))
    # Reference: each token's context, head by head, through that head's rows of Wo.
    exposed = with_outputs(model, ["context_t"])
    contexts = np.concatenate(
        [run_model(exposed, b)["context_t"].reshape(-1, HEADS, HEAD_DIM) for b in batches]
    )
    wo = initializer(model, "wo").astype(np.float64)
    expected = [
        np.mean(
            np.sum((contexts[:, h].astype(np.float64) @ wo[h * HEAD_DIM : (h + 1) * HEAD_DIM]) ** 2, axis=1)
        )
        for h in range(HEADS)
    ]
    np.testing.assert_allclose(energy, expected, rtol=1e-9)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_importance_picks_the_head_whose_weights_were_scaled_down(importance):
    model, feeds = attention_model()
    weak = scale_head(model, SMALL, head=2, head_dim=HEAD_DIM, factor=0.2)
    ctx = PassContext(calib=ListSource([feeds]))
    _, rows, _ = prune(weak, 0.25, importance, ctx=ctx)
    assert rows[0]["removed"] == [2]
    assert int(np.argmin(rows[0]["importance"])) == 2


# --------------------------------------------------------------------------- matched variants


MATCHED = {
    "plain": {},
    "k-two-transposes": {
        "k_perms": ((0, 2, 1, 3), (0, 1, 3, 2))
    },  # torch: k.transpose(1, 2).transpose(-2, -1)
    "mul-scale": {"scale": "mul"},
    "scaled-q-projection": {"scale": "projection"},
    "sdpa-scaled-heads": {"scale": "heads"},
    "mask": {"mask": "broadcast"},
    "torch-shapes": {"torch_shapes": True},
    "merge-minus-one": {"merge_shape": (0, 0, -1)},
    "merge-literal": {"merge_shape": (-1, SEQ, D)},
    "merge-literal-minus-one": {"merge_shape": (2, SEQ, -1)},
}


@pytest.mark.parametrize("variant", list(MATCHED.values()), ids=list(MATCHED))
def test_export_variants_are_pruned_exactly(variant):
    model, feeds = attention_model(**variant)
    model = scale_head(model, {"o": "wo"}, head=1, head_dim=HEAD_DIM, factor=0.0)
    pruned, rows, skipped = prune(model, 0.25, "l2")
    assert skipped == []
    assert rows[0]["group"] == "attn" and rows[0]["removed"] == [1] and rows[0]["heads_after"] == 3
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    assert_outputs_close(model, pruned, feeds, atol=1e-5)


def test_a_weight_another_node_reads_is_copied_not_edited():
    model, feeds = attention_model(share_wq=True)
    model = scale_head(model, {"o": "wo"}, head=0, head_dim=HEAD_DIM, factor=0.0)
    pruned, rows, _ = prune(model, 0.25, "l2")
    assert rows[0]["removed"] == [0]
    assert initializer(pruned, "wq").shape == (D, D)  # still the full weight, for 'also_wq'
    assert_outputs_close(model, pruned, feeds, atol=1e-5)


def test_a_shape_constant_shared_with_an_excluded_block_is_not_edited():
    # Every head-split Reshape of both layers reads one shape constant; layer 1 is excluded, so
    # layer 0 must get its own copy and layer 1 keep [0, 0, 4, 16].
    graph = to_graph(cleaned_transformer())
    splits = [n for n in graph.nodes if n.op == "Reshape" and n.inputs[1].values.size == 4]
    shared = gs.Constant("shared_split_shape", np.array([0, 0, 4, 16], np.int64))
    for node in splits:
        node.inputs[1] = shared
    model = to_model(graph)
    pruned, rows, skipped = prune(model, 0.5, "l2", exclude=["/layers/1/*"])
    assert [r["group"] for r in rows] == ["/layers/0/self_attn"]
    assert skipped == [{"name": "/layers/1/self_attn", "reason": "excluded"}]
    np.testing.assert_array_equal(initializer(pruned, "shared_split_shape"), [0, 0, 4, 16])
    readers = [n for n in pruned.graph.node if "shared_split_shape" in n.input]
    assert sorted(n.name for n in readers) == [f"/layers/1/self_attn/Reshape{s}" for s in ("", "_1", "_2")]
    feeds = dict(np.load(MODELS / "transformer_s.input.npz"))
    assert run_model(pruned, feeds)["hidden"].shape == (2, 16, 64)
    assert params(pruned) == params(model) - 8288 + 4  # layer 0's own 4-entry shape constant


def test_heads_removed_per_block_round_and_keep_one():
    model, _ = attention_model()
    _, rows, skipped = prune(model, 0.1, "l2")  # round(0.4) = 0
    assert rows == [] and skipped == [{"name": "attn", "reason": "sparsity 0.1 removes no head of 4"}]
    _, rows, _ = prune(model, 0.99, "l2")  # round(3.96) = 4, but one head stays
    assert rows[0]["heads_after"] == 1 and len(rows[0]["removed"]) == 3


# ------------------------------------------------------------------------------------ skipped


SKIPPED = {
    "probs-output": ({"extra_output": "probs"}, "attention probabilities 'probs' is also a graph output"),
    "split-output": ({"extra_output": "q_split"}, "Q tensor 'q_split' is also a graph output"),
    "context-output": ({"extra_output": "context_t"}, "context 'context_t' is also a graph output"),
    "k-reader": ({"extra_reader": "k_heads0"}, "K tensor 'k_heads0' is read by 2 nodes"),
    "scores-reader": ({"extra_reader": "scores"}, "per-head tensor 'scores' is read by 2 nodes"),
    "per-head-mask": ({"mask": "per_head"}, "the mask 'per_head' has a head axis"),
    "softmax-axis": ({"softmax_axis": 2}, "normalizes axis 2, not the last one"),
    "runtime-heads": (
        {"torch_shapes": True, "runtime_heads": True},
        "head count of Q Reshape 'attn/q_split' is computed at run time",
    ),
    # With seq == head_dim, q·k without K's transpose is a valid graph, but not attention.
    "k-perm": (
        {"k_perms": ((0, 2, 1, 3),), "seq": HEAD_DIM},
        "K is transposed by [0, 2, 1, 3], expected [0, 2, 3, 1]",
    ),
}


@pytest.mark.parametrize(("variant", "reason"), list(SKIPPED.values()), ids=list(SKIPPED))
def test_unmatched_blocks_are_skipped_with_a_reason_and_left_unchanged(variant, reason):
    model, _ = attention_model(**variant)
    before = to_model(to_graph(_copy(model)), model)
    after, rows, skipped = prune(model, 0.5, "l2")
    assert rows == []
    assert len(skipped) == 1 and skipped[0]["name"] == "attn"
    assert reason in skipped[0]["reason"]
    assert after.SerializeToString() == before.SerializeToString()


def test_shapes_in_constant_nodes_ask_for_cleanup():
    model = onnx.load(MODELS / "transformer_s.onnx")  # as exported: shapes in Constant nodes
    pruned, rows, skipped = prune(model, 0.5)
    assert rows == [] and [s["name"] for s in skipped] == ["/layers/0/self_attn", "/layers/1/self_attn"]
    assert all(s["reason"].endswith("(a Constant node: run cleanup first)") for s in skipped)


def test_a_softmax_that_is_not_attention_is_not_reported():
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 4] y) <float[8, 4] w> { y = Softmax(h) h = MatMul(x, w) }"""
    )
    model.graph.initializer.append(numpy_helper.from_array(np.ones((8, 4), np.float32), "w"))
    assert prune(model, 0.5)[1:] == ([], [])


# ---------------------------------------------------------------------------------- bad input


def test_taylor_without_calibration_is_bad_input():
    model, _ = attention_model()
    with pytest.raises(BadInput, match="taylor needs calibration data"):
        prune(model, 0.5, "taylor")


@pytest.mark.parametrize(
    ("sparsity", "importance", "message"),
    [(1.0, "l2", "outside"), (-0.1, "l2", "outside"), (0.5, "l3", "not one of l1, l2, taylor")],
)
def test_bad_options_are_bad_input(sparsity, importance, message):
    model, _ = attention_model()
    with pytest.raises(BadInput, match=message):
        prune(model, sparsity, importance)


# ------------------------------------------------------------------------------ through the pass


def test_prune_structured_kind_head_runs_heads_through_the_pipeline():
    model = cleaned_transformer()
    model = scale_head(model, transformer_weights(0, "o"), head=3, head_dim=16, factor=0.0)
    model = scale_head(model, transformer_weights(1, "o"), head=0, head_dim=16, factor=0.0)
    ctx = PassContext(calib=zoo_source("transformer_s", 64, 32))
    pipeline = Pipeline.parse("prune-structured{kind=head,sparsity=0.25,importance=taylor}")
    result = run_pipeline(model, pipeline, ctx=ctx)  # verifies structure after the pass
    report = result.reports[-1]
    assert report.modified
    assert (report.stats["heads_before"], report.stats["heads_after"]) == (8, 6)
    assert [g["removed"] for g in report.details["groups"]] == [[3], [0]]
    feeds = dict(np.load(MODELS / "transformer_s.input.npz"))
    assert_outputs_close(model, result.model, feeds, atol=1e-5)


def test_prune_structured_kind_head_leaves_an_unsafe_block_unchanged():
    model, feeds = attention_model(extra_output="probs")
    result = run_pipeline(model, Pipeline.parse("prune-structured{kind=head}"), ctx=PassContext())
    report = result.reports[-1]
    assert not report.modified and report.details["groups"] == []
    assert "'probs' is also a graph output" in report.details["skipped"][0]["reason"]
    assert_outputs_close(model, result.model, feeds, atol=0)
