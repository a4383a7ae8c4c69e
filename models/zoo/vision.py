"""Random-init CNNs shaped like torchvision's ResNet and MobileNetV2, for 32x32 inputs.

Not trained: they exist to exercise the passes on real architectures (BN folding, residual
Adds, depthwise convs, Clip-as-ReLU6), so only the structure and sane activations matter.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphBuilder
from .layers import classifier_head, conv_bn, relu, relu6

INPUT_DIMS = ["batch", 3, 32, 32]
CLASSES = 10

RESNET_STAGES = ((16, 1), (32, 2), (64, 2))  # (channels, stride of the first block)
RESNET_BLOCKS = 2
# gamma gain of the BN that closes a residual branch; < 1 keeps the residual stream's scale
# from doubling at every block of a random-init network ("small init of the last BN").
RESIDUAL_GAIN = 0.3

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
MOBILENET_SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2))
MOBILENET_STEM = 16
MOBILENET_LAST = 128


def sample_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"input": rng.standard_normal((2, *INPUT_DIMS[1:])).astype(np.float32)}


# --- ResNet ---------------------------------------------------------------------------------


def basic_block(b: GraphBuilder, rng, x: str, scope: str, c_in: int, c_out: int, stride: int):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity (or a 1x1 conv-BN when the shape
    changes), then ReLU."""
    y = conv_bn(b, rng, x, scope, c_in, c_out, 3, stride=stride, conv_name="conv1", bn_name="bn1")
    y = relu(b, y, f"{scope}/relu")
    y = conv_bn(b, rng, y, scope, c_out, c_out, 3, conv_name="conv2", bn_name="bn2", bn_gain=RESIDUAL_GAIN)
    shortcut = x
    if stride != 1 or c_in != c_out:
        shortcut = conv_bn(
            b,
            rng,
            x,
            f"{scope}/downsample",
            c_in,
            c_out,
            1,
            stride=stride,
            conv_name="0",
            bn_name="1",
            bn_gain=RESIDUAL_GAIN,
        )
    return relu(b, b.op("Add", [y, shortcut], scope), f"{scope}/relu")


def build_resnet(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    b = GraphBuilder()
    x = b.input("input", INPUT_DIMS)
    c_in = RESNET_STAGES[0][0]
    y = conv_bn(b, rng, x, "", 3, c_in, 3, conv_name="conv1", bn_name="bn1")
    y = relu(b, y, "/relu")
    for stage, (c_out, stride) in enumerate(RESNET_STAGES, start=1):
        for block in range(RESNET_BLOCKS):
            y = basic_block(b, rng, y, f"/layer{stage}/{block}", c_in, c_out, stride if block == 0 else 1)
            c_in = c_out
    y = classifier_head(b, rng, y, "/fc", c_in, CLASSES)
    b.output(y, ["batch", CLASSES])
    doc = "ResNet-style (basic blocks, 3 stages 16/32/64), random init, 32x32 input."
    return b.model("resnet_s", doc), sample_feeds(rng)


# --- MobileNetV2 ----------------------------------------------------------------------------


def conv_bn_relu6(
    b: GraphBuilder, rng, x: str, scope: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1
) -> str:
    """torchvision's Conv2dNormActivation: children 0 (conv), 1 (bn), 2 (ReLU6)."""
    y = conv_bn(b, rng, x, scope, c_in, c_out, k, stride=stride, group=group, conv_name="0", bn_name="1")
    return relu6(b, y, f"{scope}/2")


def inverted_residual(
    b: GraphBuilder, rng, x: str, scope: str, c_in: int, c_out: int, stride: int, expand: int
) -> str:
    """1x1 expand (skipped when t=1) -> depthwise 3x3 -> linear 1x1 project (+ residual)."""
    hidden, y, index = c_in * expand, x, 0
    if expand != 1:
        y = conv_bn_relu6(b, rng, y, f"{scope}/conv/{index}", c_in, hidden, 1)
        index += 1
    y = conv_bn_relu6(b, rng, y, f"{scope}/conv/{index}", hidden, hidden, 3, stride, hidden)
    # The projection has no activation: a ReLU here would destroy information (the paper's
    # "linear bottleneck").
    y = conv_bn(
        b, rng, y, f"{scope}/conv", hidden, c_out, 1, conv_name=str(index + 1), bn_name=str(index + 2)
    )
    if stride == 1 and c_in == c_out:
        y = b.op("Add", [x, y], scope)
    return y


def build_mobilenetv2(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    b = GraphBuilder()
    x = b.input("input", INPUT_DIMS)
    y = conv_bn_relu6(b, rng, x, "/features/0", 3, MOBILENET_STEM, 3)
    c_in, index = MOBILENET_STEM, 1
    for expand, c_out, repeats, stride in MOBILENET_SETTINGS:
        for r in range(repeats):
            y = inverted_residual(
                b, rng, y, f"/features/{index}", c_in, c_out, stride if r == 0 else 1, expand
            )
            c_in, index = c_out, index + 1
    y = conv_bn_relu6(b, rng, y, f"/features/{index}", c_in, MOBILENET_LAST, 1)
    y = classifier_head(b, rng, y, "/classifier/1", MOBILENET_LAST, CLASSES)
    b.output(y, ["batch", CLASSES])
    doc = "MobileNetV2-style (7 inverted-residual blocks, ReLU6 as Clip), random init, 32x32."
    return b.model("mobilenetv2_s", doc), sample_feeds(rng)
