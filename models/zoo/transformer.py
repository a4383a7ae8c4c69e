"""A two-layer pre-LN transformer encoder, spelled the way torch.onnx exports one written by
hand: MatMul+Add projections, Reshape/Transpose head splits with 0/-1 shapes (batch stays
dynamic), scores divided by sqrt(head_dim), and GELU as its Erf formula. Random init."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphBuilder

SEQ, D_MODEL, HEADS, D_FF, LAYERS = 16, 64, 4, 128, 2
HEAD_DIM = D_MODEL // HEADS


def dense(b: GraphBuilder, rng, x: str, scope: str, d_in: int, d_out: int) -> str:
    """A Linear on a 3-D input: MatMul with the weight stored [in, out], then Add of the bias.
    Weights ~ N(0, 1/d_in) keep each projection's output at about the input's scale."""
    weight = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    bias = (rng.standard_normal(d_out) * 0.02).astype(np.float32)
    y = b.op("MatMul", [x, b.param(scope, "weight", weight)], scope)
    return b.op("Add", [y, b.param(scope, "bias", bias)], scope)


def layer_norm(b: GraphBuilder, rng, x: str, scope: str, out: str = "") -> str:
    scale = rng.uniform(0.8, 1.2, D_MODEL).astype(np.float32)
    bias = (rng.standard_normal(D_MODEL) * 0.05).astype(np.float32)
    inputs = [x, b.param(scope, "weight", scale), b.param(scope, "bias", bias)]
    return b.op("LayerNormalization", inputs, scope, outputs=[out] if out else None, axis=-1, epsilon=1e-5)


def split_heads(b: GraphBuilder, x: str, scope: str, perm: list[int]) -> str:
    """[batch, seq, d_model] -> [batch, seq, heads, head_dim] -> permuted (0 copies a dim)."""
    shape = b.const(np.array([0, 0, HEADS, HEAD_DIM], dtype=np.int64), scope)
    return b.op("Transpose", [b.op("Reshape", [x, shape], scope)], scope, perm=perm)


def self_attention(b: GraphBuilder, rng, x: str, scope: str) -> str:
    q = dense(b, rng, x, f"{scope}/q_proj", D_MODEL, D_MODEL)
    k = dense(b, rng, x, f"{scope}/k_proj", D_MODEL, D_MODEL)
    v = dense(b, rng, x, f"{scope}/v_proj", D_MODEL, D_MODEL)
    q = split_heads(b, q, scope, perm=[0, 2, 1, 3])
    k_t = split_heads(b, k, scope, perm=[0, 2, 3, 1])  # K already transposed for Q @ K^T
    v = split_heads(b, v, scope, perm=[0, 2, 1, 3])
    scores = b.op("MatMul", [q, k_t], scope)
    scores = b.op("Div", [scores, b.const(np.float32(np.sqrt(HEAD_DIM)), scope)], scope)
    probs = b.op("Softmax", [scores], scope, axis=-1)
    context = b.op("Transpose", [b.op("MatMul", [probs, v], scope)], scope, perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [context, b.const(np.array([0, 0, D_MODEL], np.int64), scope)], scope)
    return dense(b, rng, merged, f"{scope}/out_proj", D_MODEL, D_MODEL)


def gelu(b: GraphBuilder, x: str, scope: str) -> str:
    """x * 0.5 * (1 + erf(x / sqrt 2)): the node chain torch.onnx emits for exact GELU."""
    y = b.op("Erf", [b.op("Div", [x, b.const(np.float32(np.sqrt(2.0)), scope)], scope)], scope)
    y = b.op("Add", [y, b.const(np.float32(1.0), scope)], scope)
    y = b.op("Mul", [x, y], scope)
    return b.op("Mul", [y, b.const(np.float32(0.5), scope)], scope)


def encoder_layer(b: GraphBuilder, rng, x: str, scope: str) -> str:
    attn = self_attention(b, rng, layer_norm(b, rng, x, f"{scope}/norm1"), f"{scope}/self_attn")
    x = b.op("Add", [x, attn], scope)
    h = dense(b, rng, layer_norm(b, rng, x, f"{scope}/norm2"), f"{scope}/linear1", D_MODEL, D_FF)
    h = dense(b, rng, gelu(b, h, f"{scope}/activation"), f"{scope}/linear2", D_FF, D_MODEL)
    return b.op("Add", [x, h], scope)


def build_transformer(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    b = GraphBuilder()
    x = b.input("tokens", ["batch", SEQ, D_MODEL])
    for layer in range(LAYERS):
        x = encoder_layer(b, rng, x, f"/layers/{layer}")
    # Pre-LN encoders end with a final norm; it also gives the output a public name.
    y = layer_norm(b, rng, x, "/norm", out="hidden")
    b.output(y, ["batch", SEQ, D_MODEL])
    doc = f"Pre-LN transformer encoder: {LAYERS} layers, d_model {D_MODEL}, {HEADS} heads."
    feeds = {"tokens": rng.standard_normal((2, SEQ, D_MODEL)).astype(np.float32)}
    return b.model("transformer_s", doc), feeds
