"""Layer emitters shared by the zoo builders: each adds the nodes one PyTorch module exports
to, with parameters named after the module (`<scope>.weight`, `<scope>.running_mean`, ...)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import GraphBuilder


@dataclass(frozen=True)
class BatchNorm:
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float = 1e-5


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """He (Kaiming) init keeps the activation scale roughly constant through ReLU layers."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def random_conv(rng: np.random.Generator, c_out: int, c_in: int, k: int, group: int = 1):
    return he_normal(rng, (c_out, c_in // group, k, k), fan_in=c_in // group * k * k)


def random_batch_norm(rng: np.random.Generator, channels: int, gain: float = 1.0) -> BatchNorm:
    """Non-trivial statistics, so a BN fold that ignores one of them shows up numerically.
    `gain` scales gamma: residual branches use < 1 so the residual stream does not blow up
    (the statistics are random, so BN does not actually renormalize anything)."""
    return BatchNorm(
        scale=(gain * rng.uniform(0.8, 1.2, channels)).astype(np.float32),
        bias=(rng.standard_normal(channels) * 0.1).astype(np.float32),
        mean=(rng.standard_normal(channels) * 0.1).astype(np.float32),
        var=rng.uniform(0.5, 1.5, channels).astype(np.float32),
    )


def conv(
    b: GraphBuilder,
    x: str,
    scope: str,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    stride: int = 1,
    group: int = 1,
) -> str:
    """nn.Conv2d with 'same' padding for odd kernels."""
    k = weight.shape[-1]
    inputs = [x, b.param(scope, "weight", weight)]
    if bias is not None:
        inputs.append(b.param(scope, "bias", bias))
    return b.op(
        "Conv",
        inputs,
        scope,
        dilations=[1, 1],
        group=group,
        kernel_shape=[k, k],
        pads=[k // 2] * 4,
        strides=[stride, stride],
    )


def batch_norm(b: GraphBuilder, x: str, scope: str, bn: BatchNorm) -> str:
    """nn.BatchNorm2d in eval mode (torch exports momentum 1 - 0.1 = 0.9)."""
    inputs = [
        x,
        b.param(scope, "weight", bn.scale),
        b.param(scope, "bias", bn.bias),
        b.param(scope, "running_mean", bn.mean),
        b.param(scope, "running_var", bn.var),
    ]
    return b.op("BatchNormalization", inputs, scope, epsilon=bn.eps, momentum=0.9)


def linear(b: GraphBuilder, x: str, scope: str, weight: np.ndarray, bias: np.ndarray, out: str = "") -> str:
    """nn.Linear on a 2-D input exports as Gemm with the weight kept [out, in] (transB=1)."""
    inputs = [x, b.param(scope, "weight", weight), b.param(scope, "bias", bias)]
    outputs = [out] if out else None
    return b.op("Gemm", inputs, scope, outputs=outputs, alpha=1.0, beta=1.0, transB=1)


def relu(b: GraphBuilder, x: str, scope: str = "") -> str:
    return b.op("Relu", [x], scope)


def relu6(b: GraphBuilder, x: str, scope: str = "") -> str:
    """nn.ReLU6 exports as Clip with its bounds as Constant inputs (opset >= 11)."""
    low = b.const(np.float32(0.0), scope)
    high = b.const(np.float32(6.0), scope)
    return b.op("Clip", [x, low, high], scope)


def conv_bn(
    b: GraphBuilder,
    rng: np.random.Generator,
    x: str,
    scope: str,
    c_in: int,
    c_out: int,
    k: int,
    *,
    stride: int = 1,
    group: int = 1,
    conv_name: str = "conv",
    bn_name: str = "bn",
    bn_gain: float = 1.0,
) -> str:
    """Random-init Conv (no bias, as before a BN) followed by its BatchNormalization."""
    y = conv(
        b, x, f"{scope}/{conv_name}", random_conv(rng, c_out, c_in, k, group), stride=stride, group=group
    )
    return batch_norm(b, y, f"{scope}/{bn_name}", random_batch_norm(rng, c_out, bn_gain))


def classifier_head(
    b: GraphBuilder, rng: np.random.Generator, x: str, scope: str, c_in: int, classes: int
) -> str:
    """GlobalAveragePool -> Flatten -> Linear, the usual vision-model tail."""
    pooled = b.op("GlobalAveragePool", [x], "/avgpool")
    flat = b.op("Flatten", [pooled], "", axis=1)
    weight = (rng.standard_normal((classes, c_in)) / np.sqrt(c_in)).astype(np.float32)
    bias = (rng.standard_normal(classes) * 0.01).astype(np.float32)
    return linear(b, flat, scope, weight, bias, out="logits")
