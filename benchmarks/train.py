"""Time training iterations (every phase of the spec's method: for a GAN, method.d_steps D steps
+ 1 G step) of a spec eagerly and compiled (regional and whole-graph), optionally beside the
authors' BigGAN-PyTorch (`--reference DIR`, see benchmarks/reference.py).

Each mode runs in a fresh process with an empty inductor cache, so compilation is cold, as on a
new machine (a `-warm` mode: with a cache a first run of it filled, as a resumed run finds it);
modes are interleaved over `--rounds` on a shared machine and the medians reported,
with ratios taken within the run. A mode's process builds what `train` builds (`Trainer`: the
DeepSpeed engines, EMA, the method's phases) on synthetic data and runs `--warmup` steps (the
first compiles; compile seconds = warm-up time beyond that many steady iterations), then
`--steps` timed ones, counting the graphs dynamo compiles while timed (0 in steady state).

Usage: python benchmarks/train.py [spec=NAME] [key=value ...] [--steps N] [--warmup N]
       [--modes eager,regional,whole,regional-warm,whole-warm] [--rounds R] [--reference DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "eager": ["compile.enabled=false"],
    "regional": ["compile.enabled=true", "compile.scope=regional"],
    "whole": ["compile.enabled=true", "compile.scope=whole"],
}
# the same, compiled in a fresh process whose inductor cache (FX graphs, AOT autograd) a first,
# unmeasured run of the mode filled: what a resumed run or a second run of the spec pays
MODES |= {f"{mode}-warm": MODES[mode] for mode in ("regional", "whole")}


def child(spec_arg: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """One mode, in this process: warm-up then timed steps of the real training step."""
    import torch
    from torch._dynamo.utils import counters

    from pipeline.spec import load_spec
    from pipeline.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_spec(spec_arg, [*overrides, "data.synthetic=true", f"run.dir={tmp}", "eval.every=0"])
        tr = Trainer(loaded, resume=False)
        times = []
        for i in range(warmup + steps):
            if i == warmup:
                graphs_before = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            tr.run_step()
            times.append(time.perf_counter() - start)
        recompiles = counters["stats"]["unique_graphs"] - graphs_before
    iteration = statistics.median(times[warmup:])
    return {
        "s_per_iteration": iteration,
        "first_iteration_s": times[0],
        "compile_s": sum(times[:warmup]) - warmup * iteration,
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles_timed": recompiles,
        "images_per_iteration": tr.images_last_step,
        "threads": torch.get_num_threads(),
    }


def run_mode(mode: str, args: list[str], steps: int, warmup: int, cache: str | None = None) -> dict:
    """A mode in a fresh process with an empty inductor cache (cold compilation), or with `cache`."""
    with tempfile.TemporaryDirectory() as empty:
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache or empty, "DS_ACCELERATOR": "cpu"}
        command = [sys.executable, __file__, "--child", *args, *MODES[mode], f"--steps={steps}", f"--warmup={warmup}"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_reference(checkout: str, batch: int, ch: int, steps: int, warmup: int) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / "reference.py"), "--checkout", checkout]
    command += [f"--batch={batch}", f"--ch={ch}", f"--steps={steps}", f"--warmup={warmup}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"the reference failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("args", nargs="*")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="eager,regional")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reference", metavar="DIR", help="a checkout of ajbrock/BigGAN-PyTorch to time beside")
    ap.add_argument("--reference-ch", type=int, default=32, help="its G_ch = D_ch (biggan_deep_128_ch32: 32)")
    ap.add_argument("--json", metavar="OUT", help="also write every measurement to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()

    from pipeline.commands import split_spec_args

    spec_arg, overrides = split_spec_args(ns.args, default="biggan_deep_128_ch32")
    if ns.child:
        print(json.dumps(child(spec_arg, overrides, ns.steps, ns.warmup)))
        return

    from pipeline.methods import describe
    from pipeline.spec import load_spec

    spec = load_spec(spec_arg, overrides).spec
    modes = ns.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    print(
        f"{spec.name}: batch {spec.train.batch_size}, method {spec.method.kind} "
        f"({describe(spec.method.build(spec).phases)}) per iteration, {spec.train.precision}, "
        f"channels_last {spec.compile.channels_last}; {ns.steps} timed iterations after {ns.warmup} warm-up, "
        f"{ns.rounds} round(s), each mode in a fresh process with an empty inductor cache (-warm: a filled one)",
        flush=True,
    )
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    if ns.reference:
        runs["reference"] = []
    caches = {m: tempfile.mkdtemp(prefix="inductor-") for m in modes if m.endswith("-warm")}
    for mode, cache in caches.items():  # a cold run of the mode fills its cache: one more cold measurement
        cold = mode.removesuffix("-warm")
        primed = run_mode(cold, [f"spec={spec_arg}", *overrides], ns.steps, ns.warmup, cache)
        runs = {cold: [], **runs} if cold not in runs else runs
        runs[cold].append(primed)
        print(f"  filled the cache of {mode}: {cold} (cold), compile {primed['compile_s']:.1f} s", flush=True)
    for r in range(ns.rounds):
        for mode in [*modes, *(["reference"] if ns.reference else [])]:
            if mode == "reference":
                result = run_reference(ns.reference, spec.train.batch_size, ns.reference_ch, ns.steps, ns.warmup)
            else:
                result = run_mode(mode, [f"spec={spec_arg}", *overrides], ns.steps, ns.warmup, caches.get(mode))
            runs[mode].append(result)
            compile_s = f", compile {result['compile_s']:.1f} s" if mode != "eager" else ""
            print(f"  round {r + 1} {mode:9s} {result['s_per_iteration']:.3f} s/iteration{compile_s}", flush=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    base = "reference" if ns.reference else modes[0]
    print(f"\n  {'mode':9s} {'s/iteration':>11s} {'vs ' + base:>14s} {'compile s':>10s} {'graphs':>7s} {'timed':>6s}")
    for mode in runs:
        s = median(mode, "s_per_iteration")
        compiled = mode not in ("eager", "reference")
        print(
            f"  {mode:9s} {s:11.3f} {s / median(base, 's_per_iteration'):13.3f}x "
            f"{median(mode, 'compile_s') if compiled else float('nan'):10.1f} "
            f"{runs[mode][-1].get('graphs', 0):7d} {runs[mode][-1].get('recompiles_timed', 0):6d}"
        )
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    if ns.json:
        Path(ns.json).write_text(json.dumps({"spec": spec.name, "overrides": overrides, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
