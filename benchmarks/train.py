"""Time full training iterations (every phase of the spec's method: for a GAN, method.d_steps D
steps + 1 G step) of a spec, eager and compiled,
side by side in one process: the training loop itself (`pipeline.train.loop.train`) on synthetic
data, with per-step times taken from its metrics after warm-up (compilation excluded).

Usage: python benchmarks/train.py spec=NAME [key=value ...] [--steps N] [--warmup N] [--eager-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import split_spec_args  # noqa: E402
from pipeline.methods import describe  # noqa: E402
from pipeline.spec import load_spec  # noqa: E402
from pipeline.train.loop import train  # noqa: E402


def run(spec_arg: str, overrides: list[str], compiled: bool, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_spec(
            spec_arg,
            overrides
            + [
                "data.synthetic=true",
                f"run.dir={tmp}",
                f"train.max_steps={warmup + steps}",
                "train.log_every=1",
                f"train.sample_every={10**9}",
                f"train.checkpoint_every={10**9}",
                f"compile.enabled={compiled}",
            ],
        )
        start = time.perf_counter()
        train(loaded)
        total = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    # real images read per iteration, from the log (images_seen grows by it each step)
    per_iteration = rows[1]["images_seen"] - rows[0]["images_seen"]
    rates = [r["images_per_s"] for r in rows[warmup:]]
    warm = [per_iteration / r["images_per_s"] for r in rows[:warmup]]
    return {
        "images_per_s": statistics.median(rates),
        "s_per_iteration": per_iteration / statistics.median(rates),
        "first_iteration_s": warm[0] if warm else None,
        "total_s": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("args", nargs="*")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eager-only", action="store_true")
    ns = ap.parse_args()
    spec_arg, overrides = split_spec_args(ns.args, default="biggan_deep_128_ch32")
    spec = load_spec(spec_arg, overrides).spec
    print(
        f"{spec.name}: batch {spec.train.batch_size}, method {spec.method.kind} "
        f"({describe(spec.method.build(spec).phases)}) per iteration, "
        f"{spec.train.precision}, {ns.steps} timed iterations after {ns.warmup} warm-up",
        flush=True,
    )
    results = {}
    for name in ("eager",) if ns.eager_only else ("eager", "compiled"):
        r = results[name] = run(spec_arg, overrides, name == "compiled", ns.steps, ns.warmup)
        print(
            f"  {name:9s} {r['s_per_iteration']:7.3f} s/iteration  {r['images_per_s']:8.2f} images/s  "
            f"(first iteration {r['first_iteration_s']:.1f} s)",
            flush=True,
        )
    if "compiled" in results:
        speedup = results["eager"]["s_per_iteration"] / results["compiled"]["s_per_iteration"]
        print(f"  compiled / eager speed: {speedup:.2f}x")


if __name__ == "__main__":
    main()
