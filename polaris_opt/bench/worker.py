"""One contender's worker process: opens one session and times its runs when the parent says so.

Each contender runs in a process of its own (a fresh interpreter, polaris_opt/bench/process.py)
for two reasons: its peak RSS (VmHWM) is then its own and nobody else's, and all timing
happens here, with `perf_counter` around `session.run` only, so talking to the parent never
lands in a sample. The worker also times the whole turn, from the request's arrival to the
reply, so the parent can tell the bench's own time per run (the turn less the model's runs:
the loop, the clock reads, pausing the collector) from the time the request and the reply
spend in transit, which on a virtual machine is mostly waking a sleeping process.

Messages (tuples over a multiprocessing Connection), parent → worker:
    ("open", Job)        → ("ready", OpenCL device name or None)
    ("run", count, rewarm seconds or None)
                         → ("times", [seconds per run], seconds re-warming, seconds in the turn)
    ("finish",)          → ("done", peak RSS in MB)
    and ("error", exit code, message) in place of any reply.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Job:
    """What a worker runs: a model file on a runtime, with fixed threads and inputs."""

    model: str
    runtime: str  # "ort" | "polaris"
    threads: int
    device: str | None  # the polaris runtime's OpenCL device spec; None: the best one
    feeds: dict[str, np.ndarray]
    cpus: tuple[int, ...] | None = None  # the CPUs to run on (with every thread); None: any


def main() -> None:
    """The worker process's entry: its end of the channel is the file descriptor in argv[1]."""
    from multiprocessing.connection import Connection

    serve(Connection(int(sys.argv[1])))


def serve(connection) -> None:
    """The worker's main loop: answer the parent's requests until it says finish or goes away."""
    try:
        job = connection.recv()[1]
        session, device_name = _open(job)
        run = functools.partial(session.run, None, job.feeds)  # no frame of ours inside the timing
        connection.send(("ready", device_name))
        while True:
            request = connection.recv()
            if request[0] == "finish":
                connection.send(("done", peak_rss_mb()))
                return
            started = time.perf_counter()
            times, rewarmed = timed_turn(run, request[1], request[2])
            turn = time.perf_counter() - started
            connection.send(("times", times, rewarmed, turn))
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the parent has gone or is stopping: nothing to report to
    except BaseException as error:  # noqa: BLE001 - sent to the parent, which reports it in one line
        connection.send(("error", _exit_code(error), _first_line(error)))


def _open(job: Job):
    """The job's session and the name of the OpenCL device it uses (None: no device)."""
    if job.cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, job.cpus)  # before the session starts threads, which inherit it
    if job.runtime == "polaris":
        from polaris_opt.runtime import Session

        session = Session(job.model, job.device, threads=job.threads)
        return session, session.device_name
    from polaris_opt.numerics import make_session

    return make_session(job.model, threads=job.threads), None


def timed_turn(run, count: int, rewarm_seconds: float | None) -> tuple[list[float], float]:
    """One turn: untimed re-warming runs, then `count` calls of `run`, each timed alone.

    Returns the times and the seconds spent re-warming. With `rewarm_seconds` (not None) the
    turn first runs for that long, and at least once, untimed: the other contenders' turns
    have evicted this model from the caches, and its first run back is slower (resnet_s at
    batch 1: 610 us against a median of 480 us), which in 1 run of 10 would be the p90 itself.
    The garbage collector is paused for the turn, so that no collection lands in a sample.
    """
    times = [0.0] * count
    clock = time.perf_counter
    collecting = gc.isenabled()
    gc.disable()
    try:
        started = clock()
        while rewarm_seconds is not None:
            run()
            if clock() - started >= rewarm_seconds:
                break
        rewarmed = clock() - started
        for index in range(count):
            before = clock()
            run()
            times[index] = clock() - before
    finally:
        if collecting:
            gc.enable()
    return times, rewarmed


def peak_rss_mb() -> float:
    """This process's peak resident set in MB: VmHWM, which starts afresh in a new process.

    ru_maxrss is not used where /proc is there: Linux carries a parent's peak over fork + exec.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _exit_code(error: BaseException) -> int:
    from polaris_opt.errors import PolarisError

    if isinstance(error, PolarisError):
        return error.exit_code
    # ONNX Runtime's own errors (Fail, InvalidGraph, InvalidArgument, ...) say the model cannot
    # run on these inputs: bad input, not a fault of ours.
    return 2 if type(error).__module__.startswith("onnxruntime") else 3


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text[:300]
