"""Build a kernel for a device and check it: the `polaris-opt devices --check` probe.

`build_program` is how every kernel source is built: the `.cl` file from package data plus the
device profile's `-D` defines; a failure raises KernelBuildError carrying the build log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources

import numpy as np

from polaris_opt.devices import DeviceInfo
from polaris_opt.errors import PolarisError


class KernelBuildError(PolarisError):
    """An OpenCL program failed to build; `log` is the compiler's build log."""

    def __init__(self, source_name: str, device_name: str, build_log: str):
        first = next(
            (line for line in build_log.splitlines() if "error" in line.lower()), "see the build log"
        )
        super().__init__(f"{source_name}: OpenCL build failed on '{device_name}': {first.strip()}")
        self.log = build_log


@dataclass(frozen=True)
class ProbeResult:
    ok: bool  # built, ran and matched NumPy
    build_seconds: float | None
    run_ok: bool
    error: str | None = None


def kernel_source(name: str) -> str:
    """The text of kernels/<name>, installed as package data of polaris_opt.kernels."""
    return resources.files("polaris_opt.kernels").joinpath(name).read_text(encoding="utf-8")


def build_program(context, source_name: str, defines: dict[str, str]):
    """Build kernels/<source_name> with `-D` defines; KernelBuildError carries the build log."""
    import pyopencl as cl

    options = [f"-D{key}={value}" for key, value in sorted(defines.items())]
    program = cl.Program(context, kernel_source(source_name))
    try:
        return program.build(options=options)
    except cl.RuntimeError as exc:  # BUILD_PROGRAM_FAILURE
        device = context.devices[0]
        raise KernelBuildError(source_name, device.name, _build_log(program, device) or str(exc)) from None


def _build_log(program, device) -> str:
    import pyopencl as cl

    try:
        return program.get_build_info(device, cl.program_build_info.LOG).strip()
    except cl.Error:  # some drivers keep no log after a failed build; the exception text has one
        return ""


def probe_device(device: DeviceInfo, size: int = 1000 + 3) -> ProbeResult:
    """Build kernels/probe.cl for the device's profile, run y = a*x + y and compare with NumPy.

    `size` is deliberately not a multiple of any work-group size, so the bounds check is tested.
    """
    import pyopencl as cl

    local_size = min(device.profile.wavefront, device.max_work_group_size)
    defines = {**device.profile.defines(), "LOCAL_SIZE": str(local_size)}
    try:
        context = cl.Context([device.handle])
        started = time.perf_counter()
        program = build_program(context, "probe.cl", defines)
        build_seconds = time.perf_counter() - started
    except (KernelBuildError, cl.Error) as exc:
        return ProbeResult(ok=False, build_seconds=None, run_ok=False, error=str(exc))
    try:
        matched = _run_axpy(context, program, size, local_size)
    except cl.Error as exc:
        return ProbeResult(ok=False, build_seconds=build_seconds, run_ok=False, error=str(exc))
    error = None if matched else "kernel result differs from NumPy"
    return ProbeResult(ok=matched, build_seconds=build_seconds, run_ok=matched, error=error)


def _run_axpy(context, program, size: int, local_size: int) -> bool:
    import pyopencl as cl

    rng = np.random.default_rng(0)
    a = np.float32(1.5)
    x = rng.standard_normal(size, dtype=np.float32)
    y = rng.standard_normal(size, dtype=np.float32)
    queue = cl.CommandQueue(context)
    flags = cl.mem_flags
    x_buf = cl.Buffer(context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=x)
    y_buf = cl.Buffer(context, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=y)
    kernel = cl.Kernel(program, "probe_axpy")  # once: attribute access would build a new one
    global_size = -(-size // local_size) * local_size
    kernel(queue, (global_size,), (local_size,), a, x_buf, y_buf, np.uint32(size))
    result = np.empty_like(y)
    cl.enqueue_copy(queue, result, y_buf)
    queue.finish()
    # A device may fuse a*x+y into one fma (one rounding instead of two): allow an ulp or so.
    return bool(np.allclose(result, a * x + y, rtol=1e-6, atol=1e-6))
