"""`Session`: run a model with ai.polaris nodes like `onnxruntime.InferenceSession` runs any model.

The model is partitioned once (polaris_opt/runtime/partition.py): runs of standard nodes become
ONNX Runtime sub-sessions, each ai.polaris node a kernel launch on the OpenCL device or a call
of its NumPy reference on the host, chosen per node and per run by polaris_opt/runtime/scheduler.py.
A model without ai.polaris nodes is one plain ONNX Runtime session, with nothing added in between.

Tensors move between host and device only when a step on the other side reads them: a chain of
device nodes keeps its activations on the device. Weights are uploaded once, when the launchers
are built. A run allocates no device memory once its shapes have been seen: uploads go into
staging arrays and launches write into output arrays that each thread keeps across its runs,
and only the reads back to the host are waited for, once per step (RunValues says why).
`run()` may be called from several threads: each run keeps its tensors to itself (kept device
arrays are per thread, results are new host arrays), ONNX Runtime sessions are thread-safe,
and device work is serialised by one lock per session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from polaris_opt.errors import BadInput
from polaris_opt.numerics import make_session
from polaris_opt.runtime import scheduler
from polaris_opt.runtime.partition import OrtStep, Plan, PolarisStep, Step, has_polaris_nodes, partition

log = logging.getLogger(__name__)

ONNXRUNTIME = "onnxruntime"
# One entry of a run's schedule: the step, the outputs it must give, the tensors last read by it.
Scheduled = tuple[Step, tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True)
class TensorArg:
    """A model input or output as ONNX Runtime's NodeArg shows it: dims are ints, names or None."""

    name: str
    shape: list[int | str | None] | None  # None: rank unknown
    type: str  # "tensor(float)", as ONNX Runtime spells it


@dataclass(frozen=True)
class StepRecord:
    """What one step of a run did: `placement` is "onnxruntime", "host" or "device"."""

    name: str
    op_type: str  # "onnxruntime" for a sub-model
    placement: str
    seconds: float


class Session:
    """Run `model` (a path or a ModelProto) on ONNX Runtime plus the OpenCL `device`.

    `device`: an index or name substring (see `polaris-opt devices`), None for the best one.
    `placement`: "auto" lets the cost model choose per node; "device" or "host" forces every
    ai.polaris node there. `threads`: ONNX Runtime intra-op threads of every sub-session.
    """

    def __init__(
        self,
        model: str | Path | onnx.ModelProto,
        device: str | None = None,
        *,
        threads: int = 1,
        placement: str = "auto",
    ):
        if placement not in scheduler.PLACEMENTS:
            raise BadInput(f"placement must be one of {', '.join(scheduler.PLACEMENTS)}; got '{placement}'")
        model = _load(model)
        self._inputs, self._outputs = _tensor_args(model)
        self._input_names = [arg.name for arg in self._inputs]
        self._output_names = [arg.name for arg in self._outputs]
        self.placement = placement
        self.env = None  # the ClEnv when ai.polaris nodes may run on an OpenCL device
        self._node_count = len(model.graph.node)
        if not has_polaris_nodes(model):
            # One session over the model as given: the same graph and options as plain ORT.
            self._whole = make_session(model, threads=threads)
            return
        self._whole = None
        self._open_partitioned(model, device, threads)

    def _open_partitioned(self, model: onnx.ModelProto, device: str | None, threads: int) -> None:
        """Partition once: ORT sub-sessions built, weights uploaded, kernels compiled, here."""
        self._plan = partition(model)
        _check_known_ops(self._polaris_steps())
        self._ort = {id(s): make_session(s.model, threads=threads) for s in self._ort_steps()}
        self._attributes = {id(s): _attributes(s.node) for s in self._polaris_steps()}
        # (index, name) of the inputs computed at run time; weights are the launchers' already.
        self._dynamic = {
            id(s): [(i, n) for i, n in enumerate(s.inputs) if n and n not in self._plan.constants]
            for s in self._polaris_steps()
        }
        if self.placement != scheduler.HOST:
            self.env = _open_device(device, self.placement)
        self._launchers = self._build_launchers() if self.env is not None else {}
        if self.placement == "auto" and self._launchers:
            scheduler.measured_host()  # now, so the first run() does not pay for measuring
        # Launches enqueue on one in-order queue, so serialising them costs nothing, and it keeps
        # each run's uploads next to its launch even if a launcher is not re-entrant.
        self._device_lock = threading.Lock()
        self._schedules: dict[tuple[str, ...], list[Scheduled]] = {}
        self._queue = self.env.queue if self.env is not None else None
        self._per_thread = threading.local()  # .staging: that thread's upload arrays (RunValues)

    # ------------------------------------------------------------------------------ the API

    def get_inputs(self) -> list[TensorArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorArg]:
        return list(self._outputs)

    @property
    def device_name(self) -> str | None:
        return self.env.device.name if self.env is not None else None

    def run(
        self,
        output_names: Sequence[str] | None,
        feeds: dict[str, np.ndarray],
        *,
        trace: list[StepRecord] | None = None,
    ) -> list[np.ndarray]:
        """The values of `output_names` (None: every output) for `feeds`, in that order.

        `trace`, when given, receives one StepRecord per step (device steps are then waited
        for, so their times are real rather than the time to enqueue them).
        """
        names = list(output_names) if output_names else list(self._output_names)
        if self._whole is not None:
            return self._run_whole(names, feeds, trace)
        problem = self._problem(names, feeds)
        if problem is not None:
            raise problem
        values = RunValues(self._plan.constants, self._queue, self._staging())
        for name in self._input_names:
            values.put_host(name, np.asarray(feeds[name]))
        for step, fetch, done in self._schedule(tuple(names)):
            started = time.perf_counter() if trace is not None else 0.0
            where = self._run_step(step, fetch, values)
            if trace is not None:
                if where == scheduler.DEVICE:
                    self.env.queue.finish()  # launches are asynchronous: time the kernel, not the enqueue
                trace.append(_record(step, where, time.perf_counter() - started))
            values.drop(done)
        values.download(names)
        return [values.host(name) for name in names]

    # --------------------------------------------------------------------------- one model

    def _run_whole(self, names: list[str], feeds, trace) -> list[np.ndarray]:
        started = time.perf_counter()
        try:
            outputs = self._whole.run(names, feeds)
        except Exception:
            # ONNX Runtime's messages are long and name no fix: say in one line what is wrong if
            # it is the caller's names or feeds, otherwise let its error through unchanged.
            problem = self._problem(names, feeds)
            if problem is not None:
                raise problem from None
            raise
        if trace is not None:
            label = f"{self._node_count} standard nodes"
            trace.append(StepRecord(label, ONNXRUNTIME, ONNXRUNTIME, time.perf_counter() - started))
        return outputs

    # ------------------------------------------------------------------------------- steps

    def _ort_steps(self) -> list[OrtStep]:
        return [s for s in self._plan.steps if isinstance(s, OrtStep)]

    def _polaris_steps(self) -> list[PolarisStep]:
        return [s for s in self._plan.steps if isinstance(s, PolarisStep)]

    def _run_step(self, step: Step, fetch: tuple[str, ...], values: RunValues) -> str:
        if isinstance(step, OrtStep):
            values.download(step.inputs)
            feeds = {name: values.host(name) for name in step.inputs}
            for name, value in zip(fetch, self._ort[id(step)].run(list(fetch), feeds), strict=True):
                values.put_host(name, value)
            return ONNXRUNTIME
        where = self._place(step, values)
        if where == scheduler.DEVICE:
            self._run_on_device(step, values)
        else:
            self._run_on_host(step, values)
        return where

    def _run_on_host(self, step: PolarisStep, values: RunValues) -> None:
        from polaris_opt.ops.reference import REFERENCES

        values.download(step.inputs)
        inputs = [values.host(name) if name else None for name in step.inputs]
        result = REFERENCES[step.node.op_type](inputs, self._attributes[id(step)])
        values.put_host(step.output, np.asarray(result))

    def _run_on_device(self, step: PolarisStep, values: RunValues) -> None:
        launcher = self._launchers[id(step)]
        with self._device_lock:  # uploads included: they go to the same queue, before the launch
            inputs = {i: values.device(name) for i, name in self._dynamic[id(step)]}
            # Reusing: this run reads the output before its thread launches this step again.
            values.put_device(step.output, launcher.launch_reusing(inputs))

    def _place(self, step: PolarisStep, values: RunValues) -> str:
        launcher = self._launchers.get(id(step))
        if launcher is None:
            return scheduler.HOST
        if self.placement != "auto":
            return self.placement
        dynamic = self._dynamic[id(step)]
        shapes = {i: values.shape(name) for i, name in enumerate(step.inputs) if name}
        guess = scheduler.estimate(
            launcher.cost({i: shapes[i] for i, _ in dynamic}),
            scheduler.host_work(step.node.op_type, self._attributes[id(step)], shapes),
            upload_bytes=sum(values.nbytes(name) for _, name in dynamic if not values.on_device(name)),
            download_bytes=sum(values.nbytes(name) for _, name in dynamic if not values.on_host(name)),
            profile=self.env.profile,
            host=scheduler.measured_host(),
        )
        return guess.placement

    def _build_launchers(self) -> dict[int, object]:
        from polaris_opt.runtime.launchers import LAUNCHERS

        launchers = {}
        for step in self._polaris_steps():
            launcher_class = LAUNCHERS.get(step.node.op_type)
            if launcher_class is None:
                if self.placement == scheduler.DEVICE:
                    raise BadInput(
                        f"placement 'device', but ai.polaris op {step.node.op_type} (node '{step.label}') "
                        f"has no OpenCL kernel; use placement 'auto' or 'host'"
                    )
                continue
            known = self._plan.constants
            constants = {i: known[name] for i, name in enumerate(step.inputs) if name in known}
            launchers[id(step)] = launcher_class(self.env, self._attributes[id(step)], constants)
        return launchers

    def _staging(self) -> dict[str, object]:
        """The calling thread's upload arrays, by tensor name; a thread's runs never overlap, and
        other threads have their own, so a queued upload never overwrites what a run still reads."""
        staging = getattr(self._per_thread, "staging", None)
        if staging is None:
            staging = self._per_thread.staging = {}
        return staging

    # ------------------------------------------------------------------------ scheduling

    def _schedule(self, names: tuple[str, ...]) -> list[Scheduled]:
        """For `names`: each needed step, what it must output, and what is last read by it.

        Computed once per set of requested outputs: steps nobody needs are skipped, and every
        tensor is dropped right after its last reader, so a run holds only live activations.
        """
        cached = self._schedules.get(names)
        if cached is None:
            cached = _schedule(self._plan, names)
            self._schedules[names] = cached  # a race only computes the same list twice
        return cached

    # -------------------------------------------------------------------------- checking

    def _problem(self, names: list[str], feeds: dict[str, np.ndarray]) -> BadInput | None:
        """What is wrong with the requested outputs or the feeds, as one line; None if nothing."""
        unknown = [name for name in names if name not in self._output_names]
        if unknown:
            return BadInput(f"unknown output '{unknown[0]}'; the model gives {_listing(self._outputs)}")
        missing = [name for name in self._input_names if name not in feeds]
        if missing:
            return BadInput(f"missing input '{missing[0]}'; the model takes {_listing(self._inputs)}")
        extra = [name for name in feeds if name not in self._input_names]
        if extra:
            return BadInput(f"unknown input '{extra[0]}'; the model takes {_listing(self._inputs)}")
        for arg in self._inputs:
            problem = _feed_problem(arg, np.asarray(feeds[arg.name]))
            if problem is not None:
                return BadInput(problem)
        return None


# ---------------------------------------------------------------------------------- helpers


def _load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from polaris_opt.graph_io import load_model

    return load_model(model)


def _tensor_args(model: onnx.ModelProto) -> tuple[list[TensorArg], list[TensorArg]]:
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = [_tensor_arg(vi) for vi in graph.input if vi.name not in weights]
    return inputs, [_tensor_arg(vi) for vi in graph.output]


def _tensor_arg(value_info: onnx.ValueInfoProto) -> TensorArg:
    tensor = value_info.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    elem = onnx.TensorProto.DataType.Name(tensor.elem_type).lower() if tensor.elem_type else "undefined"
    return TensorArg(value_info.name, shape, f"tensor({elem})")


def _listing(args: list[TensorArg]) -> str:
    return ", ".join(f"{arg.name} {_spelled(arg)}" for arg in args) or "nothing"


def _spelled(arg: TensorArg) -> str:
    if arg.shape is None:
        return f"{_element(arg.type)}[?]"
    return f"{_element(arg.type)}[{', '.join('?' if d is None else str(d) for d in arg.shape)}]"


def _element(onnx_type: str) -> str:
    """ "tensor(float)" -> "float"."""
    return onnx_type.removeprefix("tensor(").removesuffix(")")


def _feed_problem(arg: TensorArg, value: np.ndarray) -> str | None:
    expected = _numpy_type(arg.type)
    if expected is not None and value.dtype != expected:
        return f"input '{arg.name}' is {value.dtype}, the model expects {_spelled(arg)}"
    if arg.shape is None:
        return None
    fits = value.ndim == len(arg.shape) and all(
        not isinstance(d, int) or d == size for d, size in zip(arg.shape, value.shape, strict=True)
    )
    if fits:
        return None
    return f"input '{arg.name}' has shape {list(value.shape)}, the model expects {_spelled(arg)}"


def _numpy_type(onnx_type: str) -> np.dtype | None:
    name = _element(onnx_type).upper()
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(name)))
    except (ValueError, KeyError, TypeError):
        return None


def _attributes(node: onnx.NodeProto) -> dict:
    from polaris_opt.ops import attributes

    return attributes(node)


def _check_known_ops(steps: list[PolarisStep]) -> None:
    from polaris_opt.ops.reference import REFERENCES

    for step in steps:
        if step.node.op_type not in REFERENCES:
            raise BadInput(
                f"node '{step.label}' is ai.polaris op '{step.node.op_type}', which this version does not "
                f"know (known: {', '.join(sorted(REFERENCES))})"
            )


_warned_no_device = False
_warn_lock = threading.Lock()


def _open_device(spec: str | None, placement: str):
    """The OpenCL environment, or None (then all runs on the host, said once per process)."""
    global _warned_no_device
    from polaris_opt.cl_env import open_env

    env = open_env(spec)
    if env is not None:
        return env
    if placement == scheduler.DEVICE:
        raise BadInput("placement 'device', but this machine has no OpenCL device; see `polaris-opt devices`")
    with _warn_lock:
        if not _warned_no_device:
            _warned_no_device = True
            log.warning("no OpenCL device found: ai.polaris ops run on the host with NumPy")
    return None


def _schedule(plan: Plan, names: tuple[str, ...]) -> list[Scheduled]:
    """Walk the steps backwards: keep the ones whose outputs are needed, note each tensor's last reader."""
    needed = set(names)
    kept = []
    for step in reversed(plan.steps):
        fetch = tuple(name for name in step.outputs if name in needed)
        if not fetch:
            continue
        reads = [name for name in step.inputs if name]
        # Read here and by no later step (those are kept already), nor asked for: drop it after this one.
        done = tuple(name for name in dict.fromkeys(reads) if name not in needed)
        kept.append((step, fetch, done))
        needed |= set(reads)
    return kept[::-1]


def _record(step: Step, where: str, seconds: float) -> StepRecord:
    if isinstance(step, OrtStep):
        return StepRecord(f"{step.node_count} standard nodes", ONNXRUNTIME, where, seconds)
    return StepRecord(step.label, step.node.op_type, where, seconds)


class RunValues:
    """The tensors of one run, on the host, on the device or both; each crosses over at most once.

    Constants (weights) are read from the plan and never copied; a dropped tensor frees both
    copies, so a run holds only the activations later steps still read.

    Transfers wait as little as the in-order queue allows; each wait costs a hand-over between
    this thread and the device's worker threads, 40-90 µs on PoCL here, more than copying 64 KB:
    - an upload is queued without waiting, into `staging`: the running thread's device arrays,
      one per tensor name, kept across its runs (an allocation costs 12-20 µs of pyopencl's
      Array set-up). The queue runs the write after the previous run's readers of that array
      and before this run's launch that reads it;
    - downloads wanted together (a step's inputs, the run's outputs) are queued together and
      waited for once, on the last. Results are read into new host arrays, never kept ones: a
      caller may hold them, and a kept host array would save only ~0.7 µs per 256 KB read.
    A thread keeps one staging array per uploaded tensor name per Session until it ends.
    """

    def __init__(self, constants: dict[str, np.ndarray], queue, staging: dict[str, object] | None = None):
        self._constants = constants
        self._queue = queue
        self._staging = staging if staging is not None else {}
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, object] = {}  # pyopencl.array.Array
        # Queued copies not yet known to be done. pyopencl's event of a copy holds the host array
        # and waits for the copy when it is freed, so each is kept until a later wait covers it.
        self._queued: list[object] = []

    def put_host(self, name: str, value: np.ndarray) -> None:
        self._host[name] = value

    def put_device(self, name: str, array) -> None:
        self._device[name] = array

    def on_host(self, name: str) -> bool:
        return name in self._host or name in self._constants

    def on_device(self, name: str) -> bool:
        return name in self._device

    def host(self, name: str) -> np.ndarray:
        if name not in self._host and name in self._device:
            self.download((name,))
        if name in self._host:
            return self._host[name]
        return self._constants[name]

    def download(self, names) -> None:
        """Copy those of `names` that are only on the device to new host arrays, waiting once."""
        import pyopencl as cl

        wanted = [name for name in dict.fromkeys(names) if name in self._device and name not in self._host]
        for name in wanted:
            array = self._device[name]
            self._host[name] = np.empty(array.shape, array.dtype)
        copies = [name for name in wanted if self._device[name].size]  # OpenCL refuses empty copies
        for count, name in enumerate(copies, start=1):
            array, value = self._device[name], self._host[name]
            last = count == len(copies)
            source = array.base_data
            self._queued.append(
                cl.enqueue_copy(self._queue, value, source, src_offset=array.offset, is_blocking=last)
            )
        if copies:
            self._queued.clear()  # the last copy waited, and the queue is in-order: all before it is done

    def device(self, name: str):
        if name not in self._device:
            self._device[name] = self._upload(name, np.ascontiguousarray(self.host(name)))
        return self._device[name]

    def _upload(self, name: str, value: np.ndarray):
        """`value` queued for copying into this thread's staging array for `name` (made or remade
        when its shape or type changes)."""
        import pyopencl as cl
        import pyopencl.array as cl_array

        array = self._staging.get(name)
        if array is None or array.shape != value.shape or array.dtype != value.dtype:
            array = cl_array.empty(self._queue, value.shape, value.dtype)
            self._staging[name] = array
        if value.size:
            self._queued.append(cl.enqueue_copy(self._queue, array.base_data, value, is_blocking=False))
        return array

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._device[name].shape if name in self._device else self.host(name).shape)

    def nbytes(self, name: str) -> int:
        return int(self._device[name].nbytes if name in self._device else self.host(name).nbytes)

    def drop(self, names: tuple[str, ...]) -> None:
        for name in names:
            self._host.pop(name, None)
            self._device.pop(name, None)
