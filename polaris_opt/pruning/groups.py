"""Channel dependency groups: which channels of which tensors go away together.

Removing output channel c of a Conv removes channel c from every tensor that carries it: the
BatchNormalization and activations after it, both sides of the residual Add it meets, and the
input columns of every layer that reads it. A *group* is that coupled set of (tensor, channel
axis) pairs, grown from one layer's output until it reaches, on every path, a layer that
reduces over the channels (a consumer) or a layer that makes them (a producer).

This module holds what a group is: its members, the layers and constants a rewrite touches,
the reasons it may be unsafe, and the channel ids that tie its members together. Groups are
found by polaris_opt.pruning.group_search (find_groups, the weight layers that bound a group)
with polaris_opt.pruning.group_coupling (how each op between layers couples channels).

Channel ids. Each member tensor holds, per position along its channel axis, the id of the
group channel found there. Coupling two tensors (a residual Add) unites their ids position by
position (union-find), so the group's channels are the distinct roots and "remove channel k"
means "remove every position whose id has root k", in every member at once. This also covers:

- Concat along the channel axis: the output's ids are its inputs' ids side by side; inputs
  reached through the Concat get new ids, so the group's channel count is the output's.
- Flatten after a spatial tensor: channel c of [N, C, H, W] becomes features c·H·W ... c·H·W +
  H·W − 1, so the Flatten output repeats each channel's id H·W times (static H·W needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(eq=False)
class Member:
    """A tensor of the group: its channel axis (negative, counted from the last) and ids."""

    tensor: gs.Variable
    axis: int
    rank: int | None
    ids: np.ndarray
    # Filled when the group is finished: the group channel (0 .. count-1) at each position.
    channels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def absolute_axis(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis


@dataclass(eq=False)
class LayerUse:
    """A weight layer of the group. Its weight's `weight_axis` runs along `member`'s channels:
    output rows of a producer or depthwise Conv, input slices of a consumer."""

    node: gs.Node
    role: str  # "producer" | "consumer" | "depthwise"
    member: Member
    weight_axis: int


@dataclass(eq=False)
class ConstantSlice:
    """Constant input `index` of `node` keeps, along `axis`, the positions `member` keeps."""

    node: gs.Node
    index: int
    axis: int
    member: Member


@dataclass(eq=False)
class SizeEntry:
    """Entry `entry` of the 1-D constant input `index` of `node` (Resize sizes) is `member`'s count."""

    node: gs.Node
    index: int
    entry: int
    member: Member


@dataclass(eq=False)
class Group:
    """A set of coupled channel tensors, what rewriting them touches, and why it may be unsafe."""

    members: dict[str, Member] = field(default_factory=dict)
    layers: list[LayerUse] = field(default_factory=list)
    slices: list[ConstantSlice] = field(default_factory=list)
    sizes: list[SizeEntry] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    channel_count: int = 0

    @property
    def name(self) -> str:
        """The seed layer's name (its output's name when it has none)."""
        producers = self.nodes("producer")
        return node_label(producers[0]) if producers else next(iter(self.members))

    @property
    def safe(self) -> bool:
        return not self.reasons

    def nodes(self, role: str) -> list[gs.Node]:
        return [use.node for use in self.layers if use.role == role]

    # Union-find over channel ids; the smaller id stays the root, so the seed layer's output
    # channels keep their own numbers as group channels.
    def fresh(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def finish(self) -> None:
        """Number the group channels 0..count-1 and give every member its channel per position."""
        roots = {name: np.array([self.find(i) for i in m.ids], np.int64) for name, m in self.members.items()}
        distinct = np.unique(np.concatenate(list(roots.values()))) if roots else np.zeros(0, np.int64)
        self.channel_count = len(distinct)
        for name, member in self.members.items():
            member.channels = np.searchsorted(distinct, roots[name])


def node_label(node: gs.Node) -> str:
    """How a reason names a node: its name, or its first output's when it has none."""
    return node.name or (node.outputs[0].name if node.outputs else node.op)
