"""What `train` and `validate` say: checks that need no computation come first, a finished run
says so, a finished train reports its scores, and a fresh CPU run builds no C++ extension."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.train import loop, preflight


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail the test if `train` starts the process group (which comes before any network, engine
    or loader is built)."""

    def refuse(*args, **kwargs):
        raise AssertionError("train started building before refusing")

    monkeypatch.setattr("pipeline.distributed.engines.setup", refuse)


def test_missing_shards_are_refused_before_anything_is_built(cli, nothing_is_built, tmp_path):
    result = cli("train", "spec=biggan_deep_256", f"run.dir={tmp_path / 'run'}")
    assert result.code == 2
    assert "data.shards: not set" in result.err
    assert not (tmp_path / "run").exists()


def test_a_batch_that_does_not_split_is_refused_before_launching(cli, nothing_is_built, monkeypatch, demo_shards):
    monkeypatch.setattr("pipeline.commands.run.launch", lambda *a: pytest.fail("launched ranks"))
    result = cli("train", "spec=demo", f"data.shards={demo_shards}", "train.batch_size=10", "procs=3")
    assert result.code == 2
    assert "train.batch_size 10 is not a multiple of batch_per_rank 3 x 3 rank(s)" in result.err


def test_compile_without_a_compiler_is_refused(cli, nothing_is_built, monkeypatch, demo_shards, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    assert preflight.cxx_compiler() is None
    result = cli("train", "spec=demo", f"data.shards={demo_shards}", f"run.dir={tmp_path / 'run'}", "compile=true")
    assert result.code == 2
    assert "compile.enabled: torch.compile needs a C++ compiler" in result.err


def test_validate_lists_what_train_still_needs(cli, demo_shards):
    result = cli("validate", "biggan_deep_256", "--json")
    assert result.code == 0
    (need,) = json.loads(result.out)["train_needs"]
    assert need.startswith("data.shards: not set")
    result = cli("validate", "demo", f"data.shards={demo_shards}", "--json")
    assert json.loads(result.out)["train_needs"] == []
    result = cli("validate", "biggan_deep_256")
    assert "Before `train` can run it (on 1 rank), 1 thing is missing:" in result.out


def test_a_finished_run_says_so_and_reports_its_last_scores(cli, demo_shards_with_classifier, tmp_path, monkeypatch):
    args = [
        "train",
        "spec=demo",
        f"data.shards={demo_shards_with_classifier}",
        f"run.dir={tmp_path / 'run'}",
        "train.max_steps=1",
        "train.batch_size=8",
        "eval.every=1",
        "eval.num_samples=20",
        "eval.standing_stats=1",
    ]
    first = cli(*args)
    assert first.code == 0, first.err
    assert "trained to step 1 of 1 (8 images)" in first.err  # one D step of 8 real images
    assert "last evaluation, step 1: FID " in first.err and "20 samples" in first.err
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("built a trainer for a complete run"))
    again = cli(*args)
    assert again.code == 0
    assert "is already complete: step 1 (train.max_steps 1); nothing to train" in again.err
    assert "last evaluation, step 1: FID " in again.err


def test_a_fresh_cpu_run_builds_no_extension_and_needs_no_compiler(demo_shards, tmp_path, clean_env, metrics, root):
    """DeepSpeed's CPU backend would JIT-build its shared-memory op (a minute of C++ compilation;
    a traceback without a compiler) before step 1; training never uses it."""
    extensions, empty = tmp_path / "extensions", tmp_path / "bin"
    empty.mkdir()
    env = clean_env | {"TORCH_EXTENSIONS_DIR": str(extensions), "PATH": str(empty)}
    env.pop("CXX", None)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline", "train", "spec=demo", f"data.shards={demo_shards}"]
    done = subprocess.run(
        command + [f"run.dir={run_dir}", "train.max_steps=1", "train.batch_size=8", "eval.every=null"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == [1]
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
    assert "Traceback" not in done.stderr


VALIDATE_THEN_COMPILE = """
import sys, torch
from pipeline.cli import main
assert main(["validate", "biggan_deep_128_ch32", "--json"]) == 0
assert "torch._dynamo" not in sys.modules, "validate imported torch._dynamo"
torch.add(torch.empty(2, device="meta"), 1)  # a Python meta kernel: now the real torch._dynamo
assert type(sys.modules["torch._dynamo"]) is type(sys), sys.modules["torch._dynamo"]
assert torch.compile(lambda x: torch.relu(x) + 1)(torch.tensor([-1.0, 2.0])).tolist() == [1.0, 3.0]
print("ok")
"""


def test_validate_does_not_import_dynamo_and_compile_works_after_it(clean_env, root):
    """torch's meta kernels import torch._dynamo (over 1 s) only to mark themselves untraceable;
    analysis runs them without that import, and leaves nothing behind that compile would notice."""
    done = subprocess.run(
        [sys.executable, "-c", VALIDATE_THEN_COMPILE], cwd=root, env=clean_env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
