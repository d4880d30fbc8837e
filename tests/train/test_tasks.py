"""The parts of a run between steps (train/tasks.py) and the run directory (runs.py), each driven
without a Trainer: a stand-in holds only the attributes the part reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pipeline.distributed.engines import World
from pipeline.runs import Run
from pipeline.train.stops import TrainingStopped
from pipeline.train.tasks import Checkpoints, Evaluation, FailureWatch, MetricsWriter, SampleGrids

WORLD = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))


def stand_in(tmp_path, **train):
    """A trainer as the tasks see it; `step` and `images_seen` are moved by the test."""
    t = SimpleNamespace(max_steps=7, sample_every=2, checkpoint_every=3, log_every=1, keep_checkpoints=2, **train)
    spec = SimpleNamespace(eval=SimpleNamespace(every=3, num_samples=10, features="demo"), method=None)
    return SimpleNamespace(
        t=t, spec=spec, world=WORLD, run_dir=tmp_path, step=0, images_seen=0, nets={}, emas={}, say=lambda line: None
    )


def test_evaluation_scores_a_fresh_run_first_then_every_eval_every_steps_and_at_the_last(tmp_path):
    tr = stand_in(tmp_path)
    tr.scored = lambda: {"generator": None}
    metrics = MetricsWriter(Run(tmp_path), enabled=True)
    scored_at = []

    def evaluate(nets, spec):
        scored_at.append(tr.step)
        return {"fid": 100.0 - tr.step}

    evaluation = Evaluation(tr, metrics, evaluate)
    evaluation.before_training()
    for step in range(1, 8):
        tr.step, tr.images_seen = step, 16 * step
        evaluation.after_step(step, 16 * (step - 1))
    assert scored_at == [0, 3, 6, 7]
    records = Run(tmp_path).metrics.records()
    expected = [(0, 0, 100), (3, 48, 97), (6, 96, 94), (7, 112, 93)]
    assert [(r["step"], r["images_seen"], r["fid"]) for r in records] == expected


def test_evaluation_does_nothing_on_other_ranks_or_with_eval_every_0(tmp_path):
    tr = stand_in(tmp_path)
    tr.spec.eval.every = 0
    called = []
    Evaluation(tr, MetricsWriter(Run(tmp_path), enabled=True), lambda *a: called.append(a) or {}).before_training()
    tr.spec.eval.every, tr.world = 3, World(rank=1, size=2, local_rank=1, device=torch.device("cpu"))
    evaluation = Evaluation(tr, MetricsWriter(Run(tmp_path), enabled=False), lambda *a: called.append(a) or {})
    evaluation.after_step(3, 0)
    assert called == [] and not (tmp_path / "metrics.jsonl").exists()


def test_sample_grids_follow_an_interval_in_images(tmp_path):
    tr = stand_in(tmp_path, **{})
    tr.t.sample_every = "40img"  # every 40 real images: the steps that cross a multiple of 40
    tr.nets = {"generator": torch.nn.Identity()}
    tr.scored = lambda: tr.nets
    tr.spec.method = SimpleNamespace(sample_grid=lambda spec, device: lambda nets: {"": torch.zeros(1, 2, 3, 4, 4)})
    grids = SampleGrids(tr, Run(tmp_path))
    for step in range(1, 8):
        tr.step, tr.images_seen = step, 16 * step
        grids.after_step(step, 16 * (step - 1))
    written = sorted(p.name for p in (tmp_path / "samples").iterdir())
    # 16, 32 | 48: step 3; 64, 80 | step 5; 96, 112: the last step
    assert written == ["step-00000003.png", "step-00000005.png", "step-00000007.png"]


def test_a_checkpoint_with_non_finite_weights_stops_the_run_and_writes_nothing(tmp_path):
    tr = stand_in(tmp_path, failures=SimpleNamespace(on_failure="off"))
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    tr.nets, tr.step = {"generator": net}, 3
    checkpoints = Checkpoints(tr, FailureWatch(tr, MetricsWriter(Run(tmp_path), enabled=True)))
    checkpoints.after_step(2, 0)  # not due: nothing is looked at
    with pytest.raises(TrainingStopped, match=r"generator has 1 non-finite weights at step 3; stopped.*\(none yet\)"):
        checkpoints.after_step(3, 32)
    assert not (tmp_path / "checkpoints").exists()


def test_metrics_are_cut_back_to_a_step_and_a_partial_last_line_is_dropped(tmp_path, capsys):
    run = Run(tmp_path)
    for step in (1, 2, 3):
        run.metrics.append({"step": step, "images_seen": 8 * step})
    with open(run.metrics.path, "a") as f:
        f.write('{"step": 4, "ima')  # a crash mid-append
    assert run.metrics.last() == {"step": 3, "images_seen": 24}
    run.metrics.keep_until(2)
    assert "dropping a partial last line" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in run.metrics.path.read_text().splitlines()] == [1, 2]


def test_a_run_directory_keeps_everything_where_its_layout_says(tmp_path):
    run = Run(tmp_path / "run")
    run.begin({"seed": 1}, step=0)
    assert run.resolved_spec.read_text() == "seed: 1\n"
    assert run.checkpoint(12) == tmp_path / "run" / "checkpoints" / "step-00000012"
    assert run.samples(3, "-d-pixels").name == "step-00000003-d-pixels.png"
    exported = run.write_export({"generator": torch.nn.Linear(2, 3)}, {"seed": 1})
    assert sorted(p.name for p in exported.iterdir()) == ["generator.safetensors", "spec.yaml"]
