"""quantize-int4: MatMul/Gemm with a constant float weight become com.microsoft.MatMulNBits.

The weight is stored block-wise in INT4 (polaris_opt.int4): 4-bit codes packed two per byte,
one float32 scale per block and, when asymmetric, one 4-bit zero point per block. At block size
32, symmetric, that is 0.156x the FP32 bytes. ONNX Runtime's CPU provider runs MatMulNBits
as it ships, so the result needs no custom runtime.

- MatMul(A, W) with W [K, N] → MatMulNBits(A, B, scales[, zero_points]).
- Gemm(A, W, C) with transA = 0 → MatMulNBits with bias = β·C: ONNX Runtime's MatMulNBits takes
  a bias input of shape [N]; α folds into W, transB = 1 transposes W first. A C that is not one
  value per column (per row, or a whole matrix) keeps the Gemm float.
- method=rtn rounds each weight to the nearest code; method=gptq (needs --calib) collects each
  layer's input Hessian XᵀX over the calibration data on the float model, then quantizes with
  GPTQ, which spreads rounding error where the data does not look.

A K shorter than the block size gets the smallest block that holds it: one block per column
either way, so the same numbers, with less padding stored. Left float, with the reason in the
details: weights that are not 2-D float32 initializers, K below 16 (MatMulNBits' smallest
block), excluded nodes. A weight held in a Constant node is quantized once `cleanup` has lifted
it. Nodes inside If/Loop bodies are quantized too, with RTN under method=gptq: tensors computed
in a body cannot be captured.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.capture import float_activations
from polaris_opt.errors import BadInput
from polaris_opt.export import to_model
from polaris_opt.fidelity import sqnr_db
from polaris_opt.hessian import collect_hessians
from polaris_opt.int4 import (
    BITS,
    MIN_BLOCK_SIZE,
    Quantized,
    dequantize_blocks,
    fitted_block_size,
    gptq,
    is_valid_block_size,
    pack_nibbles,
    packed_weight,
    quantize_blocks,
)
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.surgery import Names, constant_value, is_standard_domain, iter_graphs

MS_DOMAIN = "com.microsoft"
MAX_ACCURACY_LEVEL = 4  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8


class Int4Method(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"


@dataclass
class Layer:
    """A MatMul or Gemm to rewrite, with its weight as MatMulNBits sees it: [K, N], α applied."""

    node: gs.Node
    activation: gs.Tensor
    weight: np.ndarray
    weight_name: str
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class QuantizeInt4(Pass):
    """MatMul/Gemm with a constant float weight  ⇒  com.microsoft.MatMulNBits with block-wise INT4 weights."""

    name: ClassVar[str] = "quantize-int4"
    lossy: ClassVar[bool] = True

    block_size: int = field(default=32, metadata={"help": "values per scale along K: a power of two >= 16"})
    symmetric: bool = field(
        default=True, metadata={"help": "zero point fixed at 8 (no zero-point input) or one per block"}
    )
    method: Int4Method = field(
        default=Int4Method.RTN, metadata={"help": "rtn: round to nearest; gptq: GPTQ on calibration data"}
    )
    exclude: str = field(
        default="", metadata={"help": "node or weight names (fnmatch patterns) to keep float, ';'-separated"}
    )
    accuracy_level: int = field(
        default=0, metadata={"help": "MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"}
    )
    damp: float = field(
        default=0.01, metadata={"help": "GPTQ: fraction of mean(diag H) added to H's diagonal"}
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self._check_options(ctx)
        layers, skipped = find_layers(graph, self._excluded)
        hessians = self._hessians(graph, layers, ctx) if self.method is Int4Method.GPTQ and layers else {}
        names = Names(graph)
        rows = []
        with ctx.progress(f"quantizing to INT4 ({self.method.value})", len(layers)) as advance:
            for layer in layers:
                rows.append(self._quantize(layer, hessians.get(layer.activation.name), names))
                advance(1)
        if layers:
            _import_ms_domain(graph)
        stats = {
            "layers": len(rows),
            "skipped": len(skipped),
            "bytes_fp32": sum(row["bytes_fp32"] for row in rows),
            "bytes_int4": sum(row["bytes_int4"] for row in rows),
        }
        return PassResult(modified=bool(rows), stats=stats, details={"layers": rows, "skipped": skipped})

    def _check_options(self, ctx: PassContext) -> None:
        if not is_valid_block_size(self.block_size):
            raise BadInput(
                f"quantize-int4: block-size {self.block_size} is not a power of two >= 16; use 32, 64 or 128"
            )
        if not 0 <= self.accuracy_level <= MAX_ACCURACY_LEVEL:
            raise BadInput(f"quantize-int4: accuracy-level {self.accuracy_level} is not one of 0, 1, 2, 3, 4")
        if not (np.isfinite(self.damp) and self.damp > 0):
            raise BadInput(f"quantize-int4: damp {self.damp} must be a positive number such as 0.01")
        if self.method is Int4Method.GPTQ and ctx.calib is None:
            raise BadInput("quantize-int4: --method gptq needs calibration data: give --calib DATA")

    def _excluded(self, node: gs.Node, weight_name: str) -> bool:
        patterns = [p for p in self.exclude.split(";") if p]
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (node.name, weight_name))

    def _hessians(self, graph: gs.Graph, layers: list[Layer], ctx: PassContext) -> dict:
        # Hessians come from the float model: every layer sees the inputs it was trained on.
        model = to_model(graph)
        # Tensors inside If/Loop bodies cannot be graph outputs: those layers fall back to RTN.
        wanted = sorted({layer.activation.name for layer in layers} & set(float_activations(model)))
        if not wanted:
            return {}
        source = ctx.calib
        hessians = collect_hessians(
            model,
            source.batches(),
            wanted,
            threads=ctx.threads,
            progress=ctx.progress,
            total=source.num_batches,
        )
        _check_finite(hessians, layers)
        return hessians

    def _quantize(self, layer: Layer, hessian: tuple[np.ndarray, int] | None, names: Names) -> dict:
        """Quantize one layer and rewrite its node; returns its row of the details table."""
        k, n = layer.weight.shape
        block_size = fitted_block_size(k, self.block_size)
        use_gptq = self.method is Int4Method.GPTQ and _usable(hessian, k)
        if use_gptq:
            quantized = gptq(layer.weight, hessian[0], block_size, self.symmetric, damp=self.damp)
        else:
            quantized = quantize_blocks(layer.weight, block_size, self.symmetric)
        op = layer.node.op  # before the rewrite turns it into MatMulNBits
        tensors = self._rewrite(layer, quantized, block_size, names)
        return {
            "name": layer.node.name,
            "op": op,
            "precision": "int4",
            "weight": layer.weight_name,
            "K": k,
            "N": n,
            "block_size": block_size,
            "method": (Int4Method.GPTQ if use_gptq else Int4Method.RTN).value,
            "bytes_fp32": layer.weight.size * 4,
            "bytes_int4": sum(t.values.nbytes for t in tensors),
            "weight_sqnr_db": round(sqnr_db(layer.weight, dequantize_blocks(*quantized, k)), 2),
        }

    def _rewrite(
        self, layer: Layer, quantized: Quantized, block_size: int, names: Names
    ) -> list[gs.Constant]:
        """Turn the layer's node into MatMulNBits in place; returns the weight tensors it now reads."""
        node, (k, n) = layer.node, layer.weight.shape
        codes, scales, zero_points = quantized
        base = layer.weight_name
        tensors = [
            _fresh_constant(f"{base}.int4", packed_weight(codes, block_size), names),
            _fresh_constant(f"{base}.int4_scales", scales, names),
        ]
        if not self.symmetric:
            tensors.append(_fresh_constant(f"{base}.int4_zero_points", pack_nibbles(zero_points), names))
        inputs = [layer.activation, *tensors]
        if layer.bias is not None:
            # Optional inputs are positional: an empty name skips zero_points (when symmetric) and g_idx.
            inputs += [gs.Variable.empty()] * (5 - len(inputs))
            inputs.append(_fresh_constant(f"{base}.int4_bias", layer.bias, names))
        node.op, node.domain = "MatMulNBits", MS_DOMAIN
        node.attrs = {"K": k, "N": n, "bits": BITS, "block_size": block_size}
        if self.accuracy_level:
            node.attrs["accuracy_level"] = self.accuracy_level
        node.inputs.clear()
        node.inputs.extend(inputs)
        _declare_output(node.outputs[0], layer.activation, n)
        return tensors


# ------------------------------------------------------------------------ finding layers


def find_layers(graph: gs.Graph, excluded) -> tuple[list[Layer], list[dict]]:
    """The MatMul/Gemm nodes to quantize, in `graph` and its sub-graphs, and those left float (why).

    Nodes whose weight is computed at run time (attention's Q·Kᵀ) are not layers at all and are
    not listed.
    """
    layers, skipped = [], []
    for g in iter_graphs(graph):
        for node in g.nodes:
            if not _reads_a_constant_weight(node):
                continue
            weight_name = node.inputs[1].name
            found = "excluded" if excluded(node, weight_name) else _layer(node)
            if isinstance(found, Layer):
                layers.append(found)
            else:
                skipped.append(
                    {
                        "name": node.name,
                        "op": node.op,
                        "precision": "float",
                        "weight": weight_name,
                        "reason": found,
                    }
                )
    return layers, skipped


def _reads_a_constant_weight(node: gs.Node) -> bool:
    if node.op not in ("MatMul", "Gemm") or not is_standard_domain(node) or len(node.inputs) < 2:
        return False
    return isinstance(node.inputs[1], gs.Constant) or constant_value(node.inputs[1]) is not None


def _layer(node: gs.Node) -> Layer | str:
    """`node` as a layer to quantize, or why it stays float."""
    found = _gemm_layer(node) if node.op == "Gemm" else _matmul_layer(node)
    if isinstance(found, Layer) and found.weight.shape[0] < MIN_BLOCK_SIZE:
        return f"K={found.weight.shape[0]} is below {MIN_BLOCK_SIZE}, the smallest MatMulNBits block"
    return found


def _float_weight(node: gs.Node) -> np.ndarray | str:
    value = constant_value(node.inputs[1])
    if value is None:
        return "weight is stored sparse or as another type than it holds"
    if value.dtype != np.float32:
        return f"weight is {value.dtype}, not float32"
    if value.ndim != 2:
        return f"weight has {value.ndim} dimensions, not 2"
    if not np.all(np.isfinite(value)):
        raise BadInput(
            f"quantize-int4: weight '{node.inputs[1].name}' of node '{node.name}' holds NaN or Inf; "
            f"fix the model or keep the node float with exclude={node.name}"
        )
    return value


def _matmul_layer(node: gs.Node) -> Layer | str:
    weight = _float_weight(node)
    if isinstance(weight, str):
        return weight
    activation = node.inputs[0]
    if activation.shape is not None and len(activation.shape) < 2:
        return "input A is 1-D, which MatMulNBits does not take"
    return Layer(node, activation, weight, node.inputs[1].name)


def _gemm_layer(node: gs.Node) -> Layer | str:
    weight = _float_weight(node)
    if isinstance(weight, str):
        return weight
    if node.attrs.get("transA", 0):
        return "Gemm with transA=1"
    if node.attrs.get("transB", 0):
        weight = weight.T
    alpha = np.float32(node.attrs.get("alpha", 1.0))
    weight = np.ascontiguousarray(weight * alpha if alpha != 1 else weight)
    bias = _gemm_bias(node, weight.shape[1])
    if isinstance(bias, str):
        return bias
    return Layer(node, node.inputs[0], weight, node.inputs[1].name, bias)


def _gemm_bias(node: gs.Node, n: int) -> np.ndarray | None | str:
    """β·C as one float32 value per output column, None without C, or why it cannot be."""
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    c = constant_value(node.inputs[2])
    if c is None or c.dtype != np.float32:
        return "Gemm bias C is not a float32 constant"
    # C broadcasts against [M, N]: only shapes that give every row the same bias fold into [N].
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.shape[-1:] not in ((), (1,), (n,)):
        return f"Gemm bias C of shape {list(c.shape)} is not one value per column"
    beta = np.float32(node.attrs.get("beta", 1.0))
    return np.broadcast_to(c.reshape(-1) * beta, (n,)).astype(np.float32)


# ------------------------------------------------------------------------------- helpers


def _usable(hessian: tuple[np.ndarray, int] | None, k: int) -> bool:
    """A Hessian GPTQ can use: of this layer's K and from at least one row of data."""
    return hessian is not None and hessian[1] > 0 and hessian[0].shape == (k, k)


def _check_finite(hessians: dict[str, tuple[np.ndarray, int]], layers: list[Layer]) -> None:
    # Checked before any node is rewritten, so a bad batch leaves the graph as it was.
    for layer in layers:
        found = hessians.get(layer.activation.name)
        if found is not None and not np.all(np.isfinite(found[0])):
            raise BadInput(
                f"quantize-int4: calibration activations of '{layer.activation.name}' (input of node "
                f"'{layer.node.name}') hold NaN or Inf; check the calibration data"
            )


def _declare_output(output: gs.Tensor, activation: gs.Tensor, n: int) -> None:
    # ONNX shape inference does not know MatMulNBits: a declared type and shape ([..., N], like
    # MatMul's) let inference carry on through the nodes after it.
    if output.dtype is None:
        output.dtype = np.float32
    if output.shape is None and activation.shape is not None:
        output.shape = [*activation.shape[:-1], n]


def _import_ms_domain(graph: gs.Graph) -> None:
    # graphsurgeon's exporter would add a missing domain too; saying it here keeps the version explicit.
    domains = graph.import_domains
    if domains is not None and not any(d.domain == MS_DOMAIN for d in domains):
        domains.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def _fresh_constant(base: str, value: np.ndarray, names: Names) -> gs.Constant:
    """A new initializer named after `base`, with a name no tensor of the model has."""
    return gs.Constant(names.fresh(base), np.ascontiguousarray(value))
