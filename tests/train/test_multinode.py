"""Several machines, tested on one: README's DeepSpeed launcher line run as two "nodes" (node ranks
0 and 1 on 127.0.0.1, one CPU rank each, gloo), against the same run on one node (`procs=2`)."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from helpers import PATIENCE_S, wait_for_steps

from pipeline.distributed.engines import free_port
from pipeline.train import checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"
# a run whose ranks read their own parts of the demo shards, with cross-replica BN across the
# nodes; Adam's eps as in test_two_ranks_equal_one_rank (tests/train/test_train.py)
COMMON = [
    "spec=demo",
    "method.d_steps=2",  # each step reads two batches
    "train.batch_size=8",
    "train.log_every=1",
    "train.sample_every=100",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "generator.cross_replica_bn=true",
    "train.g_opt.eps=1e-4",
    "train.d_opt.eps=1e-4",
    "eval.every=null",
]
LOST = "another rank of this run stopped or stopped answering"


def readme_line() -> list[str]:
    """The launcher line of README's 'Several machines' section, as words."""
    section = README.read_text().split("### Several machines", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("deepspeed ")]
    assert len(lines) == 1, "README's 'Several machines' section has one launcher line"
    srun = [line for line in section.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and lines[0].replace("$NODE_RANK", "$SLURM_NODEID") in srun[0], "SLURM runs the same line"
    return shlex.split(lines[0])


def node_command(node: int, hostfile: Path, port: int, args: list[str]) -> list[str]:
    """README's line for one node, with this host's values and the test's spec and overrides."""
    values = {"hostfile": str(hostfile), "$NODE_RANK": str(node), "$MASTER_ADDR": "127.0.0.1", "29500": str(port)}
    words = readme_line()
    assert set(values) <= set(words) and words[-1] == "spec=biggan_deep_256", words
    words = [values.get(w, w) for w in words[:-1]] + args
    return [str(Path(sys.executable).with_name("deepspeed")), *words[1:]]


def start_nodes(tmp_path: Path, args: list[str], env: dict, name: str) -> list[tuple[subprocess.Popen, Path]]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port, nodes = free_port(), []
    for node in (0, 1):
        stderr_path = tmp_path / f"{name}-node{node}.txt"
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen(
                node_command(node, hostfile, port, args),
                cwd=README.parent,
                env=env,
                stdout=stderr,
                stderr=subprocess.STDOUT,
            )
        nodes.append((proc, stderr_path))
    return nodes


def finish(nodes, timeout: float = PATIENCE_S) -> list[int]:
    """Each node's exit status; a node still running after `timeout` is killed and fails the test."""
    codes, deadline = [], time.monotonic() + timeout
    for proc, stderr_path in nodes:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p, _ in nodes:
                _kill_tree(p)
            pytest.fail(f"a node had not exited after {timeout:.0f} s:\n" + stderr_path.read_text()[-3000:])
    return codes


def _kill_tree(proc: subprocess.Popen) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def training_process(launcher: subprocess.Popen) -> psutil.Process:
    """The `python -m pipeline train` process a node's launcher started."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        words = child.cmdline()  # `python -u -m pipeline --local_rank=0 train ...`, not the launcher's own
        if "-m" in words and words[words.index("-m") + 1 :][:1] == ["pipeline"]:
            return child
    raise AssertionError("the launcher has no training process")


def test_every_process_group_waits_the_runs_timeout(root, clean_env):
    """DeepSpeed reduces gradients in a group of its own (a clone of the world group): it gives up
    on a hung rank after run.collective_timeout_s, like the world group, not after torch's default
    half hour (seen: a stopped node held the other in a gradient all-reduce)."""
    code = textwrap.dedent(
        """
        import json, types, torch
        from torch.distributed import distributed_c10d
        from pipeline.distributed import engines
        from pipeline.spec.schema import OptimizerSpec
        engines.setup("cpu", timeout_s=7)
        train = types.SimpleNamespace(zero_stage=0, precision="fp32")
        engine = engines.Engine("d", {"d": torch.nn.Linear(2, 2)}, {"d": OptimizerSpec(lr=1e-3)},
                                engines.engine_config(train, 1, 1, 1))
        groups = [engine._engine.data_parallel_group, *distributed_c10d._world.pg_map]
        print(json.dumps([g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=clean_env, capture_output=True, text=True, timeout=PATIENCE_S
    )
    assert out.returncode == 0, out.stderr[-3000:]
    timeouts = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(timeouts) >= 3 and set(timeouts) == {7.0}, timeouts


@pytest.mark.slow
def test_two_nodes_equal_one_node_with_two_ranks(demo_shards, tmp_path, root, clean_env, metrics):
    args = [*COMMON, f"data.shards={demo_shards}", "train.max_steps=4"]
    one = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", *args, "procs=2", f"run.dir={tmp_path / 'one'}"],
        cwd=root,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    nodes = start_nodes(tmp_path, [*args, f"run.dir={tmp_path / 'two'}"], clean_env, "run")
    assert finish(nodes) == [0, 0], nodes[0][1].read_text()[-3000:] + nodes[1][1].read_text()[-3000:]

    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["images_seen"] for r in a] == [r["images_seen"] for r in b] == [16, 32, 48, 64]
    for x, y in zip(a, b, strict=True):
        tolerance = 1e-6 if x["step"] == 1 else 1e-4
        for key in ("loss_d", "loss_g", "d_real", "d_fake"):
            assert y[key] == pytest.approx(x[key], rel=tolerance, abs=tolerance / 10), (x["step"], key)
    # every checkpoint once: the same files as the one-node run's, intact, nothing left half-written
    for run in ("one", "two"):
        saved = sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir())
        assert saved == ["step-00000002", "step-00000004"], (run, saved)
    for step in ("step-00000002", "step-00000004"):
        files = {
            run: sorted(str(f.relative_to(tmp_path / run)) for f in (tmp_path / run / "checkpoints" / step).rglob("*"))
            for run in ("one", "two")
        }
        assert files["one"] == files["two"]
        assert f"checkpoints/{step}/rank-00001.pt" in files["two"]
        assert checkpoint.damage(tmp_path / "two" / "checkpoints" / step) is None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_node_stops_the_run_and_the_same_lines_resume_it(demo_shards, tmp_path, clean_env, metrics, how):
    """SIGKILL of node 0's process (rank 0, which holds the run's lock), or SIGSTOP of node 1's
    (a hung machine: the other waits run.collective_timeout_s): every node exits with a message
    naming the checkpoint, and the same two lines resume from it to the end."""
    run_dir = tmp_path / "run"
    args = [
        *COMMON,
        f"data.shards={demo_shards}",
        "train.max_steps=12",
        "run.collective_timeout_s=10",
        f"run.dir={run_dir}",
    ]
    nodes = start_nodes(tmp_path, args, clean_env, "first")
    wait_for_steps(nodes[0][0], run_dir, 3, nodes[0][1])
    victim = training_process(nodes[0 if how == "killed" else 1][0])
    victim.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    stopped = time.monotonic()
    survivor = nodes[1 if how == "killed" else 0]
    try:
        survivor[0].wait(timeout=120)  # no hang: seconds after a kill, the timeout after a stop
    except subprocess.TimeoutExpired:
        for p, _ in nodes:
            _kill_tree(p)
        pytest.fail(f"the surviving node had not exited 120 s after the {how} node:\n{survivor[1].read_text()[-3000:]}")
    waited = time.monotonic() - stopped
    if how == "hung":
        victim.kill()
    assert finish(nodes, timeout=60) != [0, 0]
    said = survivor[1].read_text()
    assert LOST in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    last = checkpoint.latest(run_dir)
    assert f"the last complete checkpoint is {last}" in said, said[-3000:]
    assert waited < (60 if how == "killed" else 10 + 60), waited
    if how == "hung":
        assert waited >= 10 - 1  # the collective waited its timeout, no less
    done_before = checkpoint.read_state(last)["step"]

    nodes = start_nodes(tmp_path, args, clean_env, "again")
    assert finish(nodes) == [0, 0], nodes[0][1].read_text()[-3000:] + nodes[1][1].read_text()[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert checkpoint.read_state(checkpoint.latest(run_dir))["step"] == 12
    assert done_before >= 2
