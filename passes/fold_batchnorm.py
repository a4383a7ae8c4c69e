"""fold-batchnorm: an inference-mode BatchNormalization after Conv/ConvTranspose/Gemm goes away.

In inference BatchNormalization is a per-channel affine map, BN(y) = y·s + t with
s = γ/√(σ²+ε) and t = β − μ·s. The producer is linear in its weights, so s scales the weights
of each output channel and t joins the bias: one node instead of two, same numbers. The math
is done in float64 and cast back to the weight's dtype. New weights get new names, so a
weight shared with another node is never changed under it.

A BatchNormalization folds only when nothing else can see the intermediate result: its input
has no other reader and is no graph output, and it is used in inference mode (one output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.surgery import (
    Names,
    constant_value,
    is_graph_output,
    is_local,
    is_standard_domain,
    iter_graphs,
    producer,
    remove_nodes,
)

FLOAT_TYPES = (np.float16, np.float32, np.float64)
ScaleShift = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Conv/ConvTranspose/Gemm → BatchNormalization  ⇒  the producer with scale and shift folded in."""

    name: ClassVar[str] = "fold-batchnorm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = Names(graph)
        folded = skipped = 0
        for g in iter_graphs(graph):
            batchnorms = [n for n in g.nodes if n.op == "BatchNormalization" and is_standard_domain(n)]
            done = [bn for bn in batchnorms if fold(bn, g, names)]
            folded += remove_nodes(g, done)
            skipped += len(batchnorms) - len(done)
        return PassResult(modified=folded > 0, stats={"folded": folded, "skipped": skipped})


def fold(bn: gs.Node, graph: gs.Graph, names: Names) -> bool:
    """Fold `bn` into the node before it; False (graph unchanged) when that is not sound."""
    node = foldable_producer(bn, graph)
    scale_shift = _scale_shift(bn)
    if node is None or scale_shift is None:
        return False
    fold_weights = FOLDERS[node.op]
    new_inputs = fold_weights(node, *scale_shift)
    if new_inputs is None:
        return False
    for index, value in new_inputs.items():
        _set_input(node, index, _fresh_constant(_base_name(node, index), value, names))
    # The producer now writes the BN's output tensor, so its name (maybe a graph output) stays.
    result = bn.outputs[0]
    bn.outputs.clear()
    node.outputs[0] = result
    return True


def foldable_producer(bn: gs.Node, graph: gs.Graph) -> gs.Node | None:
    """The Conv/ConvTranspose/Gemm feeding `bn`, if `bn` is its only reader in inference mode."""
    source = bn.inputs[0]
    node = producer(source)
    extra_outputs_used = any(
        not t.is_empty() and (t.outputs or is_graph_output(t, graph)) for t in bn.outputs[1:]
    )
    # A producer in an enclosing graph cannot take over an output of this sub-graph.
    if node is None or node.op not in FOLDERS or not is_standard_domain(node) or not is_local(source, graph):
        return None
    # Another reader, or a graph output, would see the producer's output change under it.
    if len(source.outputs) != 1 or is_graph_output(source, graph):
        return None
    if bn.attrs.get("training_mode", 0) or extra_outputs_used or len(node.outputs) != 1:
        return None
    return node


def _scale_shift(bn: gs.Node) -> ScaleShift | None:
    """(s, t) with BN(y) = y·s + t per channel, in float64; None when a parameter is not constant."""
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None or p.ndim != 1 for p in params):
        return None
    if len({p.size for p in params}) != 1:
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    return scale, beta - mean * scale


def _weights(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The constant weight and bias (None if absent) of `node`; None when either is computed."""
    weight = constant_value(node.inputs[1])
    has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
    bias = constant_value(node.inputs[2]) if has_bias else None
    if weight is None or weight.dtype not in FLOAT_TYPES or (has_bias and bias is None):
        return None
    return weight, bias


def _fold_conv(node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> dict[int, np.ndarray] | None:
    # Conv weight is [C_out, C_in/group, k...]: output channel o is W[o].
    found = _weights(node)
    if found is None or found[0].ndim < 3 or found[0].shape[0] != scale.size:
        return None
    weight, bias = found
    per_channel = scale.reshape(-1, *[1] * (weight.ndim - 1))
    return _folded(weight, weight * per_channel, bias, scale, shift)


def _fold_conv_transpose(node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> dict[int, np.ndarray] | None:
    # ConvTranspose weight is [C_in, C_out/group, k...]; group g owns input rows
    # g·C_in/group… and output channels g·C_out/group…, so output channel g·C_out/group + j
    # is W[group g's rows, j]: view W as [group, C_in/group, C_out/group, k...] to scale it.
    found = _weights(node)
    group = node.attrs.get("group", 1)
    if found is None or found[0].ndim < 3 or found[0].shape[0] % group:
        return None
    weight, bias = found
    c_in, per_group, *kernel = weight.shape
    if per_group * group != scale.size:
        return None
    grouped = weight.reshape(group, c_in // group, per_group, *kernel)
    per_channel = scale.reshape(group, 1, per_group, *[1] * len(kernel))
    return _folded(weight, (grouped * per_channel).reshape(weight.shape), bias, scale, shift)


def _fold_gemm(node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> dict[int, np.ndarray] | None:
    # Y = α·A·B + β·C, BN over Y's columns: scale B's columns and fold everything else into a
    # new C, so that β becomes 1:  Y·s + t = α·A·(B·s) + (β·C·s + t).
    found = _weights(node)
    trans_b = node.attrs.get("transB", 0)
    if found is None or found[0].ndim != 2 or found[0].shape[0 if trans_b else 1] != scale.size:
        return None
    weight, bias = found
    if bias is not None and (bias.ndim > 2 or bias.shape[-1:] not in ((), (1,), (scale.size,))):
        return None
    column_scale = scale[:, None] if trans_b else scale[None, :]
    beta = node.attrs.get("beta", 1.0)
    new_bias = (beta * bias.astype(np.float64) * scale if bias is not None else 0.0) + shift
    node.attrs["beta"] = 1.0
    return {1: (weight * column_scale).astype(weight.dtype), 2: new_bias.astype(weight.dtype)}


def _folded(weight, new_weight, bias, scale, shift) -> dict[int, np.ndarray]:
    """Conv-style results: W' as computed, B' = B·s + t (B = 0 when absent), in W's dtype."""
    new_bias = (bias.astype(np.float64) if bias is not None else 0.0) * scale + shift
    return {1: new_weight.astype(weight.dtype), 2: new_bias.astype(weight.dtype)}


FOLDERS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm}


def _set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    # Optional inputs may be missing from the end of the list; a bias goes in slot 2.
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)


def _base_name(node: gs.Node, index: int) -> str:
    if index < len(node.inputs) and not node.inputs[index].is_empty():
        return node.inputs[index].name
    return f"{node.inputs[1].name}.bias"  # a bias the node did not have


def _fresh_constant(base: str, value: np.ndarray, names: Names) -> gs.Constant:
    """A new initializer named after `base`, with a name no tensor of the model has."""
    return gs.Constant(names.fresh(f"{base}.bn_folded"), value)
