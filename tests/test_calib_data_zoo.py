"""The zoo's committed calibration sets open, match what the zoo builder makes, and are digits the
trained models recognise."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from test_calib_data import MODELS

from polaris_opt.calib_data import open_calibration
from polaris_opt.numerics import make_session

# --- the zoo's calibration sets ------------------------------------------------------------


def load_build_zoo():
    spec = importlib.util.spec_from_file_location("build_zoo", MODELS / "build_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "samples"),
    [
        ("digits_mlp", 256),
        ("digits_cnn", 256),
        ("resnet_s", 64),
        ("mobilenetv2_s", 64),
        ("transformer_s", 64),
    ],
)
def test_zoo_calibration_sets_open_and_match_the_builder(name, samples):
    if name.startswith("digits"):
        pytest.importorskip("sklearn")  # the builder reads the digits training split
    zoo_model = onnx.load(MODELS / f"{name}.onnx")
    source = open_calibration(MODELS / f"{name}.calib.npz", zoo_model, batch_size=16)
    assert (source.num_samples, source.num_batches) == (samples, samples // 16)
    assert source.trustworthy and source.warnings == []
    expected = load_build_zoo().calibration_arrays(name, zoo_model)
    (input_name,) = expected
    streamed = np.concatenate([batch[input_name] for batch in source.batches()])
    np.testing.assert_array_equal(streamed, expected[input_name])
    sample = np.load(MODELS / f"{name}.input.npz")[input_name]
    assert not any(np.array_equal(row, sample[0]) for row in streamed)  # not the sample input again


def test_digits_calibration_sets_are_training_digits_the_models_know():
    pytest.importorskip("sklearn")
    labels = load_build_zoo().digits.load_split().y_train[:256]
    for name in ("digits_mlp", "digits_cnn"):
        zoo_model = onnx.load(MODELS / f"{name}.onnx")
        session = make_session(zoo_model)
        source = open_calibration(MODELS / f"{name}.calib.npz", zoo_model, batch_size=64)
        logits = np.concatenate([session.run(None, batch)[0] for batch in source.batches()])
        accuracy = float((logits.argmax(axis=1) == labels).mean())
        assert accuracy > 0.95, f"{name}: {accuracy:.3f}"
