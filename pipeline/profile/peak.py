"""The device's peak FLOP/s, the denominator of MFU (model FLOPs utilization).

GPUs: dense (no sparsity) tensor-core peaks from the vendors' data sheets, by precision. "fp32"
training on NVIDIA GPUs runs convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`),
so its peak is TF32's when that is on. CPUs: no table is honest across vendors and core counts,
so the peak is measured: the best of a few large matrix products in the run's precision, on the
threads this process uses.
"""

from __future__ import annotations

import re
import time

import torch

from pipeline.precision import DTYPES

# name fragment (as in torch.cuda.get_device_name) -> dense peak TFLOP/s by precision.
# Sources: NVIDIA H100 / H200 / A100 / L40S / L4 / A10 data sheets (dense figures, i.e. half the
# "with sparsity" ones); V100: no bf16, fp16 tensor cores listed under bf16 would mislead, so absent.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
}


def gpu_peak(name: str, precision: str) -> tuple[float, str] | None:
    """(peak FLOP/s, what it is) for a known GPU, else None. A fragment matches whole words ("L4"
    is not the L40); the first match wins, so more specific names come first in the table."""
    for fragment, peaks in GPU_PEAK_TFLOPS.items():
        if re.search(rf"\b{re.escape(fragment)}\b", name):
            kind = "bf16" if precision == "bf16" else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
            return peaks[kind] * 1e12, f"{fragment} dense {kind} (data sheet)"
    return None


def cpu_peak(precision: str, *, size: int = 1024, seconds: float = 1.0) -> tuple[float, str]:
    """Measured: the best rate of `size`-square matrix products over about `seconds`."""
    dtype = DTYPES[precision]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool and packing buffers
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best, f"measured {size}x{size} {dtype} matmul on {torch.get_num_threads()} thread(s)"


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, precision)
        return found if found else (None, f"{name}: not in the peak table (pipeline/profile/peak.py)")
    return cpu_peak(precision)
