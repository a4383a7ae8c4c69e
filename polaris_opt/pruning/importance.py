"""How much each channel of a dependency group matters: the lowest-scoring channels are removed.

All scores are computed on the dense model, before any group is rewritten, one number per
group channel (higher = more important).

- Norms (`l1` = Σ|w|, `l2` = √Σw²), per layer of the group, over the weight entries that go
  with the channel:
  - kind `filter` (classic filter pruning, Li et al., "Pruning Filters for Efficient ConvNets",
    2017): the producers' output rows only — the filters that make the channel.
  - kind `channel`: the whole group — the producers' rows, the depthwise Conv rows, the
    BatchNormalization/InstanceNormalization scale |γ/√(σ²+ε)| (|γ| for InstanceNormalization)
    and the consumers' input slices.
  Each layer's per-channel norms are divided by their mean over the channels that layer
  covers, so layers of different scale weigh alike, and summed over the layers. A channel
  that several positions of one tensor share (a Flatten block, a Concat repeated) pools those
  positions' entries into one norm.
- `taylor` (data-driven, first order): for channel c of the group and each consumer k reading
  the group tensor a_k,

      importance(c) = Σ_k ‖W_k[:, c]‖² · E[a_k,c²]

  where W_k[:, c] are all weight entries of consumer k that multiply channel c (for a Conv,
  every output channel and kernel tap; for a Gemm after a Flatten, the whole block of
  features) and E[a_k,c²] is the mean square of channel c of a_k over the calibration data
  (over samples and spatial positions). It is the energy that the channel's linear
  contribution carries into the consumer outputs, were channels uncorrelated; it needs
  calibration data (ctx.calib) and streams it once through the dense model.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from polaris_opt.calib_data import CalibrationSource
from polaris_opt.capture import stream_tensors
from polaris_opt.errors import BadInput
from polaris_opt.passes_api import Progress, no_progress
from polaris_opt.pruning.groups import Group, LayerUse, Member
from polaris_opt.surgery import constant_value

NORMS = ("l1", "l2")


def norm_importance(group: Group, kind: str, norm: str) -> np.ndarray:
    """Per group channel: the summed, mean-normalized `norm` of the group's layers (see above)."""
    roles = ("producer",) if kind == "filter" else ("producer", "depthwise", "consumer")
    total = np.zeros(group.channel_count)
    layers = [(_weight(use), use.weight_axis, use.member) for use in group.layers if use.role in roles]
    if kind == "channel":
        layers += [(scale, 0, member) for scale, member in _norm_scales(group)]
    for weight, axis, member in layers:
        total += _normalized(_channel_norms(group, weight, axis, member, norm))
    return total


def taylor_importance(
    groups: list[Group],
    dense: onnx.ModelProto,
    source: CalibrationSource,
    *,
    threads: int = 1,
    progress: Progress = no_progress,
) -> list[np.ndarray]:
    """Per group, per channel: Σ over consumers of ‖W[:, c]‖² · E[a_c²] on the calibration data."""
    readers = [use for group in groups for use in group.layers if use.role == "consumer"]
    energy = mean_squares(dense, source, [use.member for use in readers], threads=threads, progress=progress)
    scores = []
    for group in groups:
        total = np.zeros(group.channel_count)
        for use in group.layers:
            if use.role == "consumer":
                weight_energy = _position_sums(_weight(use), use.weight_axis, squared=True)
                contribution = weight_energy * energy[use.member.tensor.name]
                total += np.bincount(use.member.channels, contribution, minlength=group.channel_count)
        scores.append(total)
    return scores


def mean_squares(
    dense: onnx.ModelProto,
    source: CalibrationSource,
    members: list[Member],
    *,
    threads: int = 1,
    progress: Progress = no_progress,
) -> dict[str, np.ndarray]:
    """E[a²] per position along each member's channel axis, from one pass over the data."""
    axes = {member.tensor.name: member.axis for member in members}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    streamed = stream_tensors(
        dense,
        source.batches(),
        list(axes),
        threads=threads,
        progress=progress,
        description="channel importance (taylor)",
        total=source.num_batches,
    )
    for values in streamed:
        for name, axis in axes.items():
            rows = np.moveaxis(values[name], axis, -1)
            rows = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0.0) + np.einsum("ij,ij->j", rows, rows)
            counts[name] += rows.shape[0]
    if axes and not counts:
        raise BadInput("prune-structured: the calibration data yielded no batches")
    return {name: sums[name] / max(counts[name], 1) for name in axes}


def _weight(use: LayerUse) -> np.ndarray:
    return constant_value(use.node.inputs[1])


def _norm_scales(group: Group) -> list[tuple[np.ndarray, Member]]:
    """|γ/√(σ²+ε)| of each BatchNormalization in the group, |γ| of each InstanceNormalization."""
    scales = []
    for edit in group.slices:
        if edit.index != 1 or edit.node.op not in ("BatchNormalization", "InstanceNormalization"):
            continue
        gamma = constant_value(edit.node.inputs[1]).astype(np.float64)
        if edit.node.op == "BatchNormalization":
            variance = constant_value(edit.node.inputs[4]).astype(np.float64)
            gamma = gamma / np.sqrt(variance + edit.node.attrs.get("epsilon", 1e-5))
        scales.append((np.abs(gamma), edit.member))
    return scales


def _channel_norms(group: Group, weight: np.ndarray, axis: int, member: Member, norm: str) -> np.ndarray:
    """The `norm` of the entries of `weight` that go with each group channel (0 where none do)."""
    sums = _position_sums(weight, axis, squared=norm == "l2")
    per_channel = np.bincount(member.channels, sums, minlength=group.channel_count)
    covered = np.bincount(member.channels, minlength=group.channel_count) > 0
    norms = np.sqrt(per_channel) if norm == "l2" else per_channel
    return np.where(covered, norms, np.nan)


def _position_sums(weight: np.ndarray, axis: int, squared: bool) -> np.ndarray:
    """Σ w² (or Σ|w|) over every axis of `weight` but `axis`, per position along `axis`."""
    rows = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    return np.einsum("ij,ij->i", rows, rows) if squared else np.abs(rows).sum(axis=1)


def _normalized(norms: np.ndarray) -> np.ndarray:
    """Norms over their mean on the covered channels (NaN elsewhere); zeros stay zeros."""
    mean = np.nanmean(norms)
    scaled = norms / mean if mean > 0 else np.zeros_like(norms)
    return np.nan_to_num(scaled, nan=0.0)
