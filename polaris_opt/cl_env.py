"""One OpenCL device ready for kernels: context, queue, profile, and programs built once.

The runtime's launchers share a ClEnv. It builds each kernels/<source>.cl once per set of `-D`
defines (the profile's plus the launcher's) and creates each `cl.Kernel` object once: pyopencl
builds a new Kernel on every `program.name` access, and PoCL compiles a new variant for every
new local size, so both are fixed here (DESIGN.md §7).

A kernel's work-group size is the LOCAL_SIZE it was built with: the profile's default
(`local_size`) unless the caller's defines override it (`polaris-opt tune` measures others).
Every kernel declares it as `reqd_work_group_size`, so one build is one local size; `kernel`
remembers it per kernel object and `enqueue` launches with it (`local_size_of` tells launchers
whose global size depends on it). A LOCAL_SIZE the device cannot run is refused before building.

`enqueue` is the one way to launch: setting a kernel's arguments and enqueuing it must happen
without another thread setting the same kernel's arguments in between, so both happen under
the environment's lock. Enqueuing is asynchronous, so the lock is held for microseconds. On a
kernel's first launch it declares the scalar argument types from that call's NumPy scalars:
pyopencl then sets arguments through generated code, 0.7 µs instead of 14 µs for nine arguments.

pyopencl is imported inside functions: `polaris-opt --help` must not load it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polaris_opt.devices import PROFILES, DeviceInfo, DeviceProfile, list_devices, select_device
from polaris_opt.errors import BadInput
from polaris_opt.probe import build_program

log = logging.getLogger(__name__)

DEVICE_ENV_VAR = "POLARIS_DEVICE"


class LocalSizeError(BadInput):
    """A LOCAL_SIZE define this device (or this kernel on it) cannot run."""


@dataclass
class ClEnv:
    """An OpenCL context and in-order queue on one device, specialized for `profile`."""

    device: DeviceInfo
    profile: DeviceProfile
    context: Any  # pyopencl.Context
    queue: Any  # pyopencl.CommandQueue
    _programs: dict = field(default_factory=dict, repr=False)
    _kernels: dict = field(default_factory=dict, repr=False)
    _typed: dict = field(default_factory=dict, repr=False)  # id -> kernel, held so the id stays its own
    _local_sizes: dict = field(default_factory=dict, repr=False)  # id(kernel) -> its LOCAL_SIZE
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def local_size(self) -> int:
        """The profile's default work-group size (`-DLOCAL_SIZE` unless a caller's defines override it).

        GPUs: one wavefront-multiple group of 64 (a full Polaris wave, two RDNA waves). CPUs
        (PoCL): a work-group is one task on one core, so 64 work-items give a task enough work
        to hide the launch overhead while leaving many tasks to spread over the cores.
        """
        return max(64, self.profile.wavefront)

    def defines(self, defines: dict[str, str] | None = None) -> dict[str, str]:
        """The profile's defines, LOCAL_SIZE, then the caller's (which win)."""
        return {**self.profile.defines(), "LOCAL_SIZE": str(self.local_size), **(defines or {})}

    def local_size_for(self, defines: dict[str, str] | None = None) -> int:
        """The work-group size of kernels built with `defines` (checked: LocalSizeError if unusable)."""
        return self._checked_local_size(self.defines(defines)["LOCAL_SIZE"])

    def _checked_local_size(self, text: str) -> int:
        """LOCAL_SIZE as an int: a power of two (the kernels' local-memory reductions halve it) that
        the device allows in one work-group."""
        size = int(text) if text.isdigit() else 0
        if size < 1 or size & (size - 1):
            raise LocalSizeError(f"LOCAL_SIZE must be a power of two such as 64; got '{text}'")
        most = self.device.max_work_group_size
        if size > most:
            raise LocalSizeError(
                f"LOCAL_SIZE {size} exceeds the largest work-group of '{self.device.name}' ({most}); "
                f"use {most} or less"
            )
        return size

    def program(self, source_name: str, defines: dict[str, str] | None = None):
        """kernels/<source_name> built for this device with `defines`; built once, then cached."""
        full = self.defines(defines)
        key = (source_name, tuple(sorted(full.items())))
        with self._lock:
            program = self._programs.get(key)
            if program is None:
                self._checked_local_size(full["LOCAL_SIZE"])
                log.debug("building %s with %s", source_name, full)
                program = build_program(self.context, source_name, full)
                self._programs[key] = program
            return program

    def kernel(self, source_name: str, kernel_name: str, defines: dict[str, str] | None = None):
        """The `kernel_name` kernel of `program(source_name, defines)`, created once; it launches
        with the LOCAL_SIZE of those defines."""
        full = self.defines(defines)
        key = (source_name, tuple(sorted(full.items())), kernel_name)
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is None:
                import pyopencl as cl

                kernel = cl.Kernel(self.program(source_name, defines), kernel_name)
                size = int(full["LOCAL_SIZE"])
                self._check_kernel_limit(kernel, kernel_name, size)
                self._kernels[key] = kernel  # held for the environment's life, so its id stays its own
                self._local_sizes[id(kernel)] = size
            return kernel

    def _check_kernel_limit(self, kernel, kernel_name: str, size: int) -> None:
        """A GPU may allow a kernel fewer work-items per group than the device (its registers)."""
        import pyopencl as cl

        most = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device.handle)
        if size > most:
            raise LocalSizeError(
                f"{kernel_name}: LOCAL_SIZE {size} exceeds the {most} work-items '{self.device.name}' "
                "allows this kernel in one work-group"
            )

    def local_size_of(self, kernel) -> int:
        """The work-group size `kernel` launches with: its LOCAL_SIZE define (the profile default for
        a kernel this environment did not create)."""
        return self._local_sizes.get(id(kernel), self.local_size)

    def enqueue(self, kernel, global_size: tuple[int, ...], *args, wait_for=None):
        """Launch `kernel` over `global_size` (dimension 0 rounded up to the kernel's local size).

        Kernels take their true sizes as arguments and bounds-check, so rounding up is safe.
        Scalars are NumPy scalars (np.uint32(n)), buffers pyopencl Buffers or None. Returns the event.
        """
        import pyopencl as cl

        size = self.local_size_of(kernel)
        rounded = (round_up(global_size[0], size), *global_size[1:])
        local = (size,) + (1,) * (len(global_size) - 1)
        with self._lock:
            if id(kernel) not in self._typed:
                kernel.set_scalar_arg_dtypes(
                    [getattr(a, "dtype", None) if np.isscalar(a) else None for a in args]
                )
                self._typed[id(kernel)] = kernel
            kernel.set_args(*args)
            return cl.enqueue_nd_range_kernel(self.queue, kernel, rounded, local, wait_for=wait_for)

    def cached_programs(self) -> int:
        """How many programs this environment has built (a launcher's reuse shows here)."""
        with self._lock:
            return len(self._programs)


def scalar_dtypes(args) -> list:
    """Each argument's NumPy scalar type, None for buffers (scalars must be NumPy scalars: np.uint32(n))."""
    return [arg.dtype if isinstance(arg, np.generic) else None for arg in args]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def open_env(spec: str | None = None, *, profile: str | None = None) -> ClEnv | None:
    """An environment on the device `spec` (or $POLARIS_DEVICE) names; None without OpenCL.

    `profile` overrides the device's own profile: tests use it to run the GPU kernel layouts on
    PoCL's CPU device, which executes any work-group shape correctly, only more slowly.
    """
    devices = list_devices()
    if not devices:
        return None
    device = select_device(spec if spec is not None else os.environ.get(DEVICE_ENV_VAR), devices)
    if device is None:
        return None
    if profile is not None and profile not in PROFILES:
        raise BadInput(f"unknown device profile '{profile}'; known: {', '.join(PROFILES)}")
    import pyopencl as cl

    context = cl.Context([device.handle])
    queue = cl.CommandQueue(context)
    chosen = PROFILES[profile] if profile is not None else device.profile
    return ClEnv(device=device, profile=chosen, context=context, queue=queue)
