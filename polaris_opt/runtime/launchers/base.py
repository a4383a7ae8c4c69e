"""The launcher contract: one ai.polaris node run as OpenCL kernels on a ClEnv.

A launcher is created once per node with the node's attributes and its constant inputs
(weights, bias, scales), which it uploads to the device there and then. `launch` takes the
node's other inputs already on the device and returns its output on the device, so
consecutive ai.polaris nodes hand activations to each other without a trip to the host.
`cost` gives the scheduler's roofline model the work and traffic of one call.

`launch` returns a new device array each call, so a caller may keep as many results as it
likes. `launch_reusing` is for a caller that is done with a result before it calls again (the
Session, within one run): a launcher may then write into an array it keeps per thread, which
saves the allocation (about 12-20 µs of pyopencl's Array set-up on PoCL, each call).

Launchers register themselves by op type in LAUNCHERS with the `register` decorator.
pyopencl is imported inside functions: `polaris-opt --help` must not load it.
"""

from __future__ import annotations

import abc
import threading
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from polaris_opt.cl_env import ClEnv
from polaris_opt.errors import BadInput

if TYPE_CHECKING:
    import pyopencl.array


class Launcher(abc.ABC):
    """Runs one ai.polaris node; `launch` may be called many times, from several threads."""

    op_type: ClassVar[str]

    def __init__(self, env: ClEnv, attrs: dict, constants: dict[int, np.ndarray]):
        self.env = env
        self.attrs = attrs
        self.constants = constants
        self._kept = threading.local()  # this thread's reused output: (shape, dtype, array)

    @abc.abstractmethod
    def launch(self, inputs: dict[int, pyopencl.array.Array]) -> pyopencl.array.Array:
        """The output for the non-constant `inputs` (float32, C-contiguous, on the device), in a
        new array. It only enqueues work and never waits on the queue: the tuner times a launch
        between markers held behind a user event, and a waiting launch would hang it."""

    def launch_reusing(self, inputs: dict[int, pyopencl.array.Array]) -> pyopencl.array.Array:
        """As `launch`, but the result may be an array this launcher keeps for the calling thread
        and overwrites at that thread's next `launch_reusing`: read it, or hand it to a later
        launch, before calling again. Launchers that keep nothing return a new array."""
        return self.launch(inputs)

    @abc.abstractmethod
    def cost(self, input_shapes: dict[int, tuple[int, ...]]) -> tuple[float, float]:
        """(flops, bytes moved) of one `launch` with inputs of these shapes."""

    # -------------------------------------------------------------------- helpers for subclasses

    def upload(self, array: np.ndarray | None):
        """`array` copied to the device once (None stays None: an absent optional input)."""
        if array is None:
            return None
        import pyopencl.array as cl_array

        return cl_array.to_device(self.env.queue, np.ascontiguousarray(array))

    def empty(self, shape: tuple[int, ...], dtype=np.float32):
        """A new device array (the output of one call, or a scratch buffer)."""
        import pyopencl.array as cl_array

        return cl_array.empty(self.env.queue, shape, dtype)

    def kept_output(self, shape: tuple[int, ...], dtype=np.float32):
        """This thread's output array of `shape`, made once and reused while the shape stays (a new
        shape replaces it, so a thread holds one per launcher). Other threads get their own, so
        concurrent runs never write into each other's results."""
        dtype = np.dtype(dtype)
        kept = getattr(self._kept, "output", None)
        if kept is None or kept[0] != shape or kept[1] != dtype:
            kept = (shape, dtype, self.empty(shape, dtype))
            self._kept.output = kept
        return kept[2]

    def float_input(self, inputs: dict, index: int, what: str):
        """Input `index`, checked to be a float32 device array."""
        if index not in inputs:
            raise BadInput(f"{self.op_type}: input {index} ({what}) is missing")
        array = inputs[index]
        if array.dtype != np.float32:
            raise BadInput(f"{self.op_type}: {what} must be float32; got {array.dtype}")
        return array


LAUNCHERS: dict[str, type[Launcher]] = {}


def register(cls: type[Launcher]) -> type[Launcher]:
    """Class decorator: make `cls` the launcher of its op_type."""
    LAUNCHERS[cls.op_type] = cls
    return cls
