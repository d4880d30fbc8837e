"""Elastic resume: a run checkpointed on N ranks continues on M with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train import PATIENCE_S

# global BN and Adam's eps as in test_two_ranks_equal_one_rank (tests/test_train.py): runs on
# different numbers of ranks then agree to that test's tolerance
COMMON = [
    "spec=demo",
    "train.batch_size=8",
    "train.log_every=1",
    "train.sample_every=100",
    "train.checkpoint_every=2",
    "generator.cross_replica_bn=true",
    "train.g_opt.eps=1e-4",
    "train.d_opt.eps=1e-4",
    "eval.every=null",
]


def train(root, env, run_dir, ranks: int, steps: int, *extra) -> None:
    command = [sys.executable, "-m", "pipeline", "train", *COMMON, *extra, f"train.max_steps={steps}"]
    command += [f"run.dir={run_dir}"] + ([f"procs={ranks}"] if ranks > 1 else [])
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=PATIENCE_S)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_to_one_and_one_to_two_continue_the_run(demo_shards, tmp_path, root, clean_env, metrics):
    """ZeRO stage 0 (1 and 2 are refused on another number of ranks). 2 -> 1 and 1 -> 2 ranks at step
    2 of 4: every step's losses equal those of the run left on its first number of ranks (the same
    global batch, global BN, the data read in the run's parts)."""
    extra = [f"data.shards={demo_shards}"]
    for first, then in ((2, 1), (1, 2)):
        straight, moved = tmp_path / f"{first}", tmp_path / f"{first}to{then}"
        train(root, clean_env, straight, first, 4, *extra)
        train(root, clean_env, moved, first, 2, *extra)
        train(root, clean_env, moved, then, 4, *extra)
        state = json.loads((moved / "checkpoints" / "step-00000004" / "state.json").read_text())
        assert (state["world_size"], state["data_parts"]) == (then, first)
        a, b = metrics(straight), metrics(moved)
        assert [r["images_seen"] for r in a] == [r["images_seen"] for r in b] == [16, 32, 48, 64]
        for x, y in zip(a, b, strict=True):
            tolerance = 1e-6 if x["step"] <= 2 else 1e-4
            for key in ("loss_d", "loss_g", "d_real", "d_fake"):
                assert y[key] == pytest.approx(x[key], rel=tolerance, abs=tolerance / 10), (first, then, x["step"], key)
