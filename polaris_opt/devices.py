"""OpenCL devices: list them, map each to a device profile, and select one (polaris_opt.probe tests one).

A device profile (DESIGN.md §7) holds the hardware facts kernels are specialized for through
`-D` defines and that the runtime's cost model reads. The mapping from a device to a profile
takes plain strings (`profile_for`), so it is testable without the hardware.

pyopencl is imported inside functions: `polaris-opt --help` must not load it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields
from typing import Any

from polaris_opt.errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceProfile:
    """Facts about a device class; numbers are the reference part's (e.g. RX 580 for polaris)."""

    name: str
    wavefront: int  # SIMD width a work-group should be a multiple of (CPU: vector lanes)
    compute_units: int
    local_mem_bytes: int
    bandwidth_gbs: float
    peak_gflops_fp32: float
    fp16_rate: float  # FP16 throughput relative to FP32: 1.0 = no packed math
    has_int8_dot: bool
    row_per_work_item: bool  # one work-item per sparse row: beats SELL-C slicing on PoCL
    summary: str

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which a kernel is compute-bound rather than memory-bound."""
        return self.peak_gflops_fp32 / self.bandwidth_gbs

    def defines(self) -> dict[str, str]:
        """The `-D` defines every kernel is built with on this profile."""
        return {
            f"PROFILE_{self.name.upper().replace('-', '_')}": "1",
            "WAVEFRONT": str(self.wavefront),
            "LOCAL_MEM_BYTES": str(self.local_mem_bytes),
            "HAS_PACKED_FP16": "1" if self.fp16_rate > 1 else "0",
            "HAS_INT8_DOT": "1" if self.has_int8_dot else "0",
            "ROW_PER_WORK_ITEM": "1" if self.row_per_work_item else "0",
        }


KB = 1024
_GPU_DEFAULTS = dict(has_int8_dot=False, row_per_work_item=False)
PROFILES = {
    p.name: p
    for p in [
        # RX 580: 36 CU x 64 lanes x 2 FLOP x 1340 MHz. FP16 at the FP32 rate and no int8 dot, so
        # narrow types win only on bandwidth (ridge ~24 FLOP/byte).
        DeviceProfile(
            name="polaris", wavefront=64, compute_units=36, local_mem_bytes=64 * KB, bandwidth_gbs=256.0,
            peak_gflops_fp32=6175.0, fp16_rate=1.0, summary="AMD Polaris (gfx803)", **_GPU_DEFAULTS,
        ),
        # Vega 64: packed FP16 at twice the rate. Only gfx906 has dot4 int8, so none is assumed.
        DeviceProfile(
            name="vega", wavefront=64, compute_units=64, local_mem_bytes=64 * KB, bandwidth_gbs=484.0,
            peak_gflops_fp32=12665.0, fp16_rate=2.0, summary="AMD Vega (gfx9)", **_GPU_DEFAULTS,
        ),
        # RX 5700 XT: wave32 native. Int8 dot arrives only with some RDNA parts, so not assumed.
        DeviceProfile(
            name="rdna", wavefront=32, compute_units=40, local_mem_bytes=64 * KB, bandwidth_gbs=448.0,
            peak_gflops_fp32=9754.0, fp16_rate=2.0, summary="AMD RDNA (gfx10+)", **_GPU_DEFAULTS,
        ),
        # Unknown GPU: OpenCL's minimum local memory and modest throughput, so no plan over-commits.
        DeviceProfile(
            name="generic-gpu", wavefront=32, compute_units=8, local_mem_bytes=32 * KB, bandwidth_gbs=100.0,
            peak_gflops_fp32=1000.0, fp16_rate=1.0, summary="unrecognised GPU", **_GPU_DEFAULTS,
        ),
        # PoCL on a desktop CPU: AVX2 lanes and DRAM bandwidth; one work-item per sparse row.
        DeviceProfile(
            name="cpu", wavefront=8, compute_units=4, local_mem_bytes=64 * KB, bandwidth_gbs=20.0,
            peak_gflops_fp32=200.0, fp16_rate=1.0, summary="CPU (PoCL)", has_int8_dot=False,
            row_per_work_item=True,
        ),
    ]
}  # fmt: skip

# Name patterns, matched case-insensitively against the device and board names. Drivers name
# the same chip differently: ROCm says "gfx803", AMDGPU-PRO "Ellesmere", Mesa "polaris10".
_GPU_PATTERNS = [
    (
        "polaris",
        r"gfx803|ellesmere|baffin|\blexa\b|polaris|\bRX\s*(?:460|470|480|540|550|560|570|580|590)(?!\d)",
    ),
    ("vega", r"gfx90[0246c]|\bvega|radeon vii"),
    ("rdna", r"gfx1[0-2]\d\d|\bnavi|\bRX\s*[5-9]\d{3}(?!\d)"),
]


def profile_for(
    name: str, vendor: str, device_type: str, board_name: str = "", platform: str = ""
) -> tuple[str, str]:
    """The profile name for a device, and a one-line reason a user can check."""
    if "cpu" in device_type.lower():
        pocl = re.search(r"pocl|portable computing", f"{platform} {vendor}", re.IGNORECASE)
        return "cpu", f"CPU device ({'PoCL' if pocl else platform or vendor}) → cpu"
    label = f"{name} / {board_name}" if board_name and board_name != name else name
    for profile, pattern in _GPU_PATTERNS:
        hit = re.search(pattern, f"{name} {board_name}", re.IGNORECASE)
        if hit:
            return (
                profile,
                f"GPU '{label}' matches '{hit.group(0)}' ({PROFILES[profile].summary}) → {profile}",
            )
    kind = "GPU" if "gpu" in device_type.lower() else f"{device_type} device"
    return "generic-gpu", f"{kind} '{label}' ({vendor}) is not a known AMD part → generic-gpu"


# -------------------------------------------------------------------------------- enumeration


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    vendor: str
    platform: str
    device_type: str
    driver_version: str
    opencl_c_version: str
    compute_units: int
    global_mem_bytes: int
    local_mem_bytes: int
    max_work_group_size: int
    max_clock_mhz: int
    board_name: str
    profile_name: str
    reason: str
    handle: Any = field(default=None, compare=False, repr=False)  # the pyopencl.Device

    @property
    def profile(self) -> DeviceProfile:
        return PROFILES[self.profile_name]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "handle"}


def list_devices() -> list[DeviceInfo]:
    """Every OpenCL device on every platform, numbered in that order; [] when there is none."""
    try:
        import pyopencl as cl
    except (ImportError, OSError) as exc:  # no libOpenCL at all
        log.debug("pyopencl unavailable: %s", exc)
        return []
    try:
        platforms = cl.get_platforms()
    except (cl.Error, RuntimeError) as exc:
        # The ICD loader reports "no platforms" as LogicError PLATFORM_NOT_FOUND_KHR; for us that
        # is simply a machine without OpenCL, not a failure.
        log.debug("no OpenCL platform: %s", exc)
        return []
    handles = []
    for platform in platforms:
        try:
            handles += [(platform, device) for device in platform.get_devices()]
        except cl.Error as exc:  # a platform with no devices raises DEVICE_NOT_FOUND
            log.debug("OpenCL platform %r has no usable device: %s", platform.name, exc)
    return [_describe(index, platform, device) for index, (platform, device) in enumerate(handles)]


def _describe(index: int, platform, device) -> DeviceInfo:
    device_type = _type_name(device.type)
    board_name = _optional(device, "board_name_amd")  # cl_amd_device_attribute_query only
    profile, reason = profile_for(device.name, device.vendor, device_type, board_name, platform.name)
    return DeviceInfo(
        index=index,
        name=device.name.strip(),
        vendor=device.vendor.strip(),
        platform=platform.name.strip(),
        device_type=device_type,
        driver_version=device.driver_version,
        opencl_c_version=_optional(device, "opencl_c_version"),
        compute_units=device.max_compute_units,
        global_mem_bytes=device.global_mem_size,
        local_mem_bytes=device.local_mem_size,
        max_work_group_size=device.max_work_group_size,
        max_clock_mhz=device.max_clock_frequency,
        board_name=board_name,
        profile_name=profile,
        reason=reason,
        handle=device,
    )


def _type_name(type_bits: int) -> str:
    import pyopencl as cl

    # A bit field: PoCL reports its CPU as ALL | CPU, so test the bits instead of printing them.
    for bit, name in [
        (cl.device_type.GPU, "gpu"),
        (cl.device_type.CPU, "cpu"),
        (cl.device_type.ACCELERATOR, "accelerator"),
    ]:
        if type_bits & bit:
            return name
    return "other"


def _optional(device, attribute: str) -> str:
    try:
        return str(getattr(device, attribute)).strip()
    except Exception:  # noqa: BLE001 - pyopencl raises LogicError/AttributeError for absent extensions
        return ""


def select_device(spec: str | None, devices: list[DeviceInfo] | None = None) -> DeviceInfo | None:
    """The device `spec` names: an index, or a substring of its name, board, platform or profile.

    With no spec, the most specific GPU profile wins over generic GPUs and CPUs; None when the
    machine has no OpenCL device at all.
    """
    devices = list_devices() if devices is None else devices
    if spec is None or not spec.strip():
        ranking = list(PROFILES)  # polaris, vega, rdna, generic-gpu, cpu
        return min(devices, key=lambda d: ranking.index(d.profile_name), default=None)
    chosen = next((device for device in devices if _matches(device, spec.strip())), None)
    if chosen is None:
        listing = "; ".join(f"{d.index}: {d.name} ({d.platform})" for d in devices) or "none found"
        raise BadInput(f"no OpenCL device matches '{spec}' (devices: {listing}); see `polaris-opt devices`")
    return chosen


def _matches(device: DeviceInfo, spec: str) -> bool:
    if spec.isdigit():
        return device.index == int(spec)
    haystack = f"{device.name} {device.board_name} {device.platform} {device.profile_name}"
    return spec.lower() in haystack.lower()
