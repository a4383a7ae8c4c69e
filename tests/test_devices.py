"""Device profiles from plain descriptors, real OpenCL enumeration and probing, `polaris-opt devices`.

Tests that need an OpenCL device skip with a reason when none is present; PoCL from
pocl-binary-distribution gives every machine, CI included, a CPU device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polaris_opt import devices as devices_mod
from polaris_opt.devices import PROFILES, DeviceInfo, list_devices, profile_for, select_device
from polaris_opt.errors import BadInput
from polaris_opt.probe import KernelBuildError, build_program, probe_device

CLI = Path(sys.executable).parent / "polaris-opt"
FOUND = list_devices()
needs_opencl = pytest.mark.skipif(not FOUND, reason="no OpenCL platform/device on this machine")


def polaris(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    "name, vendor, device_type, board, expected",
    [
        ("Ellesmere", "Advanced Micro Devices, Inc.", "gpu", "", "polaris"),  # AMDGPU-PRO
        ("gfx803", "Advanced Micro Devices, Inc.", "gpu", "Ellesmere [Radeon RX 470/480/570/580]", "polaris"),
        ("AMD Radeon RX 580 Series (polaris10, LLVM 15.0.7, DRM 3.49)", "AMD", "gpu", "", "polaris"),  # Mesa
        ("Baffin", "Advanced Micro Devices, Inc.", "gpu", "", "polaris"),
        ("Radeon RX 550", "AMD", "gpu", "", "polaris"),
        ("gfx906", "Advanced Micro Devices, Inc.", "gpu", "", "vega"),
        ("AMD Radeon RX Vega", "AMD", "gpu", "", "vega"),
        ("gfx1030", "Advanced Micro Devices, Inc.", "gpu", "", "rdna"),
        ("AMD Radeon RX 5700 XT", "AMD", "gpu", "", "rdna"),  # not an RX 570
        ("AMD Radeon RX 6800 XT (navi21)", "AMD", "gpu", "", "rdna"),
        ("NVIDIA GeForce RTX 3060", "NVIDIA Corporation", "gpu", "", "generic-gpu"),
        ("Intel(R) UHD Graphics 620", "Intel(R) Corporation", "gpu", "", "generic-gpu"),
        ("pthread-AMD EPYC", "AuthenticAMD", "cpu", "", "cpu"),
        ("AMD Ryzen 5 2400G with Radeon Vega Graphics", "AuthenticAMD", "cpu", "", "cpu"),  # CPU wins
    ],
)
def test_profile_mapping(name, vendor, device_type, board, expected):
    profile, reason = profile_for(name, vendor, device_type, board_name=board)
    assert profile == expected
    assert reason.endswith(f"→ {expected}")


def test_reasons_name_the_device_and_the_runtime():
    _, reason = profile_for("Ellesmere", "AMD", "gpu")
    assert reason == "GPU 'Ellesmere' matches 'Ellesmere' (AMD Polaris (gfx803)) → polaris"
    _, reason = profile_for("pthread-AMD EPYC", "AuthenticAMD", "cpu", platform="Portable Computing Language")
    assert reason == "CPU device (PoCL) → cpu"


def test_profile_facts_from_the_design():
    polaris, vega, rdna = PROFILES["polaris"], PROFILES["vega"], PROFILES["rdna"]
    assert (polaris.wavefront, polaris.compute_units, polaris.local_mem_bytes) == (64, 36, 64 * 1024)
    assert polaris.bandwidth_gbs == 256 and polaris.peak_gflops_fp32 == pytest.approx(6200, rel=0.01)
    assert polaris.fp16_rate == 1.0 and not polaris.has_int8_dot
    assert polaris.ridge_flops_per_byte == pytest.approx(24, rel=0.05)
    assert vega.wavefront == 64 and vega.fp16_rate == 2.0 and vega.bandwidth_gbs == 484
    assert rdna.wavefront == 32
    assert PROFILES["cpu"].row_per_work_item and not polaris.row_per_work_item
    assert polaris.defines()["WAVEFRONT"] == "64" and polaris.defines()["PROFILE_POLARIS"] == "1"
    assert PROFILES["generic-gpu"].defines()["PROFILE_GENERIC_GPU"] == "1"


def fake_device(index: int, name: str, device_type: str, platform: str) -> DeviceInfo:
    profile, reason = profile_for(name, "vendor", device_type, platform=platform)
    return DeviceInfo(
        index=index, name=name, vendor="vendor", platform=platform, device_type=device_type,
        driver_version="1", opencl_c_version="OpenCL C 1.2", compute_units=4, global_mem_bytes=2**30,
        local_mem_bytes=2**16, max_work_group_size=256, max_clock_mhz=1000, board_name="",
        profile_name=profile, reason=reason,
    )  # fmt: skip


FAKES = [
    fake_device(0, "pthread-AMD EPYC", "cpu", "Portable Computing Language"),
    fake_device(1, "NVIDIA GeForce RTX 3060", "gpu", "NVIDIA CUDA"),
    fake_device(2, "Ellesmere", "gpu", "AMD Accelerated Parallel Processing"),
]


def test_select_device_by_index_substring_and_default():
    assert select_device("1", FAKES).name == "NVIDIA GeForce RTX 3060"
    assert select_device("epyc", FAKES).index == 0
    assert select_device("parallel", FAKES).index == 2  # platform names match too
    assert select_device("Polaris", FAKES).index == 2  # and profile names
    assert select_device(None, FAKES).profile_name == "polaris"  # the most specific GPU wins
    assert select_device(None, FAKES[:2]).profile_name == "generic-gpu"  # any GPU beats the CPU
    assert select_device(None, []) is None


def test_select_device_without_a_match_lists_the_devices():
    with pytest.raises(
        BadInput, match=r"no OpenCL device matches 'radeon'.*0: pthread-AMD EPYC.*2: Ellesmere"
    ):
        select_device("radeon", FAKES)
    with pytest.raises(BadInput, match="matches '7'"):
        select_device("7", FAKES)


# ---------------------------------------------------------------------------- real OpenCL devices


@needs_opencl
def test_enumeration_finds_a_device_with_a_profile():
    for device in FOUND:
        assert device.profile_name in PROFILES and device.reason.endswith(f"→ {device.profile_name}")
        assert device.compute_units > 0 and device.global_mem_bytes > 0 and device.max_work_group_size > 0
    cpus = [d for d in FOUND if d.device_type == "cpu"]
    if cpus:
        assert cpus[0].profile_name == "cpu"


@needs_opencl
def test_probe_runs_the_kernel_and_matches_numpy():
    result = probe_device(select_device(None, FOUND))
    assert result.ok and result.run_ok and result.error is None
    assert result.build_seconds is not None and result.build_seconds > 0


@needs_opencl
def test_a_failed_build_carries_the_log():
    import pyopencl as cl

    context = cl.Context([FOUND[0].handle])
    with pytest.raises(KernelBuildError) as caught:
        build_program(context, "probe.cl", {})  # probe.cl demands -DWAVEFRONT
    assert "WAVEFRONT" in caught.value.log


def test_no_platform_gives_an_empty_list(monkeypatch):
    import pyopencl as cl

    def no_platforms():
        raise cl.LogicError("clGetPlatformIDs failed: PLATFORM_NOT_FOUND_KHR")

    monkeypatch.setattr(cl, "get_platforms", no_platforms)
    assert list_devices() == []


# ------------------------------------------------------------------------------------- the CLI


@needs_opencl
def test_cli_devices_json_and_check():
    result = polaris("devices", "--json", "--check")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [d["name"] for d in listed["devices"]] == [d.name for d in FOUND]
    assert all(d["probe"]["ok"] for d in listed["devices"])
    assert listed["selected"] == select_device(None, FOUND).index


@needs_opencl
def test_cli_device_env_var_selects_and_a_bad_one_is_exit_2():
    env = {**os.environ, "POLARIS_DEVICE": str(FOUND[-1].index)}
    listed = json.loads(polaris("devices", "--json", env=env).stdout)
    assert listed["selected"] == FOUND[-1].index
    result = polaris("devices", "--device", "no-such-device")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no OpenCL device matches" in result.stderr


def test_cli_without_opencl_explains_and_exits_0(monkeypatch):
    from polaris_opt.cli import OUTPUT, app

    monkeypatch.setattr(devices_mod, "list_devices", lambda: [])
    monkeypatch.setattr(OUTPUT, "json", False)  # OUTPUT is process-wide; keep other tests' flags out
    result = CliRunner().invoke(app, ["devices"])
    assert result.exit_code == 0
    assert "no OpenCL device found" in result.output and "pocl-binary-distribution" in result.output


def test_cli_without_opencl_platform_for_real():
    # The ICD loader bundled with pyopencl reads vendors from OCL_ICD_VENDORS when set.
    env = {**os.environ, "OCL_ICD_VENDORS": "/nonexistent"}
    result = polaris("devices", "--json", env=env)
    if json.loads(result.stdout or "{}").get("devices"):
        pytest.skip("the OpenCL loader ignored OCL_ICD_VENDORS; cannot hide the platforms")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"].startswith("no OpenCL device found")
