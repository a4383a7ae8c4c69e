"""A two-layer pre-LN transformer encoder, spelled the way torch.onnx exports one written by
hand: MatMul+Add projections, Reshape/Transpose head splits with 0/-1 shapes (batch stays
dynamic), scores divided by sqrt(head_dim), and GELU as its Erf formula. Random init.

`build_transformer` is the committed zoo model (transformer_s); `build_encoder` builds the same
graph at any size (the end-to-end sparse benchmark uses d_model 1024 / FFN 4096). Both draw
from `rng` in the same order, so the zoo model's bytes do not depend on which one built it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphBuilder

SEQ, D_MODEL, HEADS, D_FF, LAYERS = 16, 64, 4, 128, 2
HEAD_DIM = D_MODEL // HEADS


@dataclass(frozen=True)
class EncoderSize:
    """The dimensions of one encoder; the defaults are the zoo's transformer_s."""

    seq: int = SEQ
    d_model: int = D_MODEL
    heads: int = HEADS
    d_ff: int = D_FF
    layers: int = LAYERS

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


ZOO_SIZE = EncoderSize()


def dense(b: GraphBuilder, rng, x: str, scope: str, d_in: int, d_out: int) -> str:
    """A Linear on a 3-D input: MatMul with the weight stored [in, out], then Add of the bias.
    Weights ~ N(0, 1/d_in) keep each projection's output at about the input's scale."""
    weight = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    bias = (rng.standard_normal(d_out) * 0.02).astype(np.float32)
    y = b.op("MatMul", [x, b.param(scope, "weight", weight)], scope)
    return b.op("Add", [y, b.param(scope, "bias", bias)], scope)


def layer_norm(b: GraphBuilder, rng, x: str, scope: str, size: EncoderSize, out: str = "") -> str:
    scale = rng.uniform(0.8, 1.2, size.d_model).astype(np.float32)
    bias = (rng.standard_normal(size.d_model) * 0.05).astype(np.float32)
    inputs = [x, b.param(scope, "weight", scale), b.param(scope, "bias", bias)]
    return b.op("LayerNormalization", inputs, scope, outputs=[out] if out else None, axis=-1, epsilon=1e-5)


def split_heads(b: GraphBuilder, x: str, scope: str, perm: list[int], size: EncoderSize) -> str:
    """[batch, seq, d_model] -> [batch, seq, heads, head_dim] -> permuted (0 copies a dim)."""
    shape = b.const(np.array([0, 0, size.heads, size.head_dim], dtype=np.int64), scope)
    return b.op("Transpose", [b.op("Reshape", [x, shape], scope)], scope, perm=perm)


def self_attention(b: GraphBuilder, rng, x: str, scope: str, size: EncoderSize) -> str:
    d = size.d_model
    q = dense(b, rng, x, f"{scope}/q_proj", d, d)
    k = dense(b, rng, x, f"{scope}/k_proj", d, d)
    v = dense(b, rng, x, f"{scope}/v_proj", d, d)
    q = split_heads(b, q, scope, [0, 2, 1, 3], size)
    k_t = split_heads(b, k, scope, [0, 2, 3, 1], size)  # K already transposed for Q @ K^T
    v = split_heads(b, v, scope, [0, 2, 1, 3], size)
    scores = b.op("MatMul", [q, k_t], scope)
    scores = b.op("Div", [scores, b.const(np.float32(np.sqrt(size.head_dim)), scope)], scope)
    probs = b.op("Softmax", [scores], scope, axis=-1)
    context = b.op("Transpose", [b.op("MatMul", [probs, v], scope)], scope, perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [context, b.const(np.array([0, 0, d], np.int64), scope)], scope)
    return dense(b, rng, merged, f"{scope}/out_proj", d, d)


def gelu(b: GraphBuilder, x: str, scope: str) -> str:
    """x * 0.5 * (1 + erf(x / sqrt 2)): the node chain torch.onnx emits for exact GELU."""
    y = b.op("Erf", [b.op("Div", [x, b.const(np.float32(np.sqrt(2.0)), scope)], scope)], scope)
    y = b.op("Add", [y, b.const(np.float32(1.0), scope)], scope)
    y = b.op("Mul", [x, y], scope)
    return b.op("Mul", [y, b.const(np.float32(0.5), scope)], scope)


def encoder_layer(b: GraphBuilder, rng, x: str, scope: str, size: EncoderSize) -> str:
    normed = layer_norm(b, rng, x, f"{scope}/norm1", size)
    x = b.op("Add", [x, self_attention(b, rng, normed, f"{scope}/self_attn", size)], scope)
    normed = layer_norm(b, rng, x, f"{scope}/norm2", size)
    h = dense(b, rng, normed, f"{scope}/linear1", size.d_model, size.d_ff)
    h = dense(b, rng, gelu(b, h, f"{scope}/activation"), f"{scope}/linear2", size.d_ff, size.d_model)
    return b.op("Add", [x, h], scope)


def build_encoder(
    rng: np.random.Generator, size: EncoderSize = ZOO_SIZE, name: str = "transformer_s"
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The encoder at `size`, and a sample input of 2 rows [2, seq, d_model]."""
    b = GraphBuilder()
    x = b.input("tokens", ["batch", size.seq, size.d_model])
    for layer in range(size.layers):
        x = encoder_layer(b, rng, x, f"/layers/{layer}", size)
    # Pre-LN encoders end with a final norm; it also gives the output a public name.
    y = layer_norm(b, rng, x, "/norm", size, out="hidden")
    b.output(y, ["batch", size.seq, size.d_model])
    doc = f"Pre-LN transformer encoder: {size.layers} layers, d_model {size.d_model}, {size.heads} heads."
    feeds = {"tokens": rng.standard_normal((2, size.seq, size.d_model)).astype(np.float32)}
    return b.model(name, doc), feeds


def build_transformer(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The zoo's transformer_s."""
    return build_encoder(rng, ZOO_SIZE, "transformer_s")
