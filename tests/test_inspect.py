"""`polaris_opt.inspect.summarize` on hand-built models, and `polaris-opt inspect` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.graph_io import load_model
from polaris_opt.inspect import sparsity_pattern, summarize

CLI = Path(sys.executable).parent / "polaris-opt"
MODELS = Path(__file__).resolve().parent.parent / "models"

# 12 float32 weights, exactly 3 of them zero: sparsity 0.25.
WEIGHT = np.array([[1, 0, 2], [3, 4, 0], [5, 6, 7], [0, 8, 9]], dtype=np.float32)


def polaris(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=120)


def build_model() -> onnx.ModelProto:
    """x[batch,4] → MatMul(W) + B → FusedGelu → If(cond){Add(·, k)} → y[batch,?].

    Parameters: W float32[4,3] (3 zeros), B float16[3], a Constant float32[2,2], a Constant
    value_ints int64[3], a sparse float32[2,4] with 3 stored values, and k float32[3] inside the If.
    """
    branch_init = numpy_helper.from_array(np.ones(3, np.float32), "k")
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["g", "k"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
        [branch_init],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["g"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "S"),
        numpy_helper.from_array(np.array([0, 5, 7], np.int64), "S_indices"),
        [2, 4],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros((2, 2), np.float32))),
        helper.make_node("Constant", [], ["shape"], value_ints=[1, 2, 3]),
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Cast", ["B"], ["b32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["h", "b32"], ["a"]),
        helper.make_node("FusedGelu", ["a"], ["g"], domain="com.microsoft"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    batch_x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])
    initializers = [
        numpy_helper.from_array(WEIGHT, "W"),
        numpy_helper.from_array(np.array([0.5, 0, 1], np.float16), "B"),
    ]
    graph = helper.make_graph(nodes, "test", [batch_x, cond], [y], initializers, sparse_initializer=[sparse])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests", producer_version="1.0")
    helper.set_model_props(model, {"author": "polaris"})
    return model


@pytest.fixture(scope="module")
def summary() -> dict:
    return summarize(build_model())


def test_model_info(summary):
    info = summary["model"]
    assert info["opsets"] == {"ai.onnx": 17, "com.microsoft": 1}
    assert info["producer"] == "tests 1.0"
    assert info["metadata_props"] == {"author": "polaris"}
    assert info["ir_version"] == onnx.IR_VERSION
    assert summary["file"] is None and summary["file_bytes"] is None


def test_op_histogram_counts_subgraph_nodes_apart(summary):
    assert summary["ops"] == {
        "Constant": 2, "MatMul": 1, "Cast": 1, "Add": 1, "com.microsoft::FusedGelu": 1, "If": 1,
    }  # fmt: skip
    assert summary["subgraph_ops"] == {"Add": 1, "Identity": 1}
    assert summary["nodes"] == 7 and summary["subgraph_nodes"] == 2


def test_dynamic_dims_are_shown_by_name_or_question_mark(summary):
    assert summary["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": ["batch", 4]},
        {"name": "cond", "dtype": "bool", "shape": []},
    ]
    assert summary["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", "?"]}]


def test_parameters_per_dtype_are_exact(summary):
    params = summary["parameters"]
    # float32: W 12 + Constant c 4 + sparse S 8 (dense) + k 3 in the If branch.
    assert params["by_dtype"]["float32"] == {"tensors": 4, "elements": 27, "bytes": 48 + 16 + (12 + 24) + 12}
    assert params["by_dtype"]["float16"] == {"tensors": 1, "elements": 3, "bytes": 6}
    assert params["by_dtype"]["int64"] == {"tensors": 1, "elements": 3, "bytes": 24}
    assert params["elements"] == 33 and params["tensors"] == 6
    assert params["bytes"] == 112 + 6 + 24
    assert params["in_constant_nodes"] == {"tensors": 2, "elements": 7, "bytes": 16 + 24}


def test_initializer_rows(summary):
    rows = {row["name"]: row for row in summary["initializers"]}
    assert rows["W"] == {
        "name": "W", "shape": [4, 3], "dtype": "float32", "elements": 12, "bytes": 48,
        "sparsity": 0.25, "source": "initializer", "in_subgraph": False,
        "prunable": True, "pattern": "unstructured",
    }  # fmt: skip
    assert rows["B"]["sparsity"] == pytest.approx(1 / 3)
    assert rows["c"]["source"] == "constant" and rows["c"]["sparsity"] == 1.0
    assert rows["shape"]["dtype"] == "int64" and rows["shape"]["shape"] == [3]
    # Sparse storage: 3 of 8 dense elements stored, bytes = values + int64 indices.
    assert rows["S"]["source"] == "sparse_initializer"
    assert rows["S"]["sparsity"] == 5 / 8 and rows["S"]["bytes"] == 12 + 24
    assert rows["k"]["in_subgraph"] is True
    sizes = [row["bytes"] for row in summary["initializers"]]
    assert sizes == sorted(sizes, reverse=True)


def test_subbyte_tensors_count_packed_bytes():
    model = build_model()
    model.graph.initializer.append(helper.make_tensor("q", TensorProto.INT4, [5], [1, 0, -1, 2, 0]))
    row = next(r for r in summarize(model)["initializers"] if r["name"] == "q")
    assert row["dtype"] == "int4" and row["bytes"] == 3 and row["sparsity"] == 0.4


def test_initializers_listed_as_inputs_are_not_inputs():
    model = build_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]))
    assert [value["name"] for value in summarize(model)["inputs"]] == ["x", "cond"]


# ------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "test.onnx"
    onnx.save(build_model(), path)
    return path


def test_cli_json_matches_the_library(model_file):
    result = polaris("inspect", model_file, "--json")
    assert result.returncode == 0, result.stderr
    expected = json.loads(json.dumps(summarize(load_model(model_file), path=model_file)))
    assert json.loads(result.stdout) == expected
    assert expected["file_bytes"] == model_file.stat().st_size


def test_cli_tables(model_file):
    result = polaris("inspect", model_file, "--top", "2")
    assert result.returncode == 0, result.stderr
    for text in (
        "Inputs and outputs",
        "Operators",
        "Parameters by dtype",
        "[batch, 4]",
        "25.0%",
        "and 4 smaller",
    ):
        assert text in result.stdout
    assert "com.microsoft::FusedGelu" in result.stdout


@pytest.mark.skipif(not (MODELS / "resnet_s.onnx").exists(), reason="model zoo not built")
def test_cli_on_a_zoo_model():
    result = polaris("inspect", MODELS / "resnet_s.onnx", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ops"]["Conv"] > 0


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("this is not a model\n" * 10)
    result = polaris("inspect", bogus)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("polaris-opt: error:") and "notes.onnx" in lines[0]
    assert result.stdout == ""


# ------------------------------------------------------------------------------ weight sparsity


def nm_matrix(rows: int, cols: int, n: int, m: int, seed: int = 0) -> np.ndarray:
    """Random weights keeping the n largest of every m columns of a row (last group padded)."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows, cols)).astype(np.float32)
    for start in range(0, cols, m):
        group = matrix[:, start : start + m]
        drop = np.argsort(np.abs(group), axis=1)[:, : max(group.shape[1] - n, 0)]
        np.put_along_axis(group, drop, 0.0, axis=1)
    return matrix


def block_matrix(rows: int, cols: int, r: int, c: int, seed: int = 0) -> np.ndarray:
    """Random weights with about half of the aligned r×c blocks zero (edge blocks partial)."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows, cols)).astype(np.float32) + 3.0  # no accidental zeros
    keep = rng.random((-(-rows // r), -(-cols // c))) < 0.5
    keep[0, 0], keep[-1, -1] = True, False
    return matrix * np.kron(keep, np.ones((r, c)))[:rows, :cols]


@pytest.mark.parametrize(
    "matrix, pattern",
    [
        (nm_matrix(8, 32, 2, 4), "2:4"),
        (nm_matrix(8, 30, 2, 4), "2:4"),  # 30 columns: the last group has 2 real entries
        (nm_matrix(8, 32, 4, 8), "4:8"),
        (nm_matrix(8, 32, 1, 4), "1:4"),
        (block_matrix(16, 16, 4, 4), "block:4x4"),
        (block_matrix(18, 22, 4, 4), "block:4x4"),  # partial blocks at both edges
        (block_matrix(16, 32, 1, 8), "block:1x8"),
        (block_matrix(32, 8, 16, 1), "block:16x1"),
        (np.where(np.random.default_rng(1).random((32, 64)) < 0.9, 0, 1.0), "unstructured"),
        (np.where(np.random.default_rng(2).random((32, 64)) < 0.5, 0, 1.0), "unstructured"),
        (np.ones((4, 4)), None),
    ],
)
def test_sparsity_pattern_detection(matrix, pattern):
    assert sparsity_pattern(matrix) == pattern


def test_weight_sparsity_and_patterns_of_a_pruned_conv_model():
    import polaris_opt

    pruned = polaris_opt.prune(MODELS / "digits_cnn.onnx", pattern="2:4").model
    summary = summarize(pruned)
    rows = [row for row in summary["initializers"] if row["prunable"]]
    # Two Conv weights (their view: [O, C·3·3], last group padded) and the Gemm weight.
    assert len(rows) == 3 and {row["pattern"] for row in rows} == {"2:4"}
    weights = [
        numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name in {r["name"] for r in rows}
    ]
    zeros = sum(int(np.sum(w == 0)) for w in weights)
    elements = sum(w.size for w in weights)
    assert summary["weight_sparsity"] == {
        "tensors": 3,
        "elements": elements,
        "zeros": zeros,
        "sparsity": zeros / elements,
    }
    biases = [row for row in summary["initializers"] if not row["prunable"]]
    assert biases and all(row["pattern"] is None for row in biases)


def test_cli_sparsity_view_lists_weights_with_zeros_sparsest_first(tmp_path):
    model = onnx.load(MODELS / "digits_mlp.onnx")
    tensors = {t.name: t for t in model.graph.initializer}
    for name, zeroed in (("fc1.weight", 0.5), ("fc2.weight", 0.75)):
        values = numpy_helper.to_array(tensors[name]).copy()
        values.reshape(-1)[: int(zeroed * values.size)] = 0.0
        tensors[name].CopyFrom(numpy_helper.from_array(values, name))
    path = tmp_path / "zeroed.onnx"
    onnx.save(model, path)
    result = polaris("inspect", path, "--sparsity")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layer weights: 3 tensors, 6,464 elements" in out
    assert out.index("fc2.weight") < out.index("fc1.weight") and "fc3.weight" not in out
    assert "75.0%" in out and "50.0%" in out
    # Whole leading rows are zero: fc1 [64, 64] its first 32 rows (aligned 32×32 blocks, the
    # largest side tried), fc2 [32, 64] its first 24 (aligned in 8s, not in 16s).
    document = json.loads(polaris("inspect", path, "--json").stdout)
    patterns = {row["name"]: row["pattern"] for row in document["initializers"]}
    assert patterns == {
        "fc1.weight": "block:32x32",
        "fc2.weight": "block:8x32",
        "fc3.weight": None,
        "fc1.bias": None,
        "fc2.bias": None,
        "fc3.bias": None,
    }
