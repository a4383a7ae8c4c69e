"""Run the contenders interleaved, each in its own worker process (polaris_opt/bench/worker.py).

Contenders of one batch run together: every worker opens its session (in parallel), then each
warms up in turn, then they take turns A B A B ... until each has its runs (or its seconds), so
drift on a shared machine (another job starting, the clock changing) falls on all of them
alike. A turn is a short block of runs, about TURN_SECONDS long, rather than a single run: a
round trip to a worker that has slept through the others' turns costs 0.2-0.4 ms on this
project's 2-core virtual machines (mostly waking the process up), which stays out of the
samples (timing happens in the worker) but would otherwise double the bench's time on small
models.
Batches run one after another, each with fresh workers, so a worker's peak RSS is that of its
own batch.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from polaris_opt.bench import DEFAULT_RUNS, DEFAULT_WARMUP
from polaris_opt.bench.feeds import Feeds
from polaris_opt.bench.models import BenchModel
from polaris_opt.bench.process import WorkerProcess
from polaris_opt.bench.worker import Job

# A turn's length: short enough that drift slower than ~0.1 s falls on every contender alike,
# long enough that the round trip to a worker (0.2-0.4 ms, mostly waking it up) adds only about
# 2 % to the bench's time (median 1.8 % on models of 1 ms and more), outside the samples.
TURN_SECONDS = 0.02
# A warm-up of N runs also lasts at least this long: runs 6-10 of a fresh session of the digits
# models (10-40 us a run) were still up to 1.6x slower than its steady state; 0.1 s of them is
# thousands of runs there, and one or two runs more for a model of 10 ms or more.
WARMUP_SECONDS = 0.1
# Every turn starts with untimed runs, at least one and for at least this long: the first run
# after the other contenders' turns finds the caches cold (polaris_opt/bench/worker.py). Each
# zoo model against itself at batch 1 and 8, alternating with and without it (two sessions of
# benchmarks/bench_bench.py): p90/p50 > 1.2 for 11 and 12 of 20 contenders without, 5 and 9
# with; median p90/p50 1.22 without, 1.07 and 1.16 with. Runs of REWARM_BELOW or more skip it:
# the cold run's extra ~0.13 ms is then at most ~1 % of a run, the same in every run, while a
# re-warm run per turn would double the bench's time (such a model runs one run per turn).
REWARM_SECONDS = 0.001
REWARM_BELOW = 0.01
# Even when a contender's runs would fit in one turn, they are spread over this many turns at
# least, so that they are interleaved with the others' and not run all in one block.
MIN_TURNS = 10


@dataclass(frozen=True)
class Contender:
    model: BenchModel
    runtime: str  # "ort" | "polaris"
    batch: int

    def label(self) -> str:
        return f"{self.model.path} ({self.runtime}, batch {self.batch})"


@dataclass(frozen=True)
class Settings:
    """How every contender runs; `runs` and `seconds` are exclusive (seconds: measured time each)."""

    threads: int = 1
    warmup: int = DEFAULT_WARMUP
    runs: int | None = DEFAULT_RUNS
    seconds: float | None = None
    device: str | None = None  # the polaris runtime's OpenCL device spec
    pin: bool = True  # run every contender on the same CPUs (see `worker_cpus`)


@dataclass
class Measured:
    """One contender's samples, as its worker measured them."""

    contender: Contender
    times: list[float] = field(default_factory=list)  # seconds in session.run, per measured run
    measured_s: float = 0.0  # their sum, kept as it grows (--seconds compares it after every turn)
    overhead_s: float = 0.0  # the worker's time in the measured turns outside session.run
    transit_s: float = 0.0  # the measured turns' round trips less the worker's time in them
    peak_rss_mb: float = 0.0
    device: str | None = None  # the OpenCL device of the polaris runtime, if it opened one
    per_run_estimate: float | None = None  # from the warm-up: sizes the turns


def run_bench(
    pairs: list[tuple[BenchModel, str]],
    feeds_by_batch: dict[int, Feeds],
    settings: Settings,
    advance: Callable[[int], None] | None = None,
) -> list[Measured]:
    """Every (model, runtime) at every batch; results ordered by batch, then as `pairs`."""
    measured = []
    for batch, feeds in feeds_by_batch.items():
        group = [Contender(model, runtime, batch) for model, runtime in pairs]
        measured += measure_group(group, feeds, settings, advance or (lambda n: None))
    return measured


def measure_group(
    contenders: list[Contender], feeds: Feeds, settings: Settings, advance: Callable[[int], None]
) -> list[Measured]:
    """Contenders of one batch, interleaved turn by turn after each one's warm-up."""
    with _started(contenders, feeds, settings) as workers:
        for worker in workers:
            worker.warm_up(settings.warmup)
            advance(settings.warmup)
        while any(worker.wants_more(settings) for worker in workers):
            for worker in workers:
                count = worker.next_turn(settings)
                if count:
                    worker.run_turn(count)
                    advance(count)
        for worker in workers:
            worker.finish()
        return [worker.measured for worker in workers]


def turn_size(per_run: float | None, done: int, settings: Settings) -> int:
    """Runs in the next turn: about TURN_SECONDS of them at `per_run` seconds each (one when that
    is not known yet), at most a MIN_TURNS-th of --runs, and no more than are left to do."""
    count = max(1, round(TURN_SECONDS / per_run)) if per_run else 1
    if settings.runs is not None:
        count = min(count, math.ceil(settings.runs / MIN_TURNS), settings.runs - done)
    return count


def worker_cpus(threads: int) -> tuple[int, ...] | None:
    """The CPUs every worker is pinned to: the last `threads` of those this process may use.

    All contenders on the same CPUs, so a CPU that is slower than the others (a busy neighbour
    on its host core: on this project's VMs a CPU runs digits_cnn in 26 or 44 us by the second)
    slows them all alike. Left to the scheduler, each worker kept to a CPU of its own, and a
    model benched against itself came out up to 1.55-1.57x faster than itself (the worst of 20
    such pairs, in each of two sessions of benchmarks/bench_bench.py); pinned together, 1.03x
    and 1.15x. The last CPUs, since the first usually take the interrupts. None where the
    system cannot pin.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return tuple(allowed[-threads:])


class _Worker:
    """One contender's measurements, and the process that makes them."""

    def __init__(self, contender: Contender):
        self.measured = Measured(contender)
        self.process = WorkerProcess(contender.label())

    def open(self, feeds: Feeds, settings: Settings) -> None:
        """Ask the worker to open its session; `opened` waits for it (so sessions open in parallel)."""
        contender = self.measured.contender
        cpus = worker_cpus(settings.threads) if settings.pin else None
        job = Job(
            str(contender.model.path), contender.runtime, settings.threads, settings.device, feeds, cpus
        )
        self.process.send("open", job)

    def opened(self) -> None:
        self.measured.device = self.process.receive()[1]

    def warm_up(self, count: int) -> None:
        if count:
            times = self.process.ask("run", count, WARMUP_SECONDS)[1]
            # The first calls allocate and build; the rest say what a run costs now.
            self.measured.per_run_estimate = statistics.median(times[1:] or times)

    def wants_more(self, settings: Settings) -> bool:
        if settings.seconds is not None:
            return self.measured.measured_s < settings.seconds
        return len(self.measured.times) < settings.runs

    def next_turn(self, settings: Settings) -> int:
        if not self.wants_more(settings):
            return 0
        return turn_size(self.measured.per_run_estimate, len(self.measured.times), settings)

    def run_turn(self, count: int) -> None:
        estimate = self.measured.per_run_estimate
        rewarm = REWARM_SECONDS if estimate is None or estimate < REWARM_BELOW else None
        started = time.perf_counter()
        _, times, rewarmed, turn = self.process.ask("run", count, rewarm)
        self.measured.transit_s += time.perf_counter() - started - turn
        self.measured.overhead_s += turn - rewarmed - sum(times)
        self.measured.times += times
        self.measured.measured_s += sum(times)
        if self.measured.per_run_estimate is None:
            self.measured.per_run_estimate = statistics.median(times)

    def finish(self) -> None:
        self.measured.peak_rss_mb = self.process.ask("finish")[1]


@contextmanager
def _started(contenders: list[Contender], feeds: Feeds, settings: Settings) -> Iterator[list[_Worker]]:
    """Workers with open sessions; stopped on the way out, whatever happened."""
    workers: list[_Worker] = []
    try:
        for contender in contenders:
            workers.append(_Worker(contender))
        for worker in workers:
            worker.open(feeds, settings)
        for worker in workers:
            worker.opened()
        yield workers
    finally:
        for worker in workers:
            worker.process.stop()
