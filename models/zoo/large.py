"""A deliberately large model (not committed): about 134 MB of float32 weights in two wide
Gemm layers, for checking that loading, passes and saving cope with big tensors. It stays
under protobuf's 2 GB limit so plain `onnx.save` writes it as one file."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphBuilder
from .layers import linear, relu

WIDTH, HIDDEN_LAYERS, CLASSES = 4096, 2, 10


def random_linear(rng: np.random.Generator, d_in: int, d_out: int):
    # Generated in float32 directly: 16.7 M values per layer, float64 would double the memory.
    weight = rng.standard_normal((d_out, d_in), dtype=np.float32)
    weight *= np.float32(np.sqrt(2.0 / d_in))
    bias = rng.standard_normal(d_out, dtype=np.float32) * np.float32(0.01)
    return weight, bias


def build_large(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    b = GraphBuilder()
    y = b.input("input", ["batch", WIDTH])
    for i in range(HIDDEN_LAYERS):
        scope = f"/layers/{i}"
        y = linear(b, y, scope, *random_linear(rng, WIDTH, WIDTH))
        # A Constant-node shift and an Identity, as exporters leave behind, for clean-up passes.
        shift = b.const((rng.standard_normal(WIDTH) * 0.01).astype(np.float32), scope)
        y = b.op("Identity", [b.op("Add", [y, shift], scope)], scope)
        y = relu(b, y, scope)
    y = linear(b, y, "/head", *random_linear(rng, WIDTH, CLASSES), out="logits")
    b.output(y, ["batch", CLASSES])
    doc = f"Wide MLP: {HIDDEN_LAYERS} x Gemm {WIDTH}x{WIDTH} + head, random init (~134 MB)."
    feeds = {"input": rng.standard_normal((2, WIDTH), dtype=np.float32)}
    return b.model("mlp_large", doc), feeds
