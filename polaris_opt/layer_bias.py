"""Where a linear layer's bias lives and how to change it: shared by the corrections that re-fit it.

Two passes shift biases from calibration data: `correct-bias` (the mean error of int8 weights) and
`prune --correct` (the mean and scale lost to pruning). Both need the same facts about the graph:

- Conv and ConvTranspose hold their bias in input 2 (optional: a zero bias is created when absent).
- Gemm computes α·A·B + β·C: its bias is β·C, and a new C is written with β folded in and β set to 1
  (so a correction never has to divide by β, which may be 0).
- MatMul has no bias input; its bias is the Add of a constant that is the MatMul output's only
  reader. Another reader, or a graph output, would see the uncorrected value, so such a MatMul has
  no bias Add in this sense.
- A corrected bias is always a new constant: the old one may be shared with another node.

Layer outputs are read as [rows, channels] float64 views (`channels_last`) so that per-channel
statistics are plain column reductions whatever the layout (NCHW, [tokens, features]).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from polaris_opt.surgery import Names, constant_value, consumers, is_graph_output


def bias_add(matmul: gs.Node, graph: gs.Graph) -> gs.Node | None:
    """The Add that holds `matmul`'s bias: its only reader, adding a float32 constant whose last
    dimension is 1 or the MatMul's output features. None when there is no such Add."""
    out = matmul.outputs[0]
    readers = consumers(out)
    if len(readers) != 1 or is_graph_output(out, graph) or readers[0].op != "Add":
        return None
    add = readers[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = constant_value(other)
    channels = matmul.inputs[1].shape[1]
    if bias is None or bias.dtype != np.float32 or bias.shape[-1:] not in ((), (1,), (channels,)):
        return None
    return add


def channels_last(values: np.ndarray, axis: int) -> np.ndarray:
    """[rows, channels] float64 view of a layer output whose channels run along `axis`; a 1-D
    output is one row."""
    values = np.moveaxis(values, axis, -1) if values.ndim > 1 else values[None, :]
    return values.reshape(-1, values.shape[-1]).astype(np.float64)


def conv_bias(node: gs.Node, shift: np.ndarray) -> np.ndarray:
    """The Conv/ConvTranspose bias minus `shift` (per output channel), float32; a missing bias
    counts as zeros."""
    has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
    bias = constant_value(node.inputs[2]) if has_bias else np.zeros(shift.shape, np.float32)
    return (bias.astype(np.float64) - shift).astype(np.float32)


def gemm_bias(node: gs.Node, shift: np.ndarray) -> np.ndarray:
    """The Gemm's effective bias β·C minus `shift`, float32; sets the node's β to 1 so that the
    returned value is the new C. A missing C counts as zeros."""
    has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
    beta = node.attrs.get("beta", 1.0)
    scaled = beta * constant_value(node.inputs[2]).astype(np.float64) if has_bias else 0.0
    node.attrs["beta"] = 1.0
    return (scaled - shift).astype(np.float32)


def set_bias(node: gs.Node, index: int, value: np.ndarray, names: Names) -> None:
    """Put a new constant `value` in input `index` of `node` (appended when the input is absent):
    a bias shared with another node must not change under it."""
    if index < len(node.inputs) and not node.inputs[index].is_empty():
        base = node.inputs[index].name
    else:
        base = f"{node.inputs[1].name}.bias"
    tensor = gs.Constant(names.fresh(f"{base}.bias_corrected"), value)
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)
