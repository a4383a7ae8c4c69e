"""The two trained zoo models, an MLP and a small CNN on scikit-learn's 8x8 digits.

They give the quantization and pruning passes a real accuracy to lose. Training runs in
NumPy (see train_numpy.py) on a fixed stratified split; the held-out quarter is committed
as digits_test.npz so accuracy can be measured without scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx

from . import train_numpy as tn
from .graph import GraphBuilder
from .layers import BatchNorm, batch_norm, conv, linear, relu

MLP_SIZES = [64, 64, 32, 10]
CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # [N, 64] float32 in [0, 1]
    y_train: np.ndarray  # [N] int64
    x_test: np.ndarray
    y_test: np.ndarray


@lru_cache(maxsize=1)
def load_split() -> DigitsSplit:
    # Imported here so the rest of the zoo (and the tests) work without scikit-learn.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return DigitsSplit(x_train, y_train, x_test, y_test)


def as_images(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1, 8, 8)


def test_arrays() -> dict[str, np.ndarray]:
    """The contents of digits_test.npz: the same rows in both input layouts, and labels."""
    split = load_split()
    return {"x_mlp": split.x_test, "x_cnn": as_images(split.x_test), "y": split.y_test}


def f32(params: tn.Params) -> tn.Params:
    return {k: v.astype(np.float32) for k, v in params.items()}


def build_mlp(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    split = load_split()
    x_train = split.x_train.astype(np.float64)
    params = tn.init_mlp(rng, MLP_SIZES)
    tn.train(params, tn.mlp_loss_and_grads, x_train, split.y_train, rng, epochs=60, batch_size=32, lr=3e-3)
    p = f32(params)

    b = GraphBuilder()
    y = b.input("input", ["batch", MLP_SIZES[0]])
    layers = len(MLP_SIZES) - 1
    for i in range(1, layers + 1):
        last = i == layers
        y = linear(b, y, f"/fc{i}", p[f"fc{i}.weight"], p[f"fc{i}.bias"], out="logits" if last else "")
        if not last:
            y = relu(b, y, "/relu")
    b.output(y, ["batch", CLASSES])
    doc = "MLP 64-64-32-10 trained on sklearn digits (inputs scaled x/16)."
    return b.model("digits_mlp", doc), {"input": split.x_test[:2]}


def build_cnn(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    split = load_split()
    x_train = as_images(split.x_train).astype(np.float64)
    params = tn.init_cnn(rng)
    tn.train(params, tn.cnn_loss_and_grads, x_train, split.y_train, rng, epochs=30, batch_size=32, lr=3e-3)
    stats = tn.bn_population_stats(params, x_train)
    p = f32(params)

    b = GraphBuilder()
    y = b.input("input", ["batch", 1, 8, 8])
    for i in (1, 2):
        y = conv(b, y, f"/conv{i}", p[f"conv{i}.weight"])
        mean, var = stats[i - 1]
        bn = BatchNorm(
            p[f"bn{i}.weight"],
            p[f"bn{i}.bias"],
            mean.astype(np.float32),
            var.astype(np.float32),
            eps=tn.BN_EPS,
        )
        y = relu(b, batch_norm(b, y, f"/bn{i}", bn), f"/relu{i}")
    y = b.op(
        "MaxPool",
        [y],
        "/pool",
        ceil_mode=0,
        dilations=[1, 1],
        kernel_shape=[2, 2],
        pads=[0, 0, 0, 0],
        strides=[2, 2],
    )
    y = b.op("Flatten", [y], "", axis=1)
    y = linear(b, y, "/fc", p["fc.weight"], p["fc.bias"], out="logits")
    b.output(y, ["batch", CLASSES])
    doc = "CNN conv(8)-BN-ReLU-conv(16)-BN-ReLU-maxpool-fc trained on sklearn digits (x/16)."
    return b.model("digits_cnn", doc), {"input": as_images(split.x_test[:2])}
