"""--correct: re-fit each pruned layer from calibration data, without retraining.

Pruning a layer's weights changes the distribution of its output, per output channel: the zeroed
weights no longer add their share of E[x], so the mean shifts (the network downstream sees a wrong
bias), and they no longer add their share of the spread, so the standard deviation changes,
mostly shrinks (the ReLU thresholds, BatchNorms and classifier margins downstream see a weaker
signal). The correction restores both, per output channel c (over batch and spatial positions
or tokens), to what the dense model has on the same calibration data. What is re-fitted depends
on the layer:

- scale+bias (Conv, ConvTranspose, Gemm, MatMul whose output no BatchNormalization reads; after
  `cleanup` a BN that follows a Conv is folded into it, so this is the usual case): the
  channel's output y_c becomes s_c·y_c + t_c, with s_c = σ_dense/σ_pruned and t_c such that the
  mean becomes μ_dense. That is the BatchNorm re-fit below done on the folded BN: the weights
  that produce channel c and its bias are multiplied by s_c, then t_c is added to the bias.
  Scaling keeps zeros at zero, so the sparsity pattern (unstructured, N:M, block) is unchanged.
  Guards: a channel that is constant in either model (all its weights pruned, or a dead input)
  has no spread to match and gets its mean only (s_c = 1); s_c is clipped to [0.25, 4]
  (SCALE_RANGE says why); a weight shared with another node is not scaled (that would change
  the other reader), so that layer gets its mean only; a layer with no channel scaled says
  refit "bias" in its row.
- bias: the mean alone, bias += μ_dense − μ_pruned, for a layer whose weight cannot be scaled.
  Conv/ConvTranspose/Gemm get a zero bias when they have none (Gemm's β is folded into the new
  C); a MatMul's bias is the Add of a constant that is its only reader, or a new Add that takes
  over the MatMul output's name (so every reader, and a graph output, sees the corrected value
  under the name it knew).
- batchnorm: when an unfolded BatchNormalization is the only reader of a Conv/ConvTranspose/Gemm
  output (--no-cleanup, or a producer fold-batchnorm cannot fold into), the layer stays and the
  BN's running mean and variance are re-estimated from the pruned layer output, so that the BN
  output keeps, per channel, the mean and variance it has on the dense model. When the running
  statistics describe the calibration data (a BN trained on it), the new ones are the pruned
  output's mean and variance (the variance up to a term in ε); when they do not (random-init
  models, whose statistics are arbitrary), the BN output is still restored to the dense one's
  instead of being re-normalized, which would move it away from the dense model.

Matching σ is not matching values: the gain that minimizes the squared error against the dense
output is ρ·σ_dense/σ_pruned (ρ their correlation), so scale+bias gives a lower layer SQNR than
the mean alone where ρ is low, while it restores the activation scale the rest of the network
was trained for. On the trained digits models that is what top-1 accuracy depends on (70 %
magnitude: digits_mlp 0.86 → 0.936 and digits_cnn 0.827 → 0.889 over the mean alone). On the
random-weight zoo models, whose only measure is output SQNR, it costs 0.2-3.2 dB against the
mean alone at 50-90 % magnitude (resnet_s at 50 %: 30.8 dB, mean alone 31.2, uncorrected 10.8),
and on transformer_s at 90 % it ends below no correction (1.7 dB against 2.5).

Order matters, since a layer's output depends on the corrections upstream of it. Layers are
grouped in rounds: a layer's round is one more than the latest round of the corrected layers
upstream of it, so layers of one round have no path between them and one capture pass (one ONNX
Runtime session, each batch reduced to per-channel moments and dropped) serves them all. The
dense model is run once for its per-channel moments. The SQNR of each layer output against the
dense one needs both values element by element, so one last pass runs the dense model and the
corrected one side by side; the value before a layer's own correction is a per-channel affine
map of its corrected output, so one pass gives both figures for every layer.

Structured pruning: `CorrectedLayer.kept` lists the dense layer's output channels the pruned
layer still has, in order; the dense references are taken at those channels. A layer that
calibration data cannot reach (inside an If/Loop/Scan body) or that has no dense counterpart is
skipped with the reason in its row, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.capture import stream_tensors, tensor_types
from polaris_opt.errors import BadInput
from polaris_opt.export import to_model
from polaris_opt.fidelity import sqnr_from_energies
from polaris_opt.layer_bias import bias_add, channels_last, conv_bias, gemm_bias, set_bias
from polaris_opt.passes_api import Progress, no_progress
from polaris_opt.pruning.targets import PRUNABLE_OPS
from polaris_opt.pruning.targets import layer_rounds as correction_rounds
from polaris_opt.surgery import (
    Names,
    constant_value,
    consumers,
    is_graph_output,
    is_standard_domain,
    iter_graphs,
)

if TYPE_CHECKING:
    from polaris_opt.calib_data import CalibrationSource

LAYER_OPS = PRUNABLE_OPS  # the layers whose outputs a correction can re-fit
# Below this per-channel variance a layer output is a constant: no scale can be matched on it.
CONSTANT_VARIANCE = 1e-12
# Bounds of a channel's scale σ_dense/σ_pruned. The ratio restores the spread of the channel, but
# the weights that survive are only correlated with the dense output: the gain that minimizes the
# squared error is ρ·σ_dense/σ_pruned, below the ratio, and the gap grows as a channel loses most
# of its weights (ρ falls with σ_pruned). Far from 1 the ratio mostly amplifies what the pruned
# channel gets wrong, and a few calibration rows estimate it poorly, so it is clipped. Measured on
# the zoo with magnitude pruning: at 50 and 70 % the ratio leaves this range only in 5 channels of
# mobilenetv2_s; at 90 % in 5/101 channels of digits_mlp, 7/29 of digits_cnn, 18/552 of resnet_s,
# 1/895 of transformer_s. There the clip is worth little but not nothing: digits_cnn at 90 % has
# top-1 0.382 with it and 0.356 without.
SCALE_RANGE = (0.25, 4.0)


@dataclass
class CorrectedLayer:
    """A layer to re-fit: its node name in the pruned graph and, after structured pruning, which
    output channels of the dense layer it kept (in order); None when it has them all."""

    node: str
    kept: np.ndarray | None = None


@dataclass
class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.),
    which stays accurate where Σx² − n·mean² would cancel."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        """Merge `rows` [values, channels] (float64) into the moments."""
        n = rows.shape[0]
        batch_mean = rows.mean(axis=0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(axis=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / max(self.count, 1)

    @property
    def channels(self) -> int:
        return 0 if self.mean is None else len(self.mean)

    def select(self, kept: np.ndarray) -> ChannelMoments:
        return ChannelMoments(self.count, self.mean[kept], self.m2[kept])


@dataclass
class Affine:
    """A per-channel map scale·x + shift (channels last)."""

    scale: np.ndarray | float = 1.0
    shift: np.ndarray | float = 0.0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return rows * self.scale + self.shift


@dataclass
class Plan:
    """How one layer is corrected and measured.

    `measured` is the pruned tensor whose moments drive the re-fit (the layer output, bias
    included; the BN input for a BN re-fit). `compared` is the tensor compared with the dense
    tensor of the same name (the layer output; the BN output for a BN re-fit). Once corrected,
    `before` and `after` map the final graph's `measured` values to what `compared` was before
    and after this layer's own correction.
    """

    spec: CorrectedLayer
    node: gs.Node | None = None
    measured: str = ""
    compared: str = ""
    axis: int = -1  # channel axis of `measured` and `compared`
    bias_add: gs.Node | None = None  # MatMul: the Add that holds its bias
    batchnorm: gs.Node | None = None  # set for a BN re-fit
    scalable: bool = False  # the weight is this layer's own: its output channels may be scaled
    scale: np.ndarray | None = None  # the per-channel scale applied (scale+bias re-fit)
    clipped: int = 0  # channels whose scale hit SCALE_RANGE
    before: Affine | None = None
    after: Affine | None = None
    reason: str | None = None  # why the layer was not corrected
    sqnr_before_db: float | None = None
    sqnr_after_db: float | None = None

    @property
    def refit(self) -> str:
        if self.reason is not None:
            return "none"
        if self.batchnorm is not None:
            return "batchnorm"
        return "scale+bias" if self.scaled_channels else "bias"

    @property
    def scaled_channels(self) -> int:
        return 0 if self.scale is None else int(np.count_nonzero(self.scale != 1.0))


@dataclass
class Capture:
    """Where batches come from and how sessions run, shared by every capture pass."""

    source: CalibrationSource
    threads: int = 1
    progress: Progress = no_progress

    def stream(self, model: onnx.ModelProto, names: list[str], description: str, *, quiet: bool = False):
        return stream_tensors(
            model,
            self.source.batches(),
            names,
            threads=self.threads,
            progress=no_progress if quiet else self.progress,
            description=description,
            total=self.source.num_batches,
        )

    def moments(
        self, model: onnx.ModelProto, axes: dict[str, int], description: str
    ) -> dict[str, ChannelMoments]:
        """Per-channel moments of each tensor in `axes` (name -> channel axis) over all batches."""
        moments = {name: ChannelMoments() for name in axes}
        for values in self.stream(model, list(axes), description):
            for name, axis in axes.items():
                moments[name].add(channels_last(values[name], axis))
        if any(m.count == 0 for m in moments.values()):
            raise BadInput("prune --correct: the calibration data yielded no batches; give --calib DATA")
        return moments


def correct_layers(
    dense: onnx.ModelProto,
    graph: gs.Graph,
    layers: list[CorrectedLayer],
    source: CalibrationSource,
    *,
    threads: int = 1,
    progress: Progress = no_progress,
) -> list[dict[str, Any]]:
    """Re-fit `layers` in the pruned `graph`, in place, so that each layer output (the BN output
    for a BN re-fit) has, per channel on the calibration data, the dense model's mean and standard
    deviation (the mean only where the guards of the module docstring apply).

    Returns one row per layer, in the order given: {"layer", "output", "refit": "scale+bias" |
    "bias" | "batchnorm" | "none", "sqnr_before_db", "sqnr_after_db", "gain_db",
    "scaled_channels", "clipped_channels", "reason"}; the SQNR is of the layer output (`output`)
    against the dense tensor of that name over the calibration data, before and after this
    layer's correction (upstream corrections applied in both); scaled_channels counts the
    channels whose weights were scaled, clipped_channels those whose scale hit SCALE_RANGE. A
    skipped layer has refit "none", None figures and the reason.
    """
    graph.toposort()
    plans = plan_layers(graph, layers, tensor_types(dense), tensor_types(to_model(graph)))
    ready = [plan for plan in plans if plan.reason is None]
    if ready:
        capture = Capture(source, threads, progress)
        dense_moments = capture.moments(
            dense, {plan.measured: plan.axis for plan in ready}, "correction: dense layers"
        )
        correct_in_rounds(graph, ready, dense_moments, capture)
        corrected = [plan for plan in ready if plan.reason is None]
        if corrected:
            measure_fidelity(dense, to_model(graph), corrected, capture)
    return [plan_row(plan) for plan in plans]


def correct_in_rounds(
    graph: gs.Graph, plans: list[Plan], dense_moments: dict[str, ChannelMoments], capture: Capture
) -> None:
    """Correct `plans` round by round, each round from one capture of the graph as corrected so far."""
    names = Names(graph)
    rounds = correction_rounds(graph, [plan.node for plan in plans])
    last = max(rounds)
    for number in range(last + 1):
        group = [plan for plan, r in zip(plans, rounds, strict=True) if r == number]
        pruned_moments = capture.moments(
            to_model(graph),
            {plan.measured: plan.axis for plan in group},
            f"correction: round {number + 1}/{last + 1}",
        )
        for plan in group:
            refit(plan, graph, dense_moments[plan.measured], pruned_moments[plan.measured], names)
        graph.toposort()  # a MatMul's new bias Add was appended at the end


# ------------------------------------------------------------------------------- planning


def plan_layers(
    graph: gs.Graph, layers: list[CorrectedLayer], dense_types: dict[str, int], pruned_types: dict[str, int]
) -> list[Plan]:
    """One plan per layer; a layer that cannot be corrected gets its reason instead."""
    main_nodes = {node.name: node for node in graph.nodes}
    nested = {node.name for sub in list(iter_graphs(graph))[1:] for node in sub.nodes}
    plans, seen = [], set()
    for layer in layers:
        plan = Plan(layer)
        if layer.node not in main_nodes and layer.node not in nested:
            raise ValueError(f"correct_layers: no node named '{layer.node}' in the pruned graph")
        if layer.node in seen:
            plan.reason = "listed twice: corrected once"
        elif layer.node not in main_nodes:
            plan.reason = "inside an If/Loop/Scan body: calibration data cannot reach its output"
        else:
            plan.reason = _describe(plan, main_nodes[layer.node], graph, dense_types, pruned_types)
        seen.add(layer.node)
        plans.append(plan)
    return plans


def _describe(
    plan: Plan, node: gs.Node, graph: gs.Graph, dense_types: dict[str, int], pruned_types: dict[str, int]
) -> str | None:
    """Fill `plan` for `node`; the reason it cannot be corrected, or None."""
    if node.op not in LAYER_OPS or not is_standard_domain(node) or len(node.inputs) < 2:
        return f"{node.op} is not a Conv/ConvTranspose/Gemm/MatMul layer"
    weight = constant_value(node.inputs[1])
    if weight is None or (node.op == "MatMul" and weight.ndim != 2):
        return "weight is not a constant (2-D for MatMul)"
    if node.op != "MatMul" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
        bias = constant_value(node.inputs[2])
        if bias is None or bias.dtype != np.float32:
            return "bias is not a constant float32"
    plan.node = node
    plan.axis = 1 if node.op in ("Conv", "ConvTranspose") else -1
    output = node.outputs[0]
    plan.bias_add = bias_add(node, graph) if node.op == "MatMul" else None
    plan.measured = plan.bias_add.outputs[0].name if plan.bias_add else output.name
    plan.batchnorm = None if node.op == "MatMul" else _batchnorm_reader(output, graph)
    plan.compared = plan.batchnorm.outputs[0].name if plan.batchnorm else plan.measured
    # A shared weight keeps its values: scaling it for one reader would change the others.
    plan.scalable = plan.batchnorm is None and len(consumers(node.inputs[1])) == 1
    if pruned_types.get(plan.measured) != onnx.TensorProto.FLOAT:
        return f"output '{plan.measured}' is not a float32 tensor of the main graph"
    # In order, not as a set: a set of strings iterates in a per-process order, so the reason
    # given for a skipped layer (in --json and reports) would differ from run to run.
    for name in dict.fromkeys((plan.measured, plan.compared)):
        if dense_types.get(name) != onnx.TensorProto.FLOAT:
            return f"no float32 tensor '{name}' in the dense model to compare with"
    return None


def _batchnorm_reader(output: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The inference-mode BatchNormalization with constant float32 parameters that is the only
    reader of `output`; another reader would not see a re-fit BN, so it gets a bias re-fit."""
    readers = consumers(output)
    if len(readers) != 1 or is_graph_output(output, graph):
        return None
    bn = readers[0]
    if bn.op != "BatchNormalization" or not is_standard_domain(bn) or bn.inputs[0] is not output:
        return None
    if not any(node is bn for node in graph.nodes):
        return None  # a BN inside an If/Loop body: its output cannot be measured
    if bn.attrs.get("training_mode", 0) or any(not t.is_empty() for t in bn.outputs[1:]):
        return None
    parameters = [constant_value(t) for t in bn.inputs[1:5]]
    if any(p is None or p.dtype != np.float32 or p.ndim != 1 for p in parameters):
        return None
    return bn


# -------------------------------------------------------------------------------- re-fitting


def refit(plan: Plan, graph: gs.Graph, dense: ChannelMoments, pruned: ChannelMoments, names: Names) -> None:
    """Correct one layer from the dense and pruned moments of its `measured` tensor."""
    kept = plan.spec.kept
    if kept is None and dense.channels != pruned.channels:
        plan.reason = (
            f"{pruned.channels} output channels against {dense.channels} in the dense layer "
            "and no kept-channel mapping"
        )
        return
    if kept is not None:
        kept = np.asarray(kept, dtype=np.int64)
        if len(kept) != pruned.channels or np.any(kept < 0) or np.any(kept >= dense.channels):
            plan.reason = (
                f"kept-channel mapping ({len(kept)} indices) does not fit {pruned.channels} pruned "
                f"and {dense.channels} dense output channels"
            )
            return
        dense = dense.select(kept)
    if plan.batchnorm is not None:
        refit_batchnorm(plan, dense, pruned, names)
    elif plan.scalable:
        refit_scale_and_bias(plan, graph, dense, pruned, names)
    else:
        refit_bias(plan, graph, 1.0, dense.mean - pruned.mean, names)


def refit_scale_and_bias(
    plan: Plan, graph: gs.Graph, dense: ChannelMoments, pruned: ChannelMoments, names: Names
) -> None:
    """Output channel c becomes s_c·y_c + t_c, with s_c = σ_dense/σ_pruned (clipped) and t_c the
    shift that then makes the mean μ_dense: weight row and bias scaled by s_c, bias += t_c."""
    scale, plan.clipped = matched_scale(dense, pruned)
    plan.scale = scale
    shift = dense.mean - scale * pruned.mean
    if plan.scaled_channels:  # every channel constant: the weight stays as it is
        scale_output_channels(plan.node, scale)
    refit_bias(plan, graph, scale, shift, names)
    plan.before = Affine(1.0 / scale, -shift / scale)


def matched_scale(dense: ChannelMoments, pruned: ChannelMoments) -> tuple[np.ndarray, int]:
    """σ_dense/σ_pruned per channel, clipped to SCALE_RANGE, and how many channels were clipped.

    A channel that is constant in either model keeps scale 1 (its mean alone is matched): with all
    of its weights pruned, or a dead input, there is no spread left to scale, and a constant dense
    channel gives no spread to match."""
    usable = (dense.variance > CONSTANT_VARIANCE) & (pruned.variance > CONSTANT_VARIANCE)
    ratio = np.ones(pruned.channels)
    ratio[usable] = np.sqrt(dense.variance[usable] / pruned.variance[usable])
    low, high = SCALE_RANGE
    return np.clip(ratio, low, high), int(np.count_nonzero((ratio < low) | (ratio > high)))


def scale_output_channels(node: gs.Node, scale: np.ndarray) -> None:
    """Multiply the weights that produce output channel c of `node` by scale[c] (zeros stay zeros:
    the sparsity pattern is unchanged). The weight is this node's alone, so it is rewritten in
    place and keeps its name, which the prune report and later passes know it by."""
    tensor = node.inputs[1]
    weight = constant_value(tensor)
    scaled = weight.astype(np.float64) * _channel_factor(node, weight.shape, scale)
    tensor.values = scaled.astype(weight.dtype)


def _channel_factor(node: gs.Node, shape: tuple[int, ...], scale: np.ndarray) -> np.ndarray:
    """`scale` laid out to broadcast against the weight of `node` along its output channels."""
    ones = (1,) * (len(shape) - 2)
    if node.op == "Conv":  # [O, C/G, k...]
        return scale.reshape(-1, 1, *ones)
    if node.op == "ConvTranspose":  # [C, O/G, k...]: group g's input rows feed its O/G outputs
        groups = int(node.attrs.get("group", 1))
        per_group = scale.reshape(groups, 1, shape[1], *ones)
        return np.broadcast_to(per_group, (groups, shape[0] // groups, *shape[1:])).reshape(shape)
    if node.op == "Gemm" and node.attrs.get("transB", 0):  # B [N, K]
        return scale[:, None]
    return scale  # MatMul [K, N], Gemm B [K, N]


def refit_bias(
    plan: Plan, graph: gs.Graph, scale: np.ndarray | float, shift: np.ndarray, names: Names
) -> None:
    """bias ← scale·bias + shift, per output channel (a missing bias counts as zeros); `scale` is
    1 for a mean-only re-fit, and the weight already carries it otherwise."""
    node = plan.node
    zeros = np.zeros(len(shift))
    if node.op in ("Conv", "ConvTranspose"):
        set_bias(node, 2, _affine(conv_bias(node, zeros), scale, shift), names)
    elif node.op == "Gemm":
        # Y = α·A·B + β·C: the new C holds β·C scaled and shifted, and β becomes 1.
        set_bias(node, 2, _affine(gemm_bias(node, zeros), scale, shift), names)
    elif plan.bias_add is not None:
        add = plan.bias_add
        index = 0 if add.inputs[1] is node.outputs[0] else 1
        set_bias(add, index, _affine(constant_value(add.inputs[index]), scale, shift), names)
    else:
        insert_matmul_bias(node, graph, shift, names)
    plan.before, plan.after = Affine(shift=-shift), Affine()


def _affine(bias: np.ndarray, scale: np.ndarray | float, shift: np.ndarray) -> np.ndarray:
    return (bias.astype(np.float64) * scale + shift).astype(np.float32)


def insert_matmul_bias(matmul: gs.Node, graph: gs.Graph, bias: np.ndarray, names: Names) -> None:
    """MatMul → Add(bias): the Add takes over the MatMul output's name, so its readers and a graph
    output read the corrected value, and the name still means the layer output for comparisons."""
    output = matmul.outputs[0]
    unbiased = gs.Variable(names.fresh(f"{output.name}.unbiased"), dtype=np.float32, shape=output.shape)
    matmul.outputs[0] = unbiased
    constant = gs.Constant(names.fresh(f"{matmul.inputs[1].name}.bias_corrected"), bias.astype(np.float32))
    add = gs.Node("Add", names.fresh(f"{matmul.name}/bias_correction"), inputs=[unbiased, constant])
    add.outputs.append(output)
    graph.nodes.append(add)


def refit_batchnorm(plan: Plan, dense: ChannelMoments, pruned: ChannelMoments, names: Names) -> None:
    """New running statistics for the BN that reads the layer output."""
    bn = plan.batchnorm
    scale, offset, mean, var = (constant_value(t).astype(np.float64) for t in bn.inputs[1:5])
    epsilon = float(bn.attrs.get("epsilon", 1e-5))
    new_mean, new_var = matched_statistics(mean, var, epsilon, dense, pruned)
    for index, value in ((3, new_mean), (4, new_var)):
        name = names.fresh(f"{bn.inputs[index].name}.refit")
        bn.inputs[index] = gs.Constant(name, value.astype(np.float32))
    plan.before = batchnorm_affine(scale, offset, mean, var, epsilon)
    plan.after = batchnorm_affine(scale, offset, new_mean, new_var, epsilon)


def matched_statistics(
    mean: np.ndarray, var: np.ndarray, epsilon: float, dense: ChannelMoments, pruned: ChannelMoments
) -> tuple[np.ndarray, np.ndarray]:
    """Running (mean, var) under which BN(pruned x) has, per channel, the mean and variance that
    BN(dense x) has with the old (mean, var).

    BN(x) = γ·(x − m)/√(v + ε) + β. Matching the standard deviation needs √(v' + ε) =
    √(v + ε)·σp/σd, and matching the mean then m' = μp − (μd − m)·σp/σd. With m = μd and
    v = σd² (statistics that describe the data) this is m' = μp, v' ≈ σp². A channel that is
    constant in either model keeps its variance and only has its mean shift matched.
    """
    usable = (dense.variance > CONSTANT_VARIANCE) & (pruned.variance > CONSTANT_VARIANCE)
    ratio = np.ones_like(mean)
    ratio[usable] = np.sqrt(pruned.variance[usable] / dense.variance[usable])
    new_mean = pruned.mean - (dense.mean - mean) * ratio
    new_var = (var + epsilon) * ratio**2 - epsilon
    return new_mean, new_var


def batchnorm_affine(
    scale: np.ndarray, offset: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> Affine:
    """Inference BatchNormalization as a per-channel affine map."""
    factor = scale / np.sqrt(var + epsilon)
    return Affine(factor, offset - factor * mean)


# ---------------------------------------------------------------------------------- measuring


@dataclass
class Energies:
    """Σ ref² and Σ (ref − got)² before and after a layer's correction."""

    signal: float = 0.0
    noise_before: float = 0.0
    noise_after: float = 0.0


def measure_fidelity(dense: onnx.ModelProto, corrected: onnx.ModelProto, plans: list[Plan], capture: Capture):
    """Fill each plan's SQNR before and after its correction, in one pass over both models."""
    sums = [Energies() for _ in plans]
    reference = capture.stream(dense, [plan.compared for plan in plans], "correction: fidelity")
    candidate = capture.stream(corrected, [plan.measured for plan in plans], "", quiet=True)
    for ref_values, got_values in zip(reference, candidate, strict=True):
        for plan, energies in zip(plans, sums, strict=True):
            ref = channels_last(ref_values[plan.compared], plan.axis)
            if plan.spec.kept is not None:
                ref = ref[:, np.asarray(plan.spec.kept, dtype=np.int64)]
            got = channels_last(got_values[plan.measured], plan.axis)
            energies.signal += float(np.sum(ref * ref))
            energies.noise_before += float(np.sum((ref - plan.before(got)) ** 2))
            energies.noise_after += float(np.sum((ref - plan.after(got)) ** 2))
    for plan, energies in zip(plans, sums, strict=True):
        plan.sqnr_before_db = sqnr_from_energies(energies.signal, energies.noise_before)
        plan.sqnr_after_db = sqnr_from_energies(energies.signal, energies.noise_after)


def plan_row(plan: Plan) -> dict[str, Any]:
    """The report row of one layer."""
    before, after = plan.sqnr_before_db, plan.sqnr_after_db
    measured = before is not None and after is not None
    return {
        "layer": plan.spec.node,
        "output": plan.compared or None,
        "refit": plan.refit,
        "sqnr_before_db": _rounded(before),
        "sqnr_after_db": _rounded(after),
        "gain_db": _rounded(_gain(before, after)) if measured else None,
        "scaled_channels": None if plan.reason else plan.scaled_channels,
        "clipped_channels": None if plan.reason else plan.clipped,
        "reason": plan.reason,
    }


def _gain(before: float, after: float) -> float:
    # Both infinite: the layer matched the dense one exactly before and after.
    return 0.0 if before == after else after - before


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
