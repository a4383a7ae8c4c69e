"""prune-structured: remove whole channels, filters or attention heads, so layers get smaller.

kind=channel and kind=filter run the same rewrite and differ only in how channels are scored
(polaris_opt.pruning.importance): `filter` looks at the producers' output rows alone (classic
filter pruning), `channel` at every layer of the dependency group; importance=taylor uses
calibration data for both. Per dependency group (polaris_opt.pruning.groups) the
round(sparsity · channels) least important channels go, at least one kept, and every layer of
the group shrinks with them (polaris_opt.pruning.channels). A group is left whole when it is
unsafe (reported with its reasons) or excluded: `exclude` holds ';'-separated fnmatch patterns,
and a group is protected when any of its producers, consumers or depthwise Convs, or their
weights, matches.

kind=head removes attention heads (polaris_opt.pruning.heads) instead.

correct=true re-fits every layer whose inputs lost channels against the dense model, on the
calibration data: its per-channel scale and bias, or the BatchNorm statistics after it
(polaris_opt.pruning.correction).

Run after `cleanup`: weights in Constant nodes and BatchNormalizations that could fold would
otherwise hide layers from the groups.

details: "groups", one row per safe group: {"group" (its first producer), "channels_before",
"channels_after", "removed" (group channels: the first producer's output channels in order,
then those that join through a Concat), "producers", "consumers", "params_before",
"params_after" (elements of the constants the group's rewrite edits, just before and after it:
a layer between two groups counts in both)}; for kind=head the rows of heads.prune_heads;
"skipped": {"name", "reason"}; "correction": the rows of correction.correct_layers. The stats
count parameters over the whole main graph.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.export import to_model
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.pruning.channels import (
    channels_to_remove,
    kept_positions,
    remove_channels,
    touched_elements,
)
from polaris_opt.pruning.group_search import find_groups
from polaris_opt.pruning.groups import Group
from polaris_opt.pruning.importance import norm_importance, taylor_importance
from polaris_opt.surgery import Names


class StructuredKind(str, enum.Enum):
    CHANNEL = "channel"
    FILTER = "filter"
    HEAD = "head"


class ChannelImportance(str, enum.Enum):
    L1 = "l1"
    L2 = "l2"
    TAYLOR = "taylor"


@dataclass(frozen=True)
class PruneStructured(Pass):
    """Least important channels, filters or attention heads  ⇒  physically smaller layers."""

    name: ClassVar[str] = "prune-structured"
    lossy: ClassVar[bool] = True

    kind: StructuredKind = field(
        default=StructuredKind.CHANNEL,
        metadata={"help": "channel: score whole dependency groups; filter: producers' rows; head: attention"},
    )
    sparsity: float = field(
        default=0.5, metadata={"help": "fraction of each group's channels (or heads) removed"}
    )
    importance: ChannelImportance = field(
        default=ChannelImportance.L2,
        metadata={"help": "l1 / l2 weight norms, or taylor: Σ‖W[:, c]‖²·E[a_c²] on calibration data"},
    )
    exclude: str = field(
        default="", metadata={"help": "node or weight names (fnmatch patterns) to keep whole, ';'-separated"}
    )
    correct: bool = field(
        default=False, metadata={"help": "re-fit biases / BatchNorm statistics on calibration data"}
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self._check(ctx)
        patterns = [p.strip() for p in self.exclude.split(";") if p.strip()]
        needs_dense = self.correct or self.kind is StructuredKind.HEAD or self._taylor
        dense = to_model(graph) if needs_dense else None
        params_before = _model_params(graph)
        if self.kind is StructuredKind.HEAD:
            # Imported when asked for, like the correction: channel pruning needs neither.
            from polaris_opt.pruning.heads import prune_heads

            rows, skipped = prune_heads(graph, ctx, self.sparsity, self.importance.value, patterns, dense)
            # heads lists the block's q, k, v projections, then the output projection, which
            # is the one layer whose input lost channels.
            corrected = [(row["layers"][-1], None) for row in rows if row["removed"]]
        else:
            rows, skipped, corrected = self._prune_channels(graph, ctx, patterns, dense)
        modified = any(row["removed"] for row in rows)
        correction = self._correct(dense, graph, corrected, ctx) if self.correct and modified else []
        stats = _stats(rows, skipped, self.kind)
        stats.update(params_before=params_before, params_after=_model_params(graph))
        details = {"groups": rows, "skipped": skipped, "correction": correction}
        return PassResult(modified=modified, stats=stats, details=details)

    @property
    def _taylor(self) -> bool:
        return self.importance is ChannelImportance.TAYLOR

    def _check(self, ctx: PassContext) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise BadInput(f"prune-structured: sparsity {self.sparsity} is outside [0, 1); use e.g. 0.5")
        if self._taylor and ctx.calib is None:
            raise BadInput(
                "prune-structured: --importance taylor needs calibration data: "
                "give --calib DATA (a .npz, a folder, or 'random')"
            )
        if self.correct and ctx.calib is None:
            raise BadInput(
                "prune-structured: --correct needs calibration data: "
                "give --calib DATA (a .npz, a folder, or 'random')"
            )

    def _prune_channels(
        self, graph: gs.Graph, ctx: PassContext, patterns: list[str], dense: onnx.ModelProto | None
    ) -> tuple[list[dict], list[dict], list[tuple[str, np.ndarray | None]]]:
        groups, skipped = [], []
        for group in find_groups(graph):
            reason = _skip_reason(group, patterns)
            if reason is None:
                groups.append(group)
            else:
                skipped.append({"name": group.name, "reason": reason})
        scores = self._scores(groups, dense, ctx)
        removals = [channels_to_remove(g, s, self.sparsity) for g, s in zip(groups, scores, strict=True)]
        names = Names(graph)
        rows = []
        with ctx.progress("removing channels", len(groups)) as advance:
            for group, removed in zip(groups, removals, strict=True):
                if len(removed):
                    params = remove_channels(group, removed, names)
                else:
                    params = (touched_elements(group),) * 2
                rows.append(_row(group, removed, params))
                advance(1)
        return rows, skipped, _corrected_layers(graph, groups, removals)

    def _scores(
        self, groups: list[Group], dense: onnx.ModelProto | None, ctx: PassContext
    ) -> list[np.ndarray]:
        if not groups:
            return []
        if self._taylor:
            return taylor_importance(groups, dense, ctx.calib, threads=ctx.threads, progress=ctx.progress)
        return [norm_importance(group, self.kind.value, self.importance.value) for group in groups]

    def _correct(
        self,
        dense: onnx.ModelProto,
        graph: gs.Graph,
        layers: list[tuple[str, np.ndarray | None]],
        ctx: PassContext,
    ) -> list[dict[str, Any]]:
        from polaris_opt.pruning.correction import CorrectedLayer, correct_layers

        requested = [CorrectedLayer(node, kept=kept) for node, kept in layers]
        return correct_layers(dense, graph, requested, ctx.calib, threads=ctx.threads, progress=ctx.progress)


def _skip_reason(group: Group, patterns: list[str]) -> str | None:
    if not group.safe:
        return "; ".join(group.reasons[:3])
    if group.channel_count < 2:
        return "a single channel: nothing to remove"
    layers = [use.node for use in group.layers]
    names = [node.name for node in layers] + [node.inputs[1].name for node in layers]
    if any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names):
        return "excluded"
    return None


def _row(group: Group, removed: np.ndarray, params: tuple[int, int]) -> dict[str, Any]:
    return {
        "group": group.name,
        "channels_before": group.channel_count,
        "channels_after": group.channel_count - len(removed),
        "removed": [int(c) for c in removed],
        "producers": [node.name for node in group.nodes("producer")],
        "consumers": [node.name for node in group.nodes("consumer")],
        "params_before": params[0],
        "params_after": params[1],
    }


def _corrected_layers(
    graph: gs.Graph, groups: list[Group], removals: list[np.ndarray]
) -> list[tuple[str, np.ndarray | None]]:
    """Each layer whose inputs lost channels, in graph order, with the dense output channels it
    kept when it also lost some of those (a layer between two pruned groups)."""
    readers: set[int] = set()
    kept_outputs: dict[int, np.ndarray] = {}
    for group, removed in zip(groups, removals, strict=True):
        if not len(removed):
            continue
        for use in group.layers:
            if use.role == "consumer":
                readers.add(id(use.node))
            elif use.role == "producer":
                kept_outputs[id(use.node)] = kept_positions(use.member, removed)
    return [(node.name, kept_outputs.get(id(node))) for node in graph.nodes if id(node) in readers]


def _stats(rows: list[dict], skipped: list[dict], kind: StructuredKind) -> dict[str, int]:
    unit = "heads" if kind is StructuredKind.HEAD else "channels"
    return {
        "groups": sum(1 for row in rows if row["removed"]),
        "skipped": len(skipped),
        f"{unit}_before": sum(row[f"{unit}_before"] for row in rows),
        f"{unit}_after": sum(row[f"{unit}_after"] for row in rows),
    }


def _model_params(graph: gs.Graph) -> int:
    """Elements of the main graph's constants (weights, biases, per-channel parameters)."""
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in constants)
