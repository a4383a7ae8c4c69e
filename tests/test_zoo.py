"""The committed model zoo matches models/zoo.json, runs, and rebuilds byte-identically."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from polaris_opt.numerics import run_model

MODELS = Path(__file__).resolve().parents[1] / "models"
INDEX = json.loads((MODELS / "zoo.json").read_text())
ENTRIES = INDEX["models"]
DIGITS = [name for name, entry in ENTRIES.items() if "accuracy" in entry]
SIZE_LIMIT = 20 * 1024 * 1024
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def load_build_zoo():
    """models/ is not a package: load the builder script the way `make models` runs it."""
    spec = importlib.util.spec_from_file_location("build_zoo", MODELS / "build_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared_dims(values) -> list[dict]:
    def dim(d):
        return d.dim_param if d.HasField("dim_param") else d.dim_value

    return [{"name": v.name, "shape": [dim(d) for d in v.type.tensor_type.shape.dim]} for v in values]


def test_zoo_lists_the_expected_models():
    assert set(ENTRIES) == {"digits_mlp", "digits_cnn", "mobilenetv2_s", "resnet_s", "transformer_s"}
    assert set(DIGITS) == {"digits_mlp", "digits_cnn"}


@pytest.mark.parametrize("name", ENTRIES)
def test_model_file_matches_index(name):
    entry = ENTRIES[name]
    path = MODELS / entry["file"]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    assert entry["size_bytes"] == path.stat().st_size
    for declared, actual in ((entry["inputs"], model.graph.input), (entry["outputs"], model.graph.output)):
        assert [{"name": d["name"], "shape": d["shape"]} for d in declared] == declared_dims(actual)
        assert all(d["shape"][0] == "batch" and d["dtype"] == "float32" for d in declared)
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)
    assert entry["parameters"] == parameters


@pytest.mark.parametrize("name", ENTRIES)
def test_model_runs_on_its_sample_input(name):
    entry = ENTRIES[name]
    feeds = dict(np.load(MODELS / entry["sample_input"]))
    assert sorted(feeds) == sorted(i["name"] for i in entry["inputs"])
    batch = next(iter(feeds.values())).shape[0]
    outputs = run_model(str(MODELS / entry["file"]), feeds)
    assert list(outputs) == [o["name"] for o in entry["outputs"]]
    for value, declared in zip(outputs.values(), entry["outputs"], strict=True):
        expected = [batch if d == "batch" else d for d in declared["shape"]]
        assert list(value.shape) == expected
        assert value.dtype == np.float32 and np.isfinite(value).all()


def test_digits_test_split():
    data = np.load(MODELS / INDEX["test_data"])
    x_mlp, x_cnn, y = data["x_mlp"], data["x_cnn"], data["y"]
    assert x_mlp.dtype == x_cnn.dtype == np.float32 and y.dtype == np.int64
    assert x_mlp.shape == (len(y), 64) and x_cnn.shape == (len(y), 1, 8, 8)
    np.testing.assert_array_equal(x_cnn.reshape(len(y), 64), x_mlp)
    assert 0.0 <= x_mlp.min() and x_mlp.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize("name", DIGITS)
def test_digits_accuracy_matches_index(name):
    entry = ENTRIES[name]
    data = np.load(MODELS / entry["accuracy"]["data"])
    x = data["x_mlp"] if entry["inputs"][0]["shape"] == ["batch", 64] else data["x_cnn"]
    (logits,) = run_model(str(MODELS / entry["file"]), {entry["inputs"][0]["name"]: x}).values()
    correct = int((logits.argmax(axis=1) == data["y"]).sum())
    assert correct == entry["accuracy"]["correct"]
    assert len(data["y"]) == entry["accuracy"]["total"]
    assert correct / len(data["y"]) == entry["accuracy"]["fp32"]
    assert entry["accuracy"]["fp32"] >= 0.95


def test_committed_zoo_is_small():
    # models/large/ holds the ignored >= 100 MB model built by `--large`.
    files = [
        p
        for p in MODELS.rglob("*")
        if p.is_file() and not {"large", "__pycache__"} & set(p.relative_to(MODELS).parts)
    ]
    assert sum(p.stat().st_size for p in files) <= SIZE_LIMIT


def test_rebuild_is_byte_identical(tmp_path):
    build_zoo = load_build_zoo()
    path = build_zoo.write_model("resnet_s", tmp_path, seed=INDEX["seed"])
    assert path.read_bytes() == (MODELS / ENTRIES["resnet_s"]["file"]).read_bytes()
    sample = build_zoo.sample_input_path(path)
    assert sample.read_bytes() == (MODELS / ENTRIES["resnet_s"]["sample_input"]).read_bytes()
