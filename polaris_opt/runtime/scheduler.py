"""Where an ai.polaris node runs: on the OpenCL device or on the host, by a roofline cost model.

For each node, at run time (shapes are known then), the scheduler compares

    device: max(flops / peak, bytes / bandwidth)   of the launcher's `cost`, at the profile's rates
            + one kernel launch + uploading the inputs that are only on the host
    host:   max(flops / peak, bytes / bandwidth)   of what the NumPy reference does (`host_work`),
            at the host's rates, measured once per process
            + one Python/NumPy call + downloading the inputs that are only on the device

and picks the cheaper. The references materialise the dense weight on every call and multiply
densely, so the host is charged for that, not for the sparse work: a large sparse layer on the
host costs what its dense twin does, plus rebuilding it. Greedy, one node at a time: the result's
download is charged to whoever reads it on the host next, so a chain of device nodes never pays
for what stays on the device.

Constants (seconds, GB/s), and where they come from:
- a GPU is behind PCIe: 8 GB/s and 20 µs per transfer (PCIe 3.0 x16 moves 10-12 GB/s in
  practice; 8 GB/s leaves room for pageable host memory); 20 µs per kernel launch.
- the `cpu` profile (PoCL) shares host memory, so a transfer is a memcpy: the profile's own
  bandwidth and 50 µs per transfer; a launch plus wait measured 80 µs on PoCL 3.0 (2-core EPYC).
- the host: the NumPy float32 GEMM rate (a 256³ matmul) and the effective bandwidth of the
  references (one SparseMatMul reference call, see `measured_host`), measured once per process,
  best of 3; 10 µs per reference call.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np

from polaris_opt.devices import DeviceProfile

GPU_LINK_GBS = 8.0
GPU_TRANSFER_SECONDS = 20e-6
GPU_LAUNCH_SECONDS = 20e-6
SHARED_MEMORY_TRANSFER_SECONDS = 50e-6
POCL_LAUNCH_SECONDS = 80e-6
HOST_CALL_SECONDS = 10e-6

DEVICE, HOST = "device", "host"
PLACEMENTS = ("auto", DEVICE, HOST)


@dataclass(frozen=True)
class Machine:
    """The rates of one side: peak float32 rate, memory bandwidth, fixed cost of one call."""

    gflops: float
    bandwidth_gbs: float
    call_seconds: float

    def roofline_seconds(self, flops: float, moved_bytes: float) -> float:
        return max(flops / (self.gflops * 1e9), moved_bytes / (self.bandwidth_gbs * 1e9)) + self.call_seconds


@dataclass(frozen=True)
class Link:
    """The copy between host and device memory."""

    bandwidth_gbs: float
    latency_seconds: float

    def seconds(self, moved_bytes: int) -> float:
        return 0.0 if moved_bytes == 0 else self.latency_seconds + moved_bytes / (self.bandwidth_gbs * 1e9)


def device_machine(profile: DeviceProfile) -> Machine:
    launch = POCL_LAUNCH_SECONDS if profile.name == "cpu" else GPU_LAUNCH_SECONDS
    return Machine(profile.peak_gflops_fp32, profile.bandwidth_gbs, launch)


def link_for(profile: DeviceProfile) -> Link:
    if profile.name == "cpu":  # PoCL: host memory is device memory; a transfer is a memcpy
        return Link(profile.bandwidth_gbs, SHARED_MEMORY_TRANSFER_SECONDS)
    return Link(GPU_LINK_GBS, GPU_TRANSFER_SECONDS)


@functools.cache
def measured_host() -> Machine:
    """This machine's NumPy rates, measured once per process (about 50 ms).

    The bandwidth is effective, not nominal: the time of one SparseMatMul reference call on a
    1024x1024 weight (10% stored) at batch 1, over the bytes `host_work` counts for it. Rebuilding
    the dense weight is scattered writes and index checks, several times slower than a copy;
    calibrating on the reference itself charges the host what it really pays.
    """
    size = 256
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    gemm = _best_of(3, lambda: a @ a)
    inputs, attrs = _calibration_problem()
    call = _best_of(3, lambda: _reference(inputs, attrs))
    _, moved = host_work("SparseMatMul", attrs, {0: inputs[0].shape})
    return Machine(
        gflops=2 * size**3 / gemm / 1e9, bandwidth_gbs=moved / call / 1e9, call_seconds=HOST_CALL_SECONDS
    )


def _calibration_problem() -> tuple[list[np.ndarray], dict]:
    from polaris_opt.sparse.formats import from_dense

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((1024, 1024), dtype=np.float32)
    weight[rng.random(weight.shape) > 0.1] = 0.0
    matrix = from_dense(weight, "csr")
    x = rng.standard_normal((1, 1024), dtype=np.float32)
    return [x, matrix.data, matrix.indices, matrix.indptr], {"format": "csr", "shape": (1024, 1024)}


def _reference(inputs: list[np.ndarray], attrs: dict) -> np.ndarray:
    from polaris_opt.ops.reference import REFERENCES

    return REFERENCES["SparseMatMul"](inputs, attrs)


def _best_of(repeats: int, work) -> float:
    work()  # warm: first calls pay for page faults and thread start-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return max(min(times), 1e-9)


@dataclass(frozen=True)
class Estimate:
    device_seconds: float
    host_seconds: float

    @property
    def placement(self) -> str:
        return DEVICE if self.device_seconds < self.host_seconds else HOST


def estimate(
    device_work: tuple[float, float],
    host_work: tuple[float, float],
    *,
    upload_bytes: int,
    download_bytes: int,
    profile: DeviceProfile,
    host: Machine,
) -> Estimate:
    """Both sides' time for one node, from each side's (flops, bytes); `upload_bytes` are its inputs
    only on the host, `download_bytes` those only on the device."""
    link = link_for(profile)
    device = device_machine(profile).roofline_seconds(*device_work) + link.seconds(upload_bytes)
    on_host = host.roofline_seconds(*host_work) + link.seconds(download_bytes)
    return Estimate(device_seconds=device, host_seconds=on_host)


def host_work(op_type: str, attrs: dict, shapes: dict[int, tuple[int, ...]]) -> tuple[float, float]:
    """(flops, bytes) of one call of the NumPy reference, given the shapes of all the node's inputs.

    Every reference builds the dense float32 W [N, K] (written, then read by the product) and
    multiplies M activation rows by it; SparseConv first writes and reads its im2col patches.
    """
    rows, (n, k) = _activation_rows(op_type, attrs, shapes), _weight_shape(op_type, attrs, shapes)
    moved = 4.0 * (2 * n * k + rows * k + rows * n)
    if op_type == "SparseConv":
        moved += 8.0 * rows * k
    return 2.0 * rows * n * k, moved


def _weight_shape(op_type: str, attrs: dict, shapes: dict[int, tuple[int, ...]]) -> tuple[int, int]:
    if op_type in ("SparseMatMul", "SparseConv"):
        return int(attrs["shape"][0]), int(attrs["shape"][1])
    if op_type == "MatMulInt4":
        return int(attrs["N"]), int(attrs["K"])
    n, k = shapes[1]  # QMatMul, QGemm: w_q [N, K]
    return int(n), int(k)


def _activation_rows(op_type: str, attrs: dict, shapes: dict[int, tuple[int, ...]]) -> int:
    x = shapes[0]
    if op_type != "SparseConv":
        return math.prod(x[:-1])
    batch, _, height, width = x
    out = [
        (extent + before + after - dilation * (kernel - 1) - 1) // stride + 1
        for extent, kernel, stride, dilation, before, after in zip(
            (height, width), attrs["kernel_shape"], attrs["strides"], attrs["dilations"],
            attrs["pads"][:2], attrs["pads"][2:], strict=True,
        )
    ]  # fmt: skip
    return batch * max(out[0], 0) * max(out[1], 0)
