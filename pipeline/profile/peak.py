"""The device's peak FLOP/s, the denominator of MFU (model FLOPs utilization): a true upper bound
on what the hardware can execute, so that MFU stays in (0, 1].

GPUs: dense (no sparsity) tensor-core peaks from the vendors' data sheets, by precision. "fp32"
training on NVIDIA GPUs runs convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`),
so its peak is TF32's when that is on.

CPUs: the theoretical dense peak of the cores this rank uses, cores x clock x FLOPs per cycle:
- cores: the physical cores of the CPUs this process may run on (SMT siblings share their FMA
  units), shared among the ranks on this host, at most torch's thread count;
- clock: the highest the cores can run, from cpufreq's `cpuinfo_max_freq` where the kernel exposes
  it; else the highest boost clock of the CPU's family (virtual machines hide cpufreq and
  /proc/cpuinfo's "cpu MHz" is the nominal clock, which turbo exceeds); else 6.2 GHz, the highest
  boost of any x86 core; `PIPELINE_CPU_MAX_GHZ` sets it where the user knows better;
- FLOPs per cycle: from the instruction set found (/proc/cpuinfo flags) for the run's precision:
  FMA units x vector lanes x 2, AVX-512 on AMD Zen 4 running on 256-bit pipes, bf16 dot products
  (AVX512_BF16) at twice the fp32 rate, AMX tiles at 1024 bf16 FLOPs per cycle.
A measured matrix product (`matmul_rate`) is shown beside it as the best achieved, never as the
denominator: the demo's convolutions ran faster than a 1024x1024 matmul did (MFU 111%).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

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


def matmul_rate(precision: str, *, size: int = 1024, seconds: float = 1.0) -> float:
    """The best FLOP/s of `size`-square matrix products over about `seconds`, on torch's threads."""
    dtype = DTYPES[precision]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool and packing buffers
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# the highest boost clock (GHz) of any part of a CPU family, where cpufreq is hidden:
# (vendor, family, lowest model, highest model, model-name fragment, GHz, family's name). Sources: AMD's
# and Intel's product pages (EPYC 9174F 4.4 GHz, EPYC 9575F 5.0, EPYC 72F3 4.1, Xeon 6544Y 4.1 ...).
CPU_MAX_GHZ = [
    ("AuthenticAMD", 0x19, 0x00, 0x0F, "EPYC", 4.1, "AMD EPYC Zen 3"),
    ("AuthenticAMD", 0x19, 0x10, 0x1F, "EPYC", 4.4, "AMD EPYC Zen 4 (Genoa)"),
    ("AuthenticAMD", 0x19, 0xA0, 0xAF, "EPYC", 4.4, "AMD EPYC Zen 4c (Bergamo, Siena)"),
    ("AuthenticAMD", 0x1A, 0x00, 0x1F, "EPYC", 5.0, "AMD EPYC Zen 5 (Turin)"),
    ("GenuineIntel", 0x06, 0x00, 0xFF, "Xeon", 4.3, "Intel Xeon"),
]
ANY_X86_GHZ = 6.2  # Intel Core i9-14900KS, the highest boost of any x86 core


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    family: int
    model: int
    name: str
    flags: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> CpuInfo:
        """The first processor's entries of /proc/cpuinfo."""
        fields = {}
        for line in text.split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        family, model = (fields.get(k, "") for k in ("cpu family", "model"))
        return cls(
            fields.get("vendor_id", ""),
            int(family) if family.isdigit() else -1,
            int(model) if model.isdigit() else -1,
            fields.get("model name", ""),
            frozenset(fields.get("flags", "").split()),
        )


def flops_per_cycle(cpu: CpuInfo, precision: str) -> tuple[int, str]:
    """Dense FLOPs per cycle per core for the precision (an upper bound: the widest units the
    instruction set implies), and how that was derived."""
    f, amd = cpu.flags, cpu.vendor == "AuthenticAMD"
    if "avx512f" in f and amd and cpu.family <= 0x19:
        fp32, how = 32, "AVX-512 on 2 256-bit FMA pipes"
    elif "avx512f" in f:
        fp32, how = 64, "2 AVX-512 FMA units"
    elif "fma" in f and "avx2" in f:
        fp32, how = 32, "2 AVX2 FMA units"
    elif "avx" in f:
        fp32, how = 16, "AVX, no FMA"
    else:
        fp32, how = 8, "SSE"
    if precision == "bf16":
        if "amx_bf16" in f:
            return 1024, "AMX bf16 tiles"
        if "avx512_bf16" in f:
            return 2 * fp32, how + ", bf16 dot products at twice the fp32 rate"
    return fp32, how


def max_clock_ghz(cpu: CpuInfo, cpus: list[int]) -> tuple[float, str]:
    """The highest clock the cores can run at, and where that figure comes from."""
    if os.environ.get("PIPELINE_CPU_MAX_GHZ"):
        text = os.environ["PIPELINE_CPU_MAX_GHZ"]
        try:
            ghz = float(text)
        except ValueError:
            ghz = math.nan
        if not 0.1 <= ghz <= 10:  # NaN too
            from pipeline.errors import user_error

            raise user_error(
                f"PIPELINE_CPU_MAX_GHZ is {text!r}, not a clock in GHz between 0.1 and 10",
                hint="set it to the cores' highest clock, e.g. PIPELINE_CPU_MAX_GHZ=3.7, or unset it",
            )
        return ghz, "PIPELINE_CPU_MAX_GHZ"
    khz = []
    for n in cpus:
        with contextlib.suppress(OSError, ValueError):
            khz.append(int(Path(f"/sys/devices/system/cpu/cpu{n}/cpufreq/cpuinfo_max_freq").read_text()))
    if khz:
        return max(khz) / 1e6, "cpufreq's cpuinfo_max_freq"
    for vendor, family, low, high, fragment, ghz, what in CPU_MAX_GHZ:
        if cpu.vendor == vendor and cpu.family == family and low <= cpu.model <= high and fragment in cpu.name:
            return ghz, f"the highest boost of {what}; cpufreq is not exposed"
    return ANY_X86_GHZ, "the highest boost of any x86 core; this CPU's is unknown (set PIPELINE_CPU_MAX_GHZ)"


def physical_cores(cpus: list[int]) -> int:
    """The physical cores among these logical CPUs (SMT siblings counted once)."""
    cores = set()
    for n in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{n}/topology")
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            cores.add((str(n),))
    return len(cores)


def cpu_peak(precision: str, *, ranks_here: int = 1) -> tuple[float, str]:
    """The theoretical dense peak of this rank's cores (see the module's docstring)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    try:
        cpu = CpuInfo.parse(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = CpuInfo("", -1, -1, "", frozenset())
    cores = max(1, min(torch.get_num_threads(), physical_cores(cpus) // max(1, ranks_here)))
    ghz, clock = max_clock_ghz(cpu, cpus)
    per_cycle, how = flops_per_cycle(cpu, precision)
    peak = cores * ghz * 1e9 * per_cycle
    return peak, f"{cores} core(s) x {ghz:g} GHz ({clock}) x {per_cycle} {precision} FLOP/cycle ({how})"


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, precision)
        return found if found else (None, f"{name}: not in the peak table (pipeline/profile/peak.py)")
    local = os.environ.get("LOCAL_WORLD_SIZE", "")  # the launcher's ranks on this host
    ranks_here = int(local) if local.isdigit() else 1
    return cpu_peak(precision, ranks_here=ranks_here)
