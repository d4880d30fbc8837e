"""Seconds from the command to the first logged step of `just train` (the demo, shards present).

    python benchmarks/first_step.py [--rounds N] [--checkout DIR ...] [--fresh-extensions]

Starts `python -m pipeline train` in a fresh run directory, waits for the first line of its
metrics.jsonl, then stops it. With several --checkout directories (e.g. a `git worktree` of an
earlier commit) the rounds are interleaved, so a shared, noisy machine affects each alike.
`--fresh-extensions` points torch's extension cache at an empty directory each round, as on a
fresh machine (where DeepSpeed used to JIT-build its CPU communication op before step 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_step_seconds(checkout: Path, fresh_extensions: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = dict(os.environ, DS_ACCELERATOR="cpu")
        if fresh_extensions:
            env["TORCH_EXTENSIONS_DIR"] = str(Path(tmp) / "torch_extensions")
        command = [sys.executable, "-m", "pipeline", "train", "spec=demo", f"run.dir={run_dir}", "train.log_every=1"]
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            if proc.poll() is not None:
                raise SystemExit(f"{checkout}: train exited with {proc.returncode}:\n{proc.stderr.read().decode()}")
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        proc.kill()
        proc.wait()
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkout", action="append", type=Path, help="checkouts to compare (default: this one)")
    parser.add_argument("--fresh-extensions", action="store_true", help="an empty torch extension cache each round")
    ns = parser.parse_args()
    checkouts = ns.checkout or [ROOT]
    if not (ROOT / "shards" / "demo" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline", "demo-data"], cwd=ROOT, check=True)
    for checkout in checkouts:  # each checkout reads the demo shards of this one
        shards = checkout / "shards" / "demo"
        if checkout != ROOT and not shards.exists():
            shards.parent.mkdir(exist_ok=True)
            shards.symlink_to(ROOT / "shards" / "demo")
    times: dict[Path, list[float]] = {c: [] for c in checkouts}
    for _ in range(ns.rounds):
        for checkout in checkouts:
            times[checkout].append(first_step_seconds(checkout, ns.fresh_extensions))
    print(f"seconds from `train` to the first logged step, {ns.rounds} rounds: median (min, max)")
    for checkout, values in times.items():
        print(f"  {checkout}: {statistics.median(values):.1f} ({min(values):.1f}, {max(values):.1f})")


if __name__ == "__main__":
    main()
