"""polaris_opt.report without the command line: model figures, layer rows, files, HTML and SVG."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.errors import BadInput
from polaris_opt.int4 import pack_nibbles
from polaris_opt.report import (
    FORMAT_VERSION,
    build_report,
    check_report_paths,
    load_bench_rows,
    load_report,
    render_html,
    write_reports,
)
from polaris_opt.report.document import EXACT_NOTE, layer_row, merge_layers
from polaris_opt.report.model_stats import model_stats
from polaris_opt.report.svg import BOTTOM, MAX_BARS, ROW, TOP, Bar, bar_chart, nice_step
from polaris_opt.sparse import from_dense

OPSETS = [helper.make_opsetid("", 17)]


def save(tmp_path, name: str, nodes, inputs, outputs, initializers, opsets=OPSETS) -> tuple:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path, model


def float_info(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def dense_matmul(tmp_path, weight: np.ndarray, name: str = "dense") -> tuple:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")]
    inputs, outputs = [float_info("x", [2, weight.shape[0]])], [float_info("y", [2, weight.shape[1]])]
    shape = numpy_helper.from_array(np.array([2, -1], np.int64), "shape")
    return save(tmp_path, name, nodes, inputs, outputs, [numpy_helper.from_array(weight, "w"), shape])


# ------------------------------------------------------------------------------- model figures


def test_dense_model_counts_every_element_and_the_zeros_of_weights_only(tmp_path):
    weight = np.arange(1, 25, dtype=np.float32).reshape(4, 6)
    weight[weight % 3 == 0] = 0.0  # 8 of 24 zero
    path, model = dense_matmul(tmp_path, weight)
    stats = model_stats(path, model)
    assert stats["bytes"] == path.stat().st_size
    # The int64 shape constant is a stored tensor too, but no layer's weight.
    assert stats["precision"] == {"float32": 24, "int64": 2} and stats["parameters"] == 26
    assert stats["sparsity"] == pytest.approx(8 / 24)


def test_qdq_weight_counts_as_int8_and_is_zero_where_the_code_is_its_zero_point(tmp_path):
    codes = np.array([[3, 5, 5, 0], [5, 1, 5, 5], [2, 2, 2, 5]], np.int8)  # [K=3, N=4], axis 1
    zero_point = np.array([5, 5, 2, 5], np.int8)  # per output column
    expected_zeros = int(np.sum(codes == zero_point[None, :]))
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul"),
    ]
    initializers = [
        numpy_helper.from_array(codes, "wq"),
        numpy_helper.from_array(np.full(4, 0.5, np.float32), "ws"),
        numpy_helper.from_array(zero_point, "wz"),
    ]
    path, model = save(
        tmp_path, "qdq", nodes, [float_info("x", [1, 3])], [float_info("y", [1, 4])], initializers
    )
    stats = model_stats(path, model)
    assert stats["precision"] == {"int8": 12 + 4, "float32": 4}
    assert stats["sparsity"] == pytest.approx(expected_zeros / 12)


def test_polaris_sparse_op_counts_stored_values_not_index_arrays(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((7, 12)).astype(np.float32)
    dense[rng.random(dense.shape) > 0.3] = 0.0
    matrix = from_dense(dense, "csr")
    arrays = [("data", matrix.data), ("indices", matrix.indices), ("indptr", matrix.indptr)]
    initializers = [numpy_helper.from_array(a, f"w.{k}") for k, a in arrays]
    node = helper.make_node(
        "SparseMatMul",
        ["x", "w.data", "w.indices", "w.indptr"],
        ["y"],
        domain="ai.polaris",
        format="csr",
        shape=[7, 12],
        name="/fc/SparseMatMul",
    )
    opsets = [*OPSETS, helper.make_opsetid("ai.polaris", 1)]
    path, model = save(
        tmp_path,
        "sparse",
        [node],
        [float_info("x", [1, 12])],
        [float_info("y", [1, 7])],
        initializers,
        opsets,
    )
    stats = model_stats(path, model)
    assert stats["precision"] == {"float32": matrix.data.size} and stats["parameters"] == matrix.data.size
    assert stats["sparsity"] == pytest.approx(np.mean(dense == 0))


def test_int4_weights_count_n_times_k_and_zero_where_the_code_is_8(tmp_path):
    n, k, block = 3, 40, 32  # K padded to 64 codes: the padding is no weight
    codes = np.full((n, 64), 8, np.uint8)
    codes[:, :k] = np.random.default_rng(1).integers(0, 16, (n, k))
    packed = pack_nibbles(codes.reshape(n, 2, block))
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block
    )
    initializers = [
        numpy_helper.from_array(packed, "b"),
        numpy_helper.from_array(np.ones((n, 2), np.float32), "s"),
    ]
    opsets = [*OPSETS, helper.make_opsetid("com.microsoft", 1)]
    path, model = save(
        tmp_path, "int4", [node], [float_info("x", [1, k])], [float_info("y", [1, n])], initializers, opsets
    )
    stats = model_stats(path, model)
    assert stats["precision"] == {"int4": n * k, "float32": n * 2}
    assert stats["sparsity"] == pytest.approx(np.mean(codes[:, :k] == 8))


def test_coo_constant_counts_its_values_and_zeros_at_the_dense_size(tmp_path):
    values = numpy_helper.from_array(np.array([1.5, -2.0, 3.0], np.float32), "w_values")
    indices = numpy_helper.from_array(np.array([0, 5, 9], np.int64), "w_indices")
    sparse = helper.make_sparse_tensor(values, indices, [4, 3])
    nodes = [
        helper.make_node("Constant", [], ["w"], sparse_value=sparse),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    path, model = save(tmp_path, "coo", nodes, [float_info("x", [1, 4])], [float_info("y", [1, 3])], [])
    stats = model_stats(path, model)
    assert stats["precision"] == {"float32": 3} and stats["sparsity"] == pytest.approx(9 / 12)


# ----------------------------------------------------------------------------------- document


def test_build_report_reads_both_files_and_keeps_the_result_strict(tmp_path):
    weight = np.ones((4, 6), np.float32)
    source, _ = dense_matmul(tmp_path, weight, "source")
    weight[:, :3] = 0.0
    target, _ = dense_matmul(tmp_path, weight, "target")
    result = {
        "pipeline": "prune",
        "layers": [{"name": "/fc/MatMul", "op": "MatMul", "precision": "float32", "sqnr_db": math.inf}],
        "fidelity": {"sqnr_db": 12.5, "cosine": 0.99, "top1_agreement": 0.75, "data": "random inputs"},
        "accuracy": {"top1_before": 0.9, "top1_after": 0.8, "top1_drop": 10.0},
        "odd": [math.nan, -math.inf],
    }
    report = build_report("prune", source, target, result)
    assert report["polaris_opt_report"] == FORMAT_VERSION and report["command"] == "prune"
    assert report["input"]["sparsity"] == 0.0 and report["output"]["sparsity"] == pytest.approx(0.5)
    assert report["size_ratio"] == pytest.approx(target.stat().st_size / source.stat().st_size)
    assert report["fidelity"] == {
        "sqnr_db": 12.5,
        "cosine": 0.99,
        "top1_agreement": 0.75,
        "top1_accuracy": 0.8,
        "top1_accuracy_reference": 0.9,
        "samples": None,
        "data": "random inputs",
    }
    (layer,) = report["layers"]
    assert layer["sqnr_db"] is None and layer["note"] == EXACT_NOTE
    assert report["result"]["odd"] == [None, None] and report["bench"] == [] and report["gates"] == []
    json.dumps(report, allow_nan=False)  # strict JSON throughout


def test_command_rows_map_to_report_rows():
    quantize = layer_row({"name": "/c", "op": "Conv", "precision": "int8", "reason": "absorbed"})
    assert (quantize["precision"], quantize["note"], quantize["sparsity"]) == ("int8", "absorbed", None)
    pruned = layer_row(
        {
            "layer": "/c",
            "op": "Conv",
            "pattern": "2:4",
            "method": "magnitude",
            "shape_before": [4, 8],
            "shape_after": [4, 8],
            "params_after": 32,
            "nonzeros_after": 16,
            "sparsity_after": 0.5,
            "bytes_before": 128,
            "bytes_after": 128,
            "sqnr_db": 20.0,
        }
    )
    assert pruned["sparsity"] == 0.5 and pruned["bytes_after"] is None  # zeros do not shrink a dense file
    assert pruned["note"] == "magnitude 2:4, weight 4×8" and pruned["sqnr_db"] == 20.0
    structured = layer_row(
        {
            "layer": "/c",
            "op": "Conv",
            "shape_before": [8, 3],
            "shape_after": [4, 3],
            "params_after": 12,
            "nonzeros_after": 12,
            "sparsity_after": 0.5,
            "bytes_before": 96,
            "bytes_after": 48,
        }
    )
    assert structured["sparsity"] == 0.0 and (structured["bytes_before"], structured["bytes_after"]) == (
        96,
        48,
    )
    sparse = layer_row(
        {
            "layer": "/c",
            "op": "Conv",
            "as": "SparseConv",
            "fused": ["Relu"],
            "shape": [8, 9],
            "format": "bsr",
            "values": "int8",
            "sparsity": 0.7,
            "bytes_before": 288,
            "bytes_after": 90,
        }
    )
    assert (sparse["op"], sparse["precision"], sparse["note"]) == (
        "SparseConv+Relu",
        "int8",
        "bsr int8, weight 8×9",
    )


def test_rows_of_one_layer_from_several_passes_merge_later_figures_winning():
    rows = [
        layer_row({"name": "/a", "op": "Conv", "sparsity": 0.5}),
        layer_row({"name": "/b", "op": "Conv"}),
        layer_row({"name": "/a", "op": "Conv", "precision": "int8", "sqnr_db": 30.0}),
    ]
    merged = merge_layers(rows)
    assert [row["name"] for row in merged] == ["/a", "/b"]
    assert (merged[0]["sparsity"], merged[0]["precision"], merged[0]["sqnr_db"]) == (0.5, "int8", 30.0)


def test_unknown_command_is_refused(tmp_path):
    source, _ = dense_matmul(tmp_path, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="command must be one of"):
        build_report("optimize", source, source, {})


# ---------------------------------------------------------------------------------------- files


def minimal_report(**changes) -> dict:
    model = {"path": "m.onnx", "bytes": 100, "parameters": 10, "precision": {"float32": 10}, "sparsity": 0.0}
    report = {
        "polaris_opt_report": FORMAT_VERSION,
        "command": "quantize",
        "input": model,
        "output": dict(model),
        "size_ratio": 1.0,
        "fidelity": None,
        "layers": [],
        "bench": [],
        "gates": [],
        "result": {},
    }
    return {**report, **changes}


@pytest.mark.parametrize(
    "name, message",
    [
        ("report.txt", "give a .html or .json file name"),
        ("missing/report.html", "does not exist"),
        ("in.onnx.json", None),  # a .json beside the model is fine
    ],
)
def test_report_paths_are_checked_before_any_work(tmp_path, name, message):
    model, output = tmp_path / "in.onnx", tmp_path / "out.onnx"
    if message is None:
        check_report_paths([tmp_path / name], model, output)
        return
    with pytest.raises(BadInput, match=message):
        check_report_paths([tmp_path / name], model, output)


def test_a_report_path_naming_a_model_is_refused(tmp_path):
    model, output = tmp_path / "in.json", tmp_path / "out.html"
    for path in (model, output, tmp_path / "." / "out.html"):
        with pytest.raises(BadInput, match="is the input or the output model"):
            check_report_paths([path], model, output)


def test_written_reports_read_back_and_leave_no_temporary_file(tmp_path):
    report = minimal_report(layers=[layer_row({"name": "/a", "op": "Conv", "sqnr_db": 31.5})])
    write_reports(report, [tmp_path / "r.json", tmp_path / "r.html"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's private 0o600
    assert load_report(tmp_path / "r.json") == report
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == render_html(report)


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "no such file"),
        ("<html></html>", "not a JSON report file"),
        ('{"command": "quantize"}', "not a polaris-opt report"),
        (
            json.dumps(minimal_report(polaris_opt_report=2)),
            "report format version 2; this polaris-opt reads 1",
        ),
        (json.dumps({k: v for k, v in minimal_report().items() if k != "layers"}), "report has no 'layers'"),
    ],
)
def test_bad_report_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "r.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(BadInput, match=re.escape(message)):
        load_report(path)


BENCH_ROW = {
    "model": "m.onnx",
    "runtime": "ort",
    "batch": 1,
    "p50_ms": 1.0,
    "p90_ms": 1.1,
    "p99_ms": 1.5,
    "throughput": 1000.0,
    "peak_rss_mb": 100.0,
    "file_bytes": 100,
    "speedup": 1.0,
    "size_ratio": 1.0,
}


def test_bench_rows_keep_the_report_keys(tmp_path):
    path = tmp_path / "bench.json"
    row = {**BENCH_ROW, "runs": 50, "spread": 1.1, "overhead_ms": 0.01}
    path.write_text(json.dumps({"polaris_opt_bench": 1, "machine": {}, "settings": {}, "results": [row]}))
    assert load_bench_rows(path) == [BENCH_ROW]


@pytest.mark.parametrize(
    "document, message",
    [
        (minimal_report(), "not a polaris-opt bench JSON"),
        ({"polaris_opt_bench": 1, "results": {}}, "'results' is not a list of rows"),
        ({"polaris_opt_bench": 1, "results": [{"model": "m.onnx"}]}, "result row 0 lacks runtime"),
    ],
)
def test_bad_bench_files_are_refused(tmp_path, document, message):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(document))
    with pytest.raises(BadInput, match=message):
        load_bench_rows(path)


# ----------------------------------------------------------------------------------------- HTML


def test_names_from_the_model_are_escaped_everywhere():
    evil = '<script>alert("x")</script>&'
    layer = layer_row({"name": evil, "op": "Conv", "precision": evil, "sqnr_db": 20.0, "note": evil})
    page = render_html(minimal_report(layers=[layer], result={"pipeline": evil}))
    assert "<script" not in page and evil not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page


def test_charts_appear_only_for_what_the_report_holds():
    plain = render_html(minimal_report())
    assert plain.count("<svg") == 1  # parameters by stored type only
    layers = [
        layer_row(
            {
                "name": f"/l{i}",
                "op": "Conv",
                "precision": "int8",
                "sqnr_db": 30.0 + i,
                "sparsity": 0.5,
                "bytes_before": 400,
                "bytes_after": 100,
                "sensitivity_db": 40.0,
            }
        )
        for i in range(3)
    ]
    page = render_html(minimal_report(layers=layers, bench=[BENCH_ROW]))
    for title in (
        "Per-layer SQNR",
        "Per-layer weight sparsity",
        "Per-layer weight bytes",
        "sensitivity",
        "Latency",
    ):
        assert title in page
    assert page.count("<svg") == 6


def test_many_layers_keep_the_chart_short_and_the_table_whole():
    rows = [
        layer_row({"name": f"/block{i}/" + "x" * 60, "op": "Conv", "sqnr_db": float(i)}) for i in range(150)
    ]
    page = render_html(minimal_report(layers=rows))
    chart = page[page.index("Per-layer SQNR") : page.index("</svg>", page.index("Per-layer SQNR"))]
    assert chart.count("<rect") == MAX_BARS  # no precision given: no legend swatch
    height = int(re.search(r'height="(\d+)"', chart).group(1))
    assert height <= TOP + BOTTOM + MAX_BARS * ROW
    assert f"The {MAX_BARS} of 150 layers with the lowest SQNR" in page
    # The lowest SQNRs are kept; a name too long is cut, and the full name is in its tooltip.
    assert "<title>/block0/" + "x" * 60 + ": 0.0 dB, Conv" in chart and "/block149/" not in chart
    assert "…" in chart
    assert page.count("<tr>") == 150 + 1 + 6  # layer rows, its header, the summary table


def test_bar_chart_draws_negative_values_left_of_zero():
    svg = bar_chart("t", [Bar("a", -3.0, "-3", "#123456"), Bar("b", 7.0, "7", "#123456")], unit="dB")
    rects = re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', svg)
    (left_a, width_a), (left_b, _) = [(float(x), float(w)) for x, w in rects]
    assert left_a + width_a == pytest.approx(left_b)  # both bars meet at zero
    assert ">-4<" in svg or ">-5<" in svg  # the axis reaches below the lowest value


@pytest.mark.parametrize(
    "raw, step", [(0.7, 1.0), (1.0, 1.0), (1.3, 2.0), (3.0, 5.0), (45.0, 50.0), (0.012, 0.02)]
)
def test_nice_steps(raw, step):
    assert nice_step(raw) == pytest.approx(step)
