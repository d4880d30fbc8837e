"""The memory estimate per rank against measured peaks.

    python benchmarks/memory.py [--cpu-only | --h100-only]

- H100: the estimate of biggan_deep_256 in the configurations BENCHMARKS.md's H100 profiles ran
  (one rank, no accumulation, ZeRO 0, synthetic data; attention then materialised its map, so
  the estimate is asked for with attention="explicit"), beside the peak memory those profiles
  measured (`torch.cuda.max_memory_allocated`), copied here from BENCHMARKS.md.
- CPU: a real training step of small specs (a Trainer with its DeepSpeed engines and EMA, two
  steps) with torch's CPU memory profiler's peak of allocated bytes (`measure_cpu_peak`), against
  the estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

GIB = 1 << 30

# BENCHMARKS.md, "Profiles of biggan_deep_256 on an H100": (precision, compiled, batch, peak GiB)
H100 = [("fp32", False, 64, 58.5), ("bf16", False, 64, 44.6), ("bf16", True, 64, 30.5), ("bf16", True, 128, 59.4)]

CPU = [
    ("demo", ["train.batch_size=16"]),
    ("demo", ["train.batch_size=64"]),
    ("demo", ["train.batch_size=64", "train.precision=bf16"]),
    ("tiny_biggan", ["train.batch_size=8"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--h100-only", action="store_true")
    ns = ap.parse_args()
    from pipeline.profile.memory import estimate, measure_cpu_peak
    from pipeline.spec import load_spec

    if not ns.cpu_only:
        print("| precision | mode | batch | estimate (eager) | measured peak | estimate / measured |")
        print("|---|---|---:|---:|---:|---:|")
        for precision, compiled, batch, measured in H100:
            loaded = load_spec("biggan_deep_256", [f"train.batch_size={batch}", f"train.precision={precision}"])
            est = estimate(loaded, 1, attention="explicit").per_rank() / GIB
            mode = "compiled" if compiled else "eager"
            print(f"| {precision} | {mode} | {batch} | {est:.1f} GiB | {measured} GiB | {est / measured:.2f} |")
    if not ns.h100_only:
        print("\n| spec | overrides | estimate | measured peak | estimate / measured |")
        print("|---|---|---:|---:|---:|")
        for name, overrides in CPU:
            with tempfile.TemporaryDirectory() as run:
                loaded = load_spec(name, ["data.synthetic=true", f"run.dir={run}", *overrides])
                measured = measure_cpu_peak(loaded)
            est = estimate(loaded, 1).per_rank()
            print(
                f"| {name} | {' '.join(overrides)} | {est / 2**20:.1f} MiB | {measured / 2**20:.1f} MiB "
                f"| {est / measured:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
