"""ClEnv: programs and kernels built once per (source, defines), thread-safe, build logs surfaced.

Runs on any OpenCL device (PoCL's CPU device here and in CI); skips with a reason without one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from polaris_opt import cl_env as cl_env_module
from polaris_opt.cl_env import ClEnv, open_env, round_up
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
def test_open_env_uses_the_device_profile_and_fixed_local_size(env):
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
