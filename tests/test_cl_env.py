"""ClEnv: programs and kernels built once per (source, defines), thread-safe, build logs surfaced,
each kernel launched with the LOCAL_SIZE it was built with.

Runs on any OpenCL device (PoCL's CPU device here and in CI); skips with a reason without one.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from polaris_opt import cl_env as cl_env_module
from polaris_opt.cl_env import ClEnv, LocalSizeError, open_env, round_up
from polaris_opt.devices import PROFILES, list_devices
from polaris_opt.errors import BadInput
from polaris_opt.probe import KernelBuildError

FOUND = list_devices()
needs_opencl = pytest.mark.skipif(not FOUND, reason="no OpenCL platform/device on this machine")
SPMM_DEFINES = {"VALUE_KIND": "0", "INDEX_T": "int"}


@pytest.fixture
def env() -> ClEnv:
    return open_env()


def test_round_up():
    assert [round_up(v, 64) for v in (0, 1, 64, 65, 1003)] == [0, 64, 64, 128, 1024]


def test_no_device_gives_none(monkeypatch):
    monkeypatch.setattr(cl_env_module, "list_devices", lambda: [])
    assert open_env() is None
    assert open_env("0") is None


@needs_opencl
def test_open_env_uses_the_device_profile_and_its_default_local_size(env):
    assert env.profile == env.device.profile
    assert env.queue.context == env.context
    assert env.local_size == max(64, env.profile.wavefront)
    defines = env.defines({"EXTRA": "1"})
    assert defines["LOCAL_SIZE"] == str(env.local_size) and defines["EXTRA"] == "1"
    assert defines["WAVEFRONT"] == str(env.profile.wavefront)


@needs_opencl
def test_profile_override_and_a_bad_profile():
    gpu_layout = open_env(profile="polaris")
    assert gpu_layout.profile is PROFILES["polaris"] and gpu_layout.local_size == 64
    with pytest.raises(BadInput, match="unknown device profile 'tahiti'.*polaris"):
        open_env(profile="tahiti")


@needs_opencl
def test_device_spec_from_the_environment_variable(monkeypatch):
    last = FOUND[-1]
    monkeypatch.setenv("POLARIS_DEVICE", str(last.index))
    assert open_env().device.index == last.index
    monkeypatch.setenv("POLARIS_DEVICE", "no-such-device")
    with pytest.raises(BadInput, match="no OpenCL device matches 'no-such-device'"):
        open_env()
    assert open_env(str(last.index)).device.index == last.index  # an explicit spec wins


@needs_opencl
def test_programs_and_kernels_are_built_once(env):
    first = env.program("spmm.cl", SPMM_DEFINES)
    assert env.program("spmm.cl", dict(SPMM_DEFINES)) is first
    assert env.cached_programs() == 1
    other = env.program("spmm.cl", {**SPMM_DEFINES, "INDEX_T": "ushort"})
    assert other is not first and env.cached_programs() == 2
    kernel = env.kernel("spmm.cl", "csr_spmv_row", SPMM_DEFINES)
    assert env.kernel("spmm.cl", "csr_spmv_row", SPMM_DEFINES) is kernel
    assert env.cached_programs() == 2  # the kernel came from the cached program


@needs_opencl
def test_concurrent_first_use_builds_one_program(env):
    barrier = threading.Barrier(6)

    def build(_):
        barrier.wait()
        return env.kernel("probe.cl", "probe_axpy")

    with ThreadPoolExecutor(6) as pool:
        kernels = list(pool.map(build, range(6)))
    assert all(k is kernels[0] for k in kernels)
    assert env.cached_programs() == 1


@needs_opencl
def test_a_broken_define_surfaces_the_build_log(env):
    with pytest.raises(KernelBuildError) as caught:
        env.program("spmm.cl", {"VALUE_KIND": "7", "INDEX_T": "int"})
    assert "VALUE_KIND must be 0 (float32), 1 (float16) or 2 (int8)" in caught.value.log
    assert "spmm.cl" in str(caught.value)
    assert env.cached_programs() == 0  # a failed build is not cached; a fixed define builds
    env.program("spmm.cl", SPMM_DEFINES)


@needs_opencl
def test_enqueue_rounds_the_global_size_up_and_runs(env):
    import pyopencl.array as cl_array

    size = 1003  # not a multiple of any local size: the kernel's bounds check matters
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, size), dtype=np.float32)
    x_dev, y_dev = cl_array.to_device(env.queue, x), cl_array.to_device(env.queue, y)
    kernel = env.kernel("probe.cl", "probe_axpy")
    env.enqueue(kernel, (size,), np.float32(2.0), x_dev.data, y_dev.data, np.uint32(size))
    np.testing.assert_allclose(y_dev.get(), 2 * x + y, rtol=1e-6, atol=1e-6)


def axpy(env, kernel, size: int = 1003) -> None:
    """y = 2x + y through `kernel` (probe_axpy) over `size` values, checked against NumPy."""
    import pyopencl.array as cl_array

    rng = np.random.default_rng(size)
    x, y = rng.standard_normal((2, size), dtype=np.float32)
    x_dev, y_dev = cl_array.to_device(env.queue, x), cl_array.to_device(env.queue, y)
    env.enqueue(kernel, (size,), np.float32(2.0), x_dev.data, y_dev.data, np.uint32(size))
    np.testing.assert_allclose(y_dev.get(), 2 * x + y, rtol=1e-6, atol=1e-6)


def compiled_local_size(env, kernel) -> int:
    """The reqd_work_group_size the device compiled into `kernel` (the driver's own record)."""
    import pyopencl as cl

    info = cl.kernel_work_group_info.COMPILE_WORK_GROUP_SIZE
    return kernel.get_work_group_info(info, env.device.handle)[0]


@needs_opencl
@pytest.mark.parametrize("profile", [None, "polaris"])
def test_a_local_size_override_is_the_kernels_own(profile):
    env = open_env(profile=profile)
    default = env.kernel("probe.cl", "probe_axpy")
    assert env.local_size_of(default) == env.local_size == compiled_local_size(env, default)
    for size in (16, 256):
        kernel = env.kernel("probe.cl", "probe_axpy", {"LOCAL_SIZE": str(size)})
        assert kernel is not default
        assert env.local_size_of(kernel) == size == compiled_local_size(env, kernel)
        assert env.local_size_for({"LOCAL_SIZE": str(size)}) == size
        axpy(env, kernel)  # the driver refuses any other local size (INVALID_WORK_GROUP_SIZE)
    assert env.local_size == max(64, env.profile.wavefront)  # the default did not move
    axpy(env, default)


@needs_opencl
def test_a_kernel_made_elsewhere_launches_with_the_default(env):
    import pyopencl as cl

    foreign = cl.Kernel(env.program("probe.cl"), "probe_axpy")
    assert env.local_size_of(foreign) == env.local_size
    axpy(env, foreign)


@needs_opencl
@pytest.mark.parametrize(
    "value, message",
    [
        ("48", "LOCAL_SIZE must be a power of two such as 64; got '48'"),
        ("0", "must be a power of two"),
        ("sixty-four", "must be a power of two"),
        ("twice the device's largest", "LOCAL_SIZE {twice} exceeds the largest work-group of '.*' "),
    ],
)
def test_an_unusable_local_size_is_a_clear_error(env, value, message):
    most = env.device.max_work_group_size
    if value.startswith("twice"):
        value, message = str(2 * most), message.format(twice=2 * most) + rf"\({most}\); use {most} or less"
    with pytest.raises(LocalSizeError, match=message) as caught:
        env.kernel("probe.cl", "probe_axpy", {"LOCAL_SIZE": value})
    assert caught.value.exit_code == 2  # a BadInput: one clear line from the CLI
    with pytest.raises(LocalSizeError, match=message):
        env.local_size_for({"LOCAL_SIZE": value})
    assert env.cached_programs() == 0  # refused before building


@needs_opencl
def test_a_local_size_above_the_kernels_own_limit_is_a_clear_error(env):
    # A GPU may allow one kernel fewer work-items than the device; PoCL allows every kernel its
    # device maximum, so a device claiming twice that exposes the per-kernel check.
    most = env.device.max_work_group_size
    env.device = dataclasses.replace(env.device, max_work_group_size=2 * most)
    with pytest.raises(
        LocalSizeError, match=f"probe_axpy: LOCAL_SIZE {2 * most} exceeds the {most} work-items"
    ):
        env.kernel("probe.cl", "probe_axpy", {"LOCAL_SIZE": str(2 * most)})
