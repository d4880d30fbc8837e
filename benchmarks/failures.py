"""The failure detectors on real runs: false alarms on healthy runs, and a provoked collapse.

    python benchmarks/failures.py [--healthy SPEC ...] [--no-collapse] [--out DIR] [key=value ...]

1. Healthy: trains each spec in full with its own settings (train.failures.on_failure: warn, the
   default) and counts the logged lines that carry a `failure`.
2. Collapse: trains the demo to its first checkpoint (step 125), then resumes it with D's learning
   rate raised 25x (`train.d_opt.lr=1e-2`) and `train.failures.on_failure=rollback`, as a user
   would; prints every alarm and rollback, and the final scores beside the healthy demo's.

key=value arguments are passed to the collapse's resumed run (e.g.
`train.failures.rollback.lr_scale=0.2`). Runs go to --out (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEALTHY = ["demo", "dcgan_demo", "progan_demo", "csgan_demo"]


def train(spec: str, run_dir: Path, *overrides: str) -> tuple[list[dict], float, int]:
    """Run `python -m pipeline train`; its metrics lines, seconds and exit status."""
    command = [sys.executable, "-m", "pipeline", "train", f"spec={spec}", f"run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr.decode()[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()], seconds, done.returncode


def last_eval(rows: list[dict]) -> dict:
    scores = [r for r in rows if "fid" in r]
    return {k: scores[-1][k] for k in ("step", "fid", "class_accuracy") if k in scores[-1]} if scores else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--healthy", nargs="*", default=HEALTHY, help="specs to train in full (default: %(default)s)")
    parser.add_argument("--no-collapse", action="store_true", help="skip the provoked collapse")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary directory)")
    ns, overrides = parser.parse_known_args()
    out = ns.out or Path(tempfile.mkdtemp(prefix="failures-"))
    if not (ROOT / "shards" / "demo" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline", "demo-data"], cwd=ROOT, check=True)
    healthy_demo = None
    print(f"runs in {out}\n\n## healthy runs (train.failures defaults)\n")
    print("| spec | logged lines | lines with a failure | detectors | seconds |")
    print("|---|---:|---:|---|---:|")
    for spec in ns.healthy:
        rows, seconds, _ = train(spec, out / spec)
        logged = [r for r in rows if "loss_g" in r]
        alarms = [r for r in logged if "failure" in r]
        detectors = sorted({d for r in alarms for d in r["failure"]})
        print(f"| {spec} | {len(logged)} | {len(alarms)} | {', '.join(detectors) or '-'} | {seconds:.0f} |", flush=True)
        for r in alarms:
            print(f"|   step {r['step']} | | | {r['failure_message']} | |")
        if spec == "demo":
            healthy_demo = last_eval(rows)
    if ns.no_collapse:
        return
    run = out / "demo-collapse"
    train("demo", run, "train.max_steps=125")
    resumed = ["train.d_opt.lr=1e-2", "train.failures.on_failure=rollback", *overrides]
    rows, seconds, code = train("demo", run, *resumed)
    print(f"\n## collapse: demo resumed at step 125 with {' '.join(resumed)} (exit {code}, {seconds:.0f} s)\n")
    for r in rows:
        if ("failure" in r and r["step"] > 125) or "rollback" in r:
            what = r.get("failure_message") or f"rolled back from step {r['at_step']} to {r['step']}: {r['reason']}"
            print(f"- step {r['step']}: {what}")
    final = [r for r in rows if "lr_d" in r][-1]
    print(f"\nlast logged step {final['step']}, lr_d {final['lr_d']:.3g}; scores at the end: {last_eval(rows)}")
    if healthy_demo:
        print(f"the healthy demo's at the end: {healthy_demo}")


if __name__ == "__main__":
    main()
