"""Graph I/O: safe loading (bad files, external data) and atomic, stamped saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt import __version__, graph_io
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph, to_model
from polaris_opt.graph_io import load_model, max_ir_version_for_ort, save_model
from polaris_opt.numerics import run_model

MODELS = Path(__file__).resolve().parent.parent / "models"


def tiny_model(weight: np.ndarray | None = None) -> onnx.ModelProto:
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) if weight is None else weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def with_external_weight(tmp_path: Path, location: str) -> Path:
    """A model whose weight points at `location` (relative to the model file)."""
    model = tiny_model()
    weight = model.graph.initializer[0]
    data = weight.raw_data or numpy_helper.to_array(weight).tobytes()
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        weight.external_data.add(key=key, value=value)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------------------------------- load


def test_loads_a_zoo_model():
    model = load_model(MODELS / "resnet_s.onnx")
    assert model.graph.node


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"this is plainly not a protobuf, just some text\n" * 3, "not an ONNX model"),
    ],
)
def test_refuses_files_that_are_not_models(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=message):
        load_model(path)


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_model(tmp_path / "absent.onnx")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_refuses_a_truncated_file(tmp_path, fraction):
    whole = (MODELS / "resnet_s.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(whole[: int(len(whole) * fraction)])
    with pytest.raises(BadInput):
        load_model(path)


def test_loads_external_data_inside_the_folder(tmp_path):
    path = with_external_weight(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    model = load_model(path)
    np.testing.assert_array_equal(
        numpy_helper.to_array(model.graph.initializer[0]), np.arange(12, dtype=np.float32).reshape(3, 4)
    )


def test_refuses_a_missing_external_data_file(tmp_path):
    path = with_external_weight(tmp_path, "weights.bin")
    with pytest.raises(BadInput, match="external data file 'weights.bin' is missing"):
        load_model(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_refuses_external_data_outside_the_model_folder(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    # The target exists and is readable: refusing it must not depend on a read failing.
    (tmp_path / "secret.bin").write_bytes(np.zeros(12, np.float32).tobytes())
    path = with_external_weight(folder, location)
    with pytest.raises(BadInput, match="outside the model's folder"):
        load_model(path)


def test_refuses_a_symlink_that_escapes_the_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.zeros(12, np.float32).tobytes())
    (folder / "weights.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(BadInput, match="outside the model's folder"):
        load_model(with_external_weight(folder, "weights.bin"))


def test_refuses_an_external_range_beyond_the_data_file(tmp_path):
    path = with_external_weight(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 20)  # 48 bytes are declared
    with pytest.raises(BadInput, match="beyond the end"):
        load_model(path)


def test_refuses_a_weight_shorter_than_its_dims(tmp_path):
    model = tiny_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadInput, match="invalid ONNX model .*raw_data size"):
        load_model(path)


def test_external_data_can_stay_on_disk(tmp_path, monkeypatch):
    path = with_external_weight(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    monkeypatch.chdir(tmp_path.parent)  # the side file is found next to the model, not here
    model = load_model(path, load_external_data=False)
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL


@pytest.mark.filterwarnings("ignore:The onnxtxt format is experimental")
def test_loads_the_text_format_by_its_extension(tmp_path):
    path = tmp_path / "tiny.onnxtxt"
    onnx.save_model(tiny_model(), str(path))
    assert [n.op_type for n in load_model(path).graph.node] == ["MatMul"]


def test_refuses_opsets_older_than_11(tmp_path):
    model = tiny_model()
    model.opset_import[0].version = 9
    path = tmp_path / "old.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BadInput, match="opset 9"):
        load_model(path)


# ---------------------------------------------------------------------------------------- save


def test_save_stamps_version_and_pipeline(tmp_path):
    out = save_model(tiny_model(), tmp_path / "out.onnx", pipeline="cleanup")
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props == {"polaris-opt.version": __version__, "polaris-opt.pipeline": "cleanup"}


def test_save_replaces_an_earlier_stamp_and_keeps_other_metadata(tmp_path):
    model = tiny_model()
    helper.set_model_props(model, {"author": "me", "polaris-opt.pipeline": "old"})
    props = {p.key: p.value for p in onnx.load(save_model(model, tmp_path / "o.onnx")).metadata_props}
    assert props == {"author": "me", "polaris-opt.version": __version__}


def test_save_clamps_ir_version_to_what_onnxruntime_loads(tmp_path):
    model = tiny_model()
    model.ir_version = onnx.IR_VERSION + 5  # newer than anything released
    out = save_model(model, tmp_path / "out.onnx")
    saved = onnx.load(out)
    assert saved.ir_version == max_ir_version_for_ort()
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(
        run_model(saved, {"x": x})["y"], x @ np.arange(12, dtype=np.float32).reshape(3, 4)
    )


@pytest.mark.parametrize("external_data", [False, True])
def test_save_does_not_touch_the_callers_model(tmp_path, external_data):
    model = tiny_model()
    helper.set_model_props(model, {"author": "me", "polaris-opt.pipeline": "old"})
    before = model.SerializeToString()
    save_model(model, tmp_path / "out.onnx", pipeline="x", external_data=external_data)
    assert model.SerializeToString() == before
    assert onnx.load(tmp_path / "out.onnx").producer_name == "polaris-opt"


def test_save_leaves_the_callers_model_as_it_was_when_writing_fails(tmp_path, monkeypatch):
    model = tiny_model()
    before = model.SerializeToString()
    monkeypatch.setattr(graph_io, "_write_staged", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(BadInput):
        save_model(model, tmp_path / "out.onnx", pipeline="x")
    assert model.SerializeToString() == before


def test_save_with_external_data_round_trips(tmp_path):
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    out = save_model(tiny_model(weight), tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").stat().st_size == weight.nbytes
    assert out.stat().st_size < weight.nbytes  # the weight really left the .onnx file
    loaded = load_model(out)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)


def test_save_leaves_nothing_behind_when_writing_fails(tmp_path, monkeypatch):
    def fail_half_way(model, staged, data_name):
        staged.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graph_io, "_write_staged", fail_half_way)
    with pytest.raises(BadInput, match="No space left"):
        save_model(tiny_model(), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous result")
    monkeypatch.setattr(graph_io, "_write_staged", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(BadInput):
        save_model(tiny_model(), target)
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


@pytest.mark.parametrize("where", ["missing-folder", "parent-is-a-file", "is-a-folder"])
def test_save_refuses_unwritable_outputs(tmp_path, where):
    (tmp_path / "file").write_text("x")
    target = {
        "missing-folder": tmp_path / "no" / "such" / "out.onnx",
        "parent-is-a-file": tmp_path / "file" / "out.onnx",
        "is-a-folder": tmp_path,
    }[where]
    with pytest.raises(BadInput, match="cannot write|is a folder"):
        save_model(tiny_model(), target)


def test_save_refuses_to_overwrite_the_input_unless_forced(tmp_path):
    path = tmp_path / "m.onnx"
    original = tiny_model().SerializeToString()
    path.write_bytes(original)
    with pytest.raises(BadInput, match="overwrite the input"):
        save_model(tiny_model(), path, input_path=path)
    assert path.read_bytes() == original
    save_model(tiny_model(), path, input_path=path, force=True)
    assert onnx.load(path).producer_name == "polaris-opt"


def test_round_trip_keeps_a_weight_read_only_by_if_branches_once():
    weight = np.arange(4, dtype=np.float32)
    branch = lambda name, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["x", "w"], [f"{name}_y"])],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=branch("then", "Add"), else_branch=branch("else", "Mul")
            )
        ],
        "if_outer_weight",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = to_model(to_graph(model), model)
    names = [
        [t.name for t in g.initializer] for g in (out.graph, *(a.g for a in out.graph.node[0].attribute))
    ]
    assert names == [["w"], [], []]
    onnx.checker.check_model(out, full_check=True)
    x = np.ones(4, np.float32)
    for cond, expected in ((True, x + weight), (False, x * weight)):
        got = run_model(out, {"cond": np.array(cond), "x": x})["y"]
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("linear", [True, False])
def test_a_sparse_constant_survives_the_round_trip_as_a_dense_one(linear):
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "v")
    coords = np.array([1, 5], np.int64) if linear else np.array([[0, 1], [1, 2]], np.int64)
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(coords, "i"), [2, 3])
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], sparse_value=sparse),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "sparse_constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = to_model(to_graph(model), model)
    x = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})["y"], [[0, 1.5, 0], [0, 0, -2.0]])
