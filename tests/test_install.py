"""The project installed as a package (a wheel, not editable) works from outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]


def run(command: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_install_validates_and_trains_outside_the_checkout(tmp_path):
    # Build the wheel from a copy of the sources, so the build writes nothing into the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pipeline", "specs"):
        shutil.copytree(CHECKOUT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, "."], source)
    (wheel,) = tmp_path.glob("gan_pipeline-*.whl")

    # A fresh venv that sees this environment's third-party packages (torch, DALI, DeepSpeed: a
    # path line in a .pth file) but not the editable install of the checkout, whose own .pth file
    # is not processed from there.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([python, "-c", purelib], tmp_path).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    where = run([python, "-c", "import pipeline; print(pipeline.__file__)"], outside, env).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where  # the installed package, not the checkout

    report = json.loads(run([python, "-m", "pipeline", "validate", "biggan_deep_256", "--json"], outside, env).stdout)
    assert report["generator"]["params"] == 55_736_708  # shared/REFERENCE.md

    command = [env_dir / "bin" / "gan-pipeline", "train", "spec=demo", "train.max_steps=2", "train.log_every=1"]
    run(command + ["train.batch_size=8", "eval.every=null"], outside, env)
    rows = [json.loads(line) for line in (outside / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (outside / "shards" / "demo" / "manifest.json").exists()  # the demo data, built on first use
    assert (outside / "runs" / "demo" / "export" / "generator.safetensors").exists()
