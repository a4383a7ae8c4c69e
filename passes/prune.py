"""prune: the least important weights of Conv/ConvTranspose/Gemm/MatMul layers become zeros.

The graph keeps its shape: only weight values change (a later pass or the sparse runtime turns
the zeros into smaller storage and faster kernels). Each weight is seen as a matrix [output
features, reduction] (polaris_opt.pruning.targets) and pruned to a pattern:

- unstructured: any weights; exactly round(sparsity·size) per layer (per model with scope=global).
- N:M (2:4, 4:8): N kept of every M consecutive weights along the reduction; the sparsity is 1 - N/M.
- block:RxC: whole R×C blocks, ranked by the norm of their scores.

A dimension that is not a multiple of M or of the block counts as padded with zeros, and the
padding counts as pruned (polaris_opt.pruning.patterns).

Which weights go is decided by the method: magnitude (|W|), wanda (|W|·‖X_j‖ compared within
each output, from calibration data) or sparsegpt (prunes and updates the remaining weights of a
layer to make up for the pruned ones, from XᵀX of its input). A layer whose input statistics
cannot be collected (inside If/Loop, ConvTranspose) falls back to magnitude, and its row says so.
scope=global shares one budget across layers (polaris_opt.pruning.allocation), no layer beyond
max-layer-sparsity; for wanda and sparsegpt the shared ranking uses wanda's scores, always from
the dense model, so the budget is decided once.

sparsegpt prunes sequentially by default, as its paper does (Frantar & Alistarh 2023, §3):
layers go in rounds (polaris_opt.pruning.targets.layer_rounds: a layer
comes one round after the latest layer upstream of it), and the statistics of a round are taken,
in one streaming pass, from the model whose earlier rounds are already pruned, so each layer is
pruned for the inputs it will see rather than for the dense ones. sparsegpt goes one step
further and makes up for the error upstream: before pruning a layer it re-fits the layer's
weights so that, from those inputs, they give the dense model's layer output (damped least
squares from X_refᵀX, polaris_opt.pruning.activations.fit_to_reference; the dense model runs
beside the pruned one in the same pass). Measured on the held-out sets at 50 % that lifts output
SQNR from 20.0 to 23.3 dB on digits_mlp and from 10.4 to 18.6 dB on digits_cnn; fitting to the
pruned inputs alone gained 0.1-0.4 dB. Sequential pruning costs one pass over the calibration
data per round (plus one over the dense model for scope=global) instead of one in all;
sequential=false takes every layer's statistics from the dense model in a single pass.

wanda always reads the dense model's statistics, in one pass. It changes no weight, so layer by
layer it could only re-rank by the norms of the pruned inputs, and on the zoo that was worse:
it beat magnitude in 25 of 40 (model, pattern, sparsity) cells that way against 33 of 40 from
the dense model (benchmarks/bench_prune.py, docs/BENCHMARKS.md).

Weights keep their dtype, and a weight shared by several layers is pruned once, so every reader
sees the same zeros. With correct=true each pruned layer's per-channel scale and bias (or the
BatchNormalization after it) are re-fitted on the calibration data (polaris_opt.pruning.correction).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.errors import BadInput
from polaris_opt.export import to_model
from polaris_opt.passes_api import Pass, PassContext, PassResult
from polaris_opt.pruning.allocation import global_sparsities
from polaris_opt.pruning.patterns import Pattern, block_scores, select
from polaris_opt.pruning.targets import PruneTarget, find_targets, target_rounds
from polaris_opt.surgery import Names

CALIB_HINT = "give --calib DATA (a .npz, a folder, or 'random')"
# An N:M pattern accepts a sparsity this close to 1 - N/M (0.667 for 1:3).
NM_SPARSITY_TOLERANCE = 1e-3
# What a layer's row takes from its correction row (the full rows are in details["correction"]).
CORRECTION_KEYS = ("refit", "sqnr_before_db", "sqnr_after_db", "gain_db")


class PruneMethod(str, enum.Enum):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"


class PruneScope(str, enum.Enum):
    LOCAL = "local"
    GLOBAL = "global"


@dataclass(frozen=True)
class Prune(Pass):
    """Conv/Gemm/MatMul weights  ⇒  the same weights with the least important set to zero.

    With `sequential` (the default; sparsegpt only) the layers are pruned round by round, each
    round's input statistics taken from the model with the rounds before it already pruned, and
    each layer is first re-fitted to the dense model's outputs; sequential=false takes them all
    from the dense model in one pass.
    """

    name: ClassVar[str] = "prune"
    lossy: ClassVar[bool] = True

    sparsity: float = field(
        default=0.5,
        metadata={"help": "fraction of the weights set to zero, in [0, 1); an N:M pattern needs 1 - N/M"},
    )
    method: PruneMethod = field(
        default=PruneMethod.MAGNITUDE,
        metadata={
            "help": "magnitude: |W|; wanda: |W|·‖X‖ per output; sparsegpt: prune and update the rest "
            "(wanda and sparsegpt need --calib)"
        },
    )
    scope: PruneScope = field(
        default=PruneScope.LOCAL,
        metadata={"help": "local: every layer at the sparsity; global: one budget ranked across layers"},
    )
    pattern: str = field(
        default="unstructured",
        metadata={
            "help": "unstructured, N:M (2:4 keeps 2 of every 4 along the reduction) or block:RxC; "
            "a partial group or block at an edge counts its padding as pruned"
        },
    )
    max_layer_sparsity: float = field(
        default=0.99, metadata={"help": "scope=global: no layer pruned beyond this fraction, in (0, 1]"}
    )
    exclude: str = field(
        default="", metadata={"help": "node or weight names (fnmatch patterns) to keep dense, ';'-separated"}
    )
    skip_first_last: bool = field(
        default=False, metadata={"help": "keep the first and the last prunable layer dense"}
    )
    correct: bool = field(
        default=False,
        metadata={"help": "re-fit each pruned layer's bias (or BatchNormalization) on --calib data"},
    )
    damp: float = field(
        default=0.01, metadata={"help": "sparsegpt: fraction of mean(diag XᵀX) added to its diagonal"}
    )
    block_size: int = field(default=128, metadata={"help": "sparsegpt: columns solved together"})
    sequential: bool = field(
        default=True,
        metadata={
            "help": "sparsegpt: prune layer by layer, each re-fitted to the dense outputs from the "
            "inputs the layers before it (already pruned) give it; one calibration pass per round "
            "instead of one in all"
        },
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        pattern = self._check_options(ctx)
        targets, skipped = find_targets(
            graph, [p for p in self.exclude.split(";") if p], self.skip_first_last
        )
        _check_finite(targets)
        _name_unnamed_readers(graph, targets)
        needs_dense = bool(targets) and (self.correct or self.method is not PruneMethod.MAGNITUDE)
        dense = to_model(graph) if needs_dense else None
        if self.sequential and self.method is PruneMethod.SPARSEGPT and targets:
            outcomes = self._prune_sequentially(graph, targets, pattern, dense, ctx)
        else:
            outcomes = self._prune_at_once(targets, pattern, dense, ctx)
        rows = [row for row, _ in outcomes]
        pruned = [target for target, (_, changed) in zip(targets, outcomes, strict=True) if changed]
        details: dict[str, Any] = {"layers": rows, "skipped": skipped}
        if self.correct and pruned:
            details["correction"] = _correct(dense, graph, pruned, rows, ctx)
        return PassResult(modified=bool(pruned), stats=_totals(rows, skipped), details=details)

    # ------------------------------------------------------------------------------ options

    def _check_options(self, ctx: PassContext) -> Pattern:
        if not 0 <= self.sparsity < 1:
            raise BadInput(
                f"prune: sparsity {self.sparsity} is outside [0, 1); give the fraction of weights to zero, "
                "such as 0.5"
            )
        if not 0 < self.max_layer_sparsity <= 1:
            raise BadInput(
                f"prune: max-layer-sparsity {self.max_layer_sparsity} is outside (0, 1]; such as 0.99"
            )
        pattern = Pattern.parse(self.pattern)
        fixed = pattern.fixed_sparsity
        if fixed is not None and not math.isclose(self.sparsity, fixed, abs_tol=NM_SPARSITY_TOLERANCE):
            raise BadInput(
                f"prune: pattern {pattern.text()} means sparsity {fixed:.4g} (keeps {pattern.n} of every "
                f"{pattern.m} weights), not {self.sparsity}; give sparsity {fixed:.4g} or leave it out"
            )
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise BadInput(f"prune: damp {self.damp} must be a positive number such as 0.01")
        if self.block_size < 1:
            raise BadInput(f"prune: block-size {self.block_size} must be a positive number of columns")
        if self.method is not PruneMethod.MAGNITUDE and ctx.calib is None:
            raise BadInput(f"prune: --method {self.method.value} needs calibration data: {CALIB_HINT}")
        if self.correct and ctx.calib is None:
            raise BadInput(f"prune: --correct needs calibration data: {CALIB_HINT}")
        return pattern

    # --------------------------------------------------------------------------- orders

    def _prune_at_once(
        self, targets: list[PruneTarget], pattern: Pattern, dense: onnx.ModelProto | None, ctx: PassContext
    ) -> list[tuple[dict, bool]]:
        """Every layer from the dense model's statistics (one pass): (row, changed) per target."""
        statistics = self._statistics(dense, targets, ctx)
        sparsities = self._layer_sparsities(targets, statistics, pattern)
        outcomes = []
        with ctx.progress(f"pruning ({self.method.value}, {pattern.text()})", len(targets)) as advance:
            for target, sparsity in zip(targets, sparsities, strict=True):
                outcomes.append(self._prune(target, pattern, sparsity, statistics.get(target.name), ctx))
                advance(1)
        return outcomes

    def _prune_sequentially(
        self,
        graph: gs.Graph,
        targets: list[PruneTarget],
        pattern: Pattern,
        dense: onnx.ModelProto,
        ctx: PassContext,
    ) -> list[tuple[dict, bool]]:
        """Round by round, each round from the statistics of the graph pruned so far."""
        rounds = target_rounds(graph, targets)
        allocation = self._allocation_statistics(dense, targets, pattern, ctx)
        sparsities = self._layer_sparsities(targets, allocation, pattern)
        outcomes: dict[int, tuple[dict, bool]] = {}  # by position in `targets`
        with ctx.progress("pruning layer by layer", max(rounds) + 1) as advance:
            for number in range(max(rounds) + 1):
                members = [index for index, r in enumerate(rounds) if r == number]
                statistics = self._round_statistics(
                    number, graph, dense, [targets[i] for i in members], allocation, ctx
                )
                for i in members:
                    stats = statistics.get(targets[i].name)
                    outcomes[i] = self._prune(targets[i], pattern, sparsities[i], stats, ctx)
                advance(1)
        return [outcomes[i] for i in range(len(targets))]

    # ------------------------------------------------------------------------ statistics

    def _statistics(
        self,
        model: onnx.ModelProto | None,
        targets: list[PruneTarget],
        ctx: PassContext,
        diagonal_only: bool | None = None,
        reference: onnx.ModelProto | None = None,
    ) -> dict:
        """Input statistics of `targets` in `model` by target name: XᵀX for sparsegpt, its diagonal
        for wanda (or as `diagonal_only` says), and X_refᵀX with a `reference`; {} for magnitude."""
        if self.method is PruneMethod.MAGNITUDE or not targets:
            return {}
        from polaris_opt.pruning.activations import layer_statistics

        return layer_statistics(
            model,
            targets,
            ctx.calib,
            reference=reference,
            diagonal_only=self.method is PruneMethod.WANDA if diagonal_only is None else diagonal_only,
            threads=ctx.threads,
            progress=ctx.progress,
        )

    def _allocation_statistics(
        self, dense: onnx.ModelProto, targets: list[PruneTarget], pattern: Pattern, ctx: PassContext
    ) -> dict:
        """Sequential scope=global: the dense model's column norms, which rank the layers against
        each other once, before anything is pruned; {} where no allocation is made."""
        if self.scope is PruneScope.LOCAL or pattern.kind == "nm":
            return {}
        return self._statistics(dense, targets, ctx, diagonal_only=True)

    def _round_statistics(
        self,
        number: int,
        graph: gs.Graph,
        dense: onnx.ModelProto,
        members: list[PruneTarget],
        allocation: dict,
        ctx: PassContext,
    ) -> dict:
        """The statistics round `number` prunes `members` from: those of the graph pruned so far,
        for sparsegpt against the dense model's (X_refᵀX), to fit each layer to the dense outputs."""
        if number > 0:
            return self._statistics(to_model(graph), members, ctx, reference=dense)
        return self._statistics(dense, members, ctx)  # nothing is pruned yet: the dense model

    def _method_for(self, stats) -> PruneMethod:
        """The method a layer is pruned with: magnitude where its statistics are missing."""
        if self.method is PruneMethod.SPARSEGPT and (stats is None or stats.hessian is None):
            return PruneMethod.MAGNITUDE
        if self.method is PruneMethod.WANDA and stats is None:
            return PruneMethod.MAGNITUDE
        return self.method

    # ------------------------------------------------------------------------ allocation

    def _layer_sparsities(
        self, targets: list[PruneTarget], statistics: dict, pattern: Pattern
    ) -> list[float]:
        """The sparsity each layer is pruned at: the option itself, or scope=global's allocation."""
        if self.scope is PruneScope.LOCAL or pattern.kind == "nm" or not targets:
            return [self.sparsity] * len(targets)
        ranked = []
        for target in targets:
            scores = _ranking_scores(target.matrix(), statistics.get(target.name))
            ranked.append(block_scores(scores, pattern) if pattern.kind == "block" else scores)
        return global_sparsities(ranked, self.sparsity, self.max_layer_sparsity)

    # --------------------------------------------------------------------------- pruning

    def _prune(
        self, target: PruneTarget, pattern: Pattern, sparsity: float, stats, ctx: PassContext
    ) -> tuple[dict, bool]:
        """Prune one weight in place; returns its details row and whether its values changed."""
        matrix = target.matrix()
        nonzeros_before = int(np.count_nonzero(matrix))
        method = self._method_for(stats)
        if method is not self.method:
            ctx.log.warning(
                "prune: no calibration statistics for '%s' (%s); pruned by magnitude",
                target.node.name,
                target.op,
            )
        if method is PruneMethod.SPARSEGPT:
            from polaris_opt.pruning.activations import fit_to_reference
            from polaris_opt.pruning.sparsegpt import sparsegpt

            work = matrix.astype(np.float32) if matrix.dtype == np.float16 else matrix
            if stats.cross is not None:  # sequential: first make up for the layers pruned upstream
                work = fit_to_reference(work, stats, self.damp)
            result = sparsegpt(
                work, stats.hessian, pattern, sparsity, block_size=self.block_size, damp=self.damp
            )
            changed = not np.array_equal(result, matrix)
        else:
            scores = _ranking_scores(matrix, stats) if method is PruneMethod.WANDA else np.abs(matrix)
            keep = select(scores, pattern, sparsity, per_row=method is PruneMethod.WANDA)
            del scores
            result = matrix
            result[~keep] = 0
            changed = int(np.count_nonzero(result)) != nonzeros_before
        if changed:
            target.set_matrix(result)
        nonzeros_after = int(np.count_nonzero(target.weight.values))
        return _row(target, pattern, method, nonzeros_before, nonzeros_after), changed


# ------------------------------------------------------------------------------- helpers


def _ranking_scores(matrix: np.ndarray, stats) -> np.ndarray:
    """Wanda's |W_ij|·‖X_j‖ where input statistics exist, else |W|."""
    if stats is None:
        return np.abs(matrix)
    from polaris_opt.pruning.wanda import wanda_scores

    return wanda_scores(matrix, stats.sq_norms)


def _check_finite(targets: list[PruneTarget]) -> None:
    # Checked before any weight changes, so a bad weight leaves the graph as it was.
    for target in targets:
        if not np.all(np.isfinite(target.weight.values)):
            raise BadInput(
                f"prune: weight '{target.name}' of node '{target.node.name}' holds NaN or Inf; "
                f"fix the model or keep the node dense with exclude={target.node.name or target.name}"
            )


def _name_unnamed_readers(graph: gs.Graph, targets: list[PruneTarget]) -> None:
    """Give a fresh name to each prunable node that has none: report rows and the correction
    find a layer by its node name."""
    names = Names(graph)
    for target in targets:
        for node in target.nodes:
            if not node.name:
                node.name = names.fresh(node.op)


def _row(target: PruneTarget, pattern: Pattern, method: PruneMethod, before: int, after: int) -> dict:
    values = target.weight.values
    return {
        "layer": target.node.name,
        "nodes": [node.name for node in target.nodes],
        "weight": target.name,
        "op": target.op,
        "pattern": pattern.text(),
        "method": method.value,
        "shape": list(values.shape),
        "params": int(values.size),
        "nonzeros_before": before,
        "nonzeros_after": after,
        "sparsity": 1 - after / values.size if values.size else 0.0,
        "bytes": int(values.nbytes),
    }


def _totals(rows: list[dict], skipped: list[dict]) -> dict[str, int | float]:
    params = sum(row["params"] for row in rows)
    after = sum(row["nonzeros_after"] for row in rows)
    return {
        "layers": len(rows),
        "skipped": len(skipped),
        "params": params,
        "nonzeros_before": sum(row["nonzeros_before"] for row in rows),
        "nonzeros_after": after,
        "sparsity": 1 - after / params if params else 0.0,
    }


def _correct(
    dense: onnx.ModelProto, graph: gs.Graph, pruned: list[PruneTarget], rows: list[dict], ctx: PassContext
) -> list[dict]:
    """Re-fit every reader of a pruned weight; merges each layer's correction into its row."""
    from polaris_opt.pruning.correction import CorrectedLayer, correct_layers

    layers = [CorrectedLayer(node.name) for target in pruned for node in target.nodes]
    corrections = correct_layers(dense, graph, layers, ctx.calib, threads=ctx.threads, progress=ctx.progress)
    by_layer = {correction["layer"]: correction for correction in corrections}
    for row in rows:
        found = by_layer.get(row["layer"])
        if found is not None:
            row.update({key: found[key] for key in CORRECTION_KEYS if key in found})
    return corrections
