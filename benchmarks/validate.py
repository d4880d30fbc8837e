"""Time `python -m pipeline validate SPEC --json` end to end (fresh processes), side by side with
the fixed costs it cannot avoid: starting Python with torch imported, and the first operator on
the meta device (which imports torch._dynamo). Usage: python benchmarks/validate.py spec=NAME [runs]"""

import statistics
import subprocess
import sys
import time


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    spec = sys.argv[1].removeprefix("spec=") if len(sys.argv) > 1 else "biggan_deep_512"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    py = sys.executable
    commands = {
        "validate": [py, "-m", "pipeline", "validate", spec, "--json"],
        "import torch": [py, "-c", "import torch"],
        "import torch + first meta op": [py, "-c", "import torch; torch.relu(torch.empty(1, device='meta'))"],
    }
    times = {name: [] for name in commands}
    for _ in range(runs):  # interleaved, so that load on the machine hits all three alike
        for name, cmd in commands.items():
            times[name].append(wall(cmd))
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
