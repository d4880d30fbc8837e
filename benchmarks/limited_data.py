"""Limited data (issue 29): the demo trained on 10% of the digits (every tenth, 180 images) without
augmentation, with DiffAugment and with ADA, the same steps each; every run's EMA generator scored by
FID and class accuracy with the demo classifier against the full digits (1,797).

Usage: python benchmarks/limited_data.py OUT_DIR [--steps N] [--ada-kimg K] [--num N] [--only none,diffaugment,ada]
       [--data SHARDS_DIR] [key=value ...]
Prints one JSON line per run and writes OUT_DIR/limited_data.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=375, help="training steps per run (the demo's 375)")
    ap.add_argument("--ada-kimg", type=float, default=10.0, help="ADA's kimg: p's speed, scaled to a short run")
    ap.add_argument("--num", type=int, default=1000, help="generated images per evaluation")
    ap.add_argument("--only", default="none,diffaugment,ada", help="which runs")
    ap.add_argument("--data", type=Path, help="where the shards are built (default OUT_DIR), shared between runs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    from pipeline.data.demo import DEMO_CLASSES, DEMO_RESOLUTION, DEMO_SOURCE, demo_samples
    from pipeline.data.shards import write_samples

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or out
    full, tenth = data / "shards-full", data / "shards-10pct"
    py = [sys.executable, "-m", "pipeline"]
    if not (full / "manifest.json").exists():  # the full digits and the demo classifier beside them
        subprocess.run([*py, "demo-data", "--out", str(full)], check=True, cwd=ROOT)
    if not (tenth / "manifest.json").exists():
        samples = demo_samples()[::10]
        write_samples(
            samples, tenth, classes=DEMO_CLASSES, source=DEMO_SOURCE, shard_size=500, resolution=DEMO_RESOLUTION
        )
    runs = {
        "none": [],
        "diffaugment": ["method.augment={kind: diffaugment, policy: 'color,translation,cutout'}"],
        "ada": [f"method.augment={{kind: ada, target: 0.6, kimg: {args.ada_kimg}}}"],
    }
    results = []
    for name in args.only.split(","):
        run_dir = out / f"run-{name}"
        common = [
            f"data.shards={tenth}",
            f"run.dir={run_dir}",
            f"train.max_steps={args.steps}",
            "train.sample_every=1000000",
            f"train.checkpoint_every={args.steps}",
            "eval.every=0",
        ]
        start = time.perf_counter()
        subprocess.run([*py, "train", "spec=demo", *common, *runs[name], *args.overrides], check=True, cwd=ROOT)
        train_s = time.perf_counter() - start
        scored = subprocess.run(
            # the classifier of the full digits (`demo` alone would train one beside the 10% shards)
            [*py, "eval", str(run_dir), "--shards", str(full), "--features", f"demo:{full / 'classifier.safetensors'}"]
            + ["--num", str(args.num), "--json"],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last_p = next((m["augment_p"] for m in reversed(metrics) if "augment_p" in m), None)
        row = {"run": name, "train_s": round(train_s, 1), "final_p": last_p, "eval": json.loads(scored.stdout)}
        print(json.dumps(row), flush=True)
        results.append(row)
    (out / "limited_data.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
