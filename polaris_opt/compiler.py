"""The pipeline driver: load ─► [pass ─► verify]* ─► save, timing every pass (DESIGN.md §2)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from polaris_opt.errors import PassFailed, PolarisError
from polaris_opt.export import to_graph, to_model
from polaris_opt.passes_api import PassContext, Stat
from polaris_opt.pipeline import Pipeline
from polaris_opt.surgery import iter_graphs
from polaris_opt.verify import Verifier, VerifyMode


@dataclass
class PassReport:
    """What one pass did: for the per-pass table and --json."""

    step: str
    seconds: float
    modified: bool
    stats: dict[str, Stat]
    nodes_before: int
    nodes_after: int
    verify_seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class CompileResult:
    model: onnx.ModelProto
    pipeline: str
    reports: list[PassReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verify: VerifyMode = VerifyMode.STRUCTURE


def run_pipeline(
    model: onnx.ModelProto,
    pipeline: Pipeline,
    *,
    ctx: PassContext | None = None,
    verify: VerifyMode = VerifyMode.STRUCTURE,
    feeds: dict[str, np.ndarray] | None = None,
    dump_dir: Path | None = None,
    on_pass: Callable[[PassReport], None] | None = None,
) -> CompileResult:
    """Run every pass of `pipeline` over `model`, verifying after each one; returns the new model."""
    ctx = ctx or PassContext()
    graph = to_graph(model)
    verifier = Verifier.for_input(model, graph, verify, feeds, seed=ctx.seed)
    result = CompileResult(model, pipeline.text(), warnings=list(verifier.warnings), verify=verifier.mode)
    for index, (step, pass_) in enumerate(pipeline.passes(), start=1):
        report, graph = _run_one(step, pass_, graph, ctx)
        started = time.perf_counter()
        verifier.check(graph, model, pass_.name, lossy=type(pass_).lossy)
        report.verify_seconds = time.perf_counter() - started
        if dump_dir is not None:
            onnx.save_model(to_model(graph, model), str(dump_dir / f"{index:02d}-{pass_.name}.onnx"))
        result.reports.append(report)
        if on_pass:
            on_pass(report)
    result.model = to_model(graph, model)
    return result


def _run_one(step: str, pass_, graph, ctx: PassContext):
    nodes_before = count_nodes(graph)
    started = time.perf_counter()
    try:
        outcome = pass_.run(graph, ctx)
    except PolarisError:
        raise
    except Exception as exc:  # noqa: BLE001 - any crash inside a pass is reported against that pass
        raise PassFailed(pass_.name, f"{type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - started
    graph = outcome.graph if outcome.graph is not None else graph
    report = PassReport(
        step,
        seconds,
        outcome.modified,
        dict(outcome.stats),
        nodes_before,
        count_nodes(graph),
        details=dict(outcome.details),
    )
    return report, graph


def count_nodes(graph) -> int:
    """Nodes in a graph and all its sub-graphs."""
    return sum(len(g.nodes) for g in iter_graphs(graph))
