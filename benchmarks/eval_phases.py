"""Seconds (wall and CPU) per phase of `eval` of a run: generating, standing statistics, the feature
network, KID, IS and FID, at the protocol of the run's spec.

    python benchmarks/eval_phases.py RUN [--num N] [--features demo|inception:PATH]

Runs `pipeline.eval.evaluate.evaluate` (what `just eval RUN --num N` runs) with each phase wrapped
in a timer. Run it once first (or `just eval RUN`) so the real statistics are cached beside the
shards: their one-time computation is not part of these phases.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch

import pipeline.eval.evaluate as evaluate
import pipeline.eval.features as features
import pipeline.eval.metrics as metrics

wall: dict[str, float] = collections.defaultdict(float)
cpu: dict[str, float] = collections.defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - start_cpu

    return wrapper


def timed_generator(name, make):
    def wrapper(*args, **kwargs):
        items = make(*args, **kwargs)
        step = timed(name, lambda: next(items, None))
        while (item := step()) is not None:
            yield item

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--features", default=None, help="default: the spec's eval.features")
    args = parser.parse_args()
    for name in ("kernel_inception_distance", "inception_score", "frechet_distance"):
        setattr(metrics, name, timed(name, getattr(metrics, name)))
    metrics._Moments.update = timed("moments", metrics._Moments.update)  # type: ignore[method-assign]
    evaluate.standing_stats = timed("standing statistics", evaluate.standing_stats)
    evaluate.fake_batches = timed_generator("generating", evaluate.fake_batches)
    for net in (features.DemoFeatureNet, features.InceptionFeatureNet):
        net.forward = timed("feature network", net.forward)  # type: ignore[method-assign]
    start, start_cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as out:
        record = evaluate.evaluate(args.run, num=args.num, features=args.features, out_dir=out)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"{args.num} samples, torch threads {torch.get_num_threads()}: {total:.1f} s wall, {total_cpu:.1f} s CPU")
    for name, seconds in sorted(wall.items(), key=lambda item: -item[1]):
        print(f"  {name:28s} {seconds:7.1f} s wall {cpu[name]:7.1f} s CPU")
    result = record["results"][0]
    print({key: result[key] for key in ("fid", "kid_mean", "is_mean", "is_std", "class_accuracy")})


if __name__ == "__main__":
    main()
