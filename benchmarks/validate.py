"""Time `python -m pipeline validate SPEC --json` end to end (fresh processes), side by side with
the fixed costs: starting Python with torch imported, and torch's first Python meta kernel, which
imports torch._dynamo (validate's analysis avoids that import; see pipeline/graph/check.py).

    python benchmarks/validate.py [spec=NAME] [RUNS] [--checkout DIR ...]

`--checkout DIR` also times `validate` in another checkout (e.g. a `git worktree` of an earlier
commit), interleaved with the rest, so a shared machine's load hits all alike."""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=cwd)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="spec=biggan_deep_512")
    parser.add_argument("runs", nargs="?", type=int, default=5)
    parser.add_argument("--checkout", action="append", type=Path, default=[], help="another checkout to time")
    ns = parser.parse_args()
    spec, runs, py = ns.spec.removeprefix("spec="), ns.runs, sys.executable
    commands = {
        "validate": ([py, "-m", "pipeline", "validate", spec, "--json"], None),
        **{f"validate in {c}": ([py, "-m", "pipeline", "validate", spec, "--json"], c) for c in ns.checkout},
        "import torch": ([py, "-c", "import torch"], None),
        "import torch + first meta op": ([py, "-c", "import torch; torch.relu(torch.empty(1, device='meta'))"], None),
    }
    times = {name: [] for name in commands}
    for _ in range(runs):  # interleaved, so that load on the machine hits all alike
        for name, (cmd, cwd) in commands.items():
            times[name].append(wall(cmd, cwd))
    base = statistics.median(times["validate"])
    print(f"spec {spec}, {runs} runs each, median wall seconds (min):")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:30s} {med:6.2f} s  ({min(values):.2f})  {med / base:5.1%} of validate")
    # Our own share, in one process after the fixed costs: load + merge + pydantic + graph analysis.
    code = (
        "import time, torch; from pipeline.spec import load_spec; from pipeline.graph import analyze_spec\n"
        "torch.relu(torch.empty(1, device='meta'))\n"
        f"ts = []\nfor _ in range({runs}):\n"
        "    t = time.perf_counter()\n"
        f"    analyze_spec(load_spec({spec!r}, check_graphs=False))\n"
        "    ts.append(time.perf_counter() - t)\n"
        "print(sorted(ts)[len(ts) // 2], min(ts))"
    )
    med, low = map(float, subprocess.run([py, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    print(f"  {'load + analyze, in process':30s} {med:6.2f} s  ({low:.2f})  {med / base:5.1%} of validate")


if __name__ == "__main__":
    main()
