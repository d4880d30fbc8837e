"""Elastic resume: a run checkpointed on N ranks continues on M with the same global batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import PATIENCE_S

# global BN and Adam's eps as in test_two_ranks_equal_one_rank (tests/train/test_train.py): runs on
# different numbers of ranks then agree to that test's tolerance
COMMON = [
    "spec=demo",
    "method.d_steps=2",  # each step reads two batches
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
@pytest.mark.parametrize(("first", "then", "stage"), [(2, 1, 0), (1, 2, 1), (2, 1, 2)])
def test_a_run_continues_on_another_number_of_ranks(
    demo_shards, tmp_path, root, clean_env, metrics, first, then, stage
):
    """The step-2 checkpoint of a 4-step run on `first` ranks, resumed on `then`: steps 3 and 4
    have the losses of the run left on its first number of ranks (the same global batch, global BN,
    the data read in the run's parts; under ZeRO 1/2 Adam's state partitioned anew)."""
    extra = [f"data.shards={demo_shards}", f"train.zero_stage={stage}"]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    train(root, clean_env, straight, first, 4, *extra)
    shutil.copytree(straight / "checkpoints" / "step-00000002", moved / "checkpoints" / "step-00000002")
    train(root, clean_env, moved, then, 4, *extra)
    state = json.loads((moved / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert (state["world_size"], state["data_parts"]) == (then, first)
    a, b = metrics(straight)[2:], metrics(moved)
    assert [r["images_seen"] for r in a] == [r["images_seen"] for r in b] == [48, 64]
    for x, y in zip(a, b, strict=True):
        for key in ("loss_d", "loss_g", "d_real", "d_fake"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["step"], key)
