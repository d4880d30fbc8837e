"""ProGAN's progressive growing: growing graphs (`grow:`), the `progressive` method's schedule,
training through every stage, resume in the middle of a fade-in, and compilation per stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import PATIENCE_S, wait_for_steps

from pipeline.errors import SpecError
from pipeline.graph import analyze_spec, build_network
from pipeline.graph.compile import RECOMPILES_PER_PHASE
from pipeline.spec import load_spec
from pipeline.train import loop

# progan_demo with 2 steps of 16 per phase: 4x4 steps 1-2, 8x8 fading 3-4 and stable 5-6,
# 16x16 fading 7-8 and stable 9-10, 32x32 fading 11-12, stable from 13
TINY = [
    "train.batch_size=16",
    "method.fade_images=32",
    "method.stable_images=32",
    "eval.every=0",
    "train.log_every=1",
    "train.sample_every=2",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=20",
]
EXPECTED = [  # (stage, phase, alpha, resolution) of steps 1..14
    (0, "stable", 1.0, 4),
    (0, "stable", 1.0, 4),
    (1, "fade", 0.0, 8),
    (1, "fade", 0.5, 8),
    (1, "stable", 1.0, 8),
    (1, "stable", 1.0, 8),
    (2, "fade", 0.0, 16),
    (2, "fade", 0.5, 16),
    (2, "stable", 1.0, 16),
    (2, "stable", 1.0, 16),
    (3, "fade", 0.0, 32),
    (3, "fade", 0.5, 32),
    (3, "stable", 1.0, 32),
    (3, "stable", 1.0, 32),
]


def tiny(demo_shards, run_dir, *extra):
    return [f"data.shards={demo_shards}", f"run.dir={run_dir}", *TINY, *extra]


# ----- growing graphs
def test_shipped_progan_specs_count_the_papers_parameters():
    plans = analyze_spec(load_spec("progan_1024"))
    for which in ("generator", "discriminator"):
        plan = plans[which]
        stages = plan.growth.stages
        assert [s.resolution for s in stages] == [4 << k for k in range(9)]
        assert round(plan.params / 1e6, 1) == 23.1  # Karras et al. 2018, Table 2: 23.1M each
        assert round(stages[-1].params / 1e6, 1) == 23.1  # without the smaller stages' converters
        assert all(a.params < b.params for a, b in zip(stages, stages[1:], strict=False))
        assert plan.flops_per_image == stages[-1].flops
    g = plans["generator"]
    assert g.params == 23_079_115 and g.growth.stages[-1].params == 23_071_507
    assert [s.resolution for s in analyze_spec(load_spec("progan_256"))["generator"].growth.stages][-1] == 256


@pytest.mark.parametrize("which", ["generator", "discriminator"])
def test_each_stage_trains_the_parameters_its_report_counts(which):
    loaded = load_spec("progan_demo")
    plan = analyze_spec(loaded)[which]
    net = build_network(loaded, which)
    for stage in plan.growth.stages:
        for fading in (False, True) if stage.index else (False,):
            net.zero_grad(set_to_none=True)
            net.set_stage(stage.index, fading, 0.5)
            side = stage.resolution
            y = torch.zeros(4, dtype=torch.long)
            out = net(torch.randn(4, 64), y) if which == "generator" else net(torch.randn(4, 3, side, side), y)
            assert out.shape == ((4, 3, side, side) if which == "generator" else (4, 1))
            out.square().mean().backward()
            reached = sum(p.numel() for p in net.parameters() if p.grad is not None)
            assert reached == (stage.fade_params if fading else stage.params), (stage.index, fading)


def test_a_fade_in_blends_the_previous_stage_into_the_new_one():
    loaded = load_spec("progan_demo")
    G, D = build_network(loaded, "generator"), build_network(loaded, "discriminator")
    z, y = torch.randn(4, 64), torch.zeros(4, dtype=torch.long)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        G.set_stage(1)
        previous = F.interpolate(G(z, y), scale_factor=2, mode="nearest")
        G.set_stage(2)
        new = G(z, y)
        D.set_stage(1)
        d_previous = D(F.avg_pool2d(x, 2), y)
        D.set_stage(2)
        d_new = D(x, y)
        for alpha in (0.0, 0.25, 1.0):
            G.set_stage(2, True, alpha)
            D.set_stage(2, True, alpha)
            if alpha in (0.0, 1.0):  # the ends are exactly the previous and the new stage
                assert torch.equal(G(z, y), previous if alpha == 0 else new)
                assert torch.equal(D(x, y), d_previous if alpha == 0 else d_new)
            else:  # G's image is the blend; D's blend is inside it, before its later stages
                torch.testing.assert_close(G(z, y), 0.75 * previous + 0.25 * new)
    with pytest.raises(ValueError, match="not a stage"):
        G.set_stage(0, fading=True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["generator.grow=upp"], "grow names 'upp', which is not a node"),
        (["discriminator.grow=null"], "method progressive grows its networks, and discriminator has no `grow:`"),
        (["method.start_resolution=64"], "start_resolution 64 is not a stage; the stages are [4, 8, 16, 32]"),
        (["method.resolutions={128: {batch_size: 8}}"], "resolutions.128: not a stage"),
        (  # a fourth D stage that does not halve: its stage 0 would read a 2x2 image
            [
                "discriminator.nodes.down.repeat=4",
                "discriminator.nodes.down.each.out_channels=[64, 128, 128, 128]",
                "discriminator.nodes.down.each.downsample=[true, true, true, false]",
            ],
            "stage 0: from_rgb outputs 128x2x2, but the stage enters the network where it holds 128x4x4",
        ),
    ],
)
def test_growth_errors_name_the_problem(extra, message):
    with pytest.raises(SpecError) as info:
        analyze_spec(load_spec("progan_demo", extra))
    assert message in str(info.value)


# ----- the schedule
def test_the_schedule_follows_the_real_images_seen():
    spec = load_spec("progan_1024").spec
    run = spec.method.build(spec)
    k = 1000

    def at(images):
        s = run.schedule(images)
        return s.stage, s.fading, round(s.alpha, 3), s.resolution, s.batch_size

    assert at(0) == (0, False, 1.0, 4, None)
    assert at(800 * k - 1) == (0, False, 1.0, 4, None)
    assert at(800 * k) == (1, True, 0.0, 8, None)  # the first stage has no fade-in
    assert at(1200 * k) == (1, True, 0.5, 8, None)
    assert at(1600 * k) == (1, False, 1.0, 8, None)
    assert at(800 * k + 5 * 1600 * k) == (6, True, 0.0, 256, 14)  # the paper's smaller batches
    assert at(800 * k + 7 * 1600 * k + 800 * k) == (8, False, 1.0, 1024, 3)
    assert at(10**9) == (8, False, 1.0, 1024, 3)  # the last stage trains on
    assert run.profiled_at() == 800 * k + 7 * 1600 * k + 800 * k
    lr = load_spec("progan_1024", ["method.resolutions.1024.g_lr=0.0015"]).spec
    assert lr.method.build(lr).schedule(10**9).lr == {"generator": 0.0015}
    started = load_spec("progan_1024", ["method.start_resolution=16"]).spec
    assert started.method.build(started).schedule(0).resolution == 16


# ----- training
def test_a_progressive_run_grows_through_every_stage(demo_shards, tmp_path, metrics):
    run_dir = tmp_path / "run"
    loop.train(load_spec("progan_demo", tiny(demo_shards, run_dir, "train.max_steps=14")))
    rows = metrics(run_dir)
    assert [(r["stage"], r["phase"], r["alpha"], r["resolution"]) for r in rows] == EXPECTED
    assert [r["images_seen"] for r in rows] == [16 * i for i in range(1, 15)]
    assert all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"]])).all() for r in rows)
    # every stage's grid is shown at 32x32: the same image size throughout
    from PIL import Image

    from pipeline.images import GAP

    sizes = {Image.open(p).size for p in sorted((run_dir / "samples").glob("step-*.png"))}
    assert sizes == {(8 * 32 + 7 * GAP, 10 * 32 + 9 * GAP)}  # 10 rows of 8, GAP pixels apart
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["schedule"] == {"stage": 1, "phase": "fade", "alpha": 0.5, "resolution": 8}


def test_profile_measures_the_last_stage(demo_shards, tmp_path, cli):
    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", "train.batch_size=16", "method.fade_images=32"]
    assert cli("profile", "progan_demo", *args, "--steps", "1", "--warmup", "1", "--trace-steps", "0").code == 0
    report = json.loads((tmp_path / "profile" / "report.json").read_text())
    assert report["schedule"] == {"stage": 3, "phase": "stable", "alpha": 1.0, "resolution": 32}
    assert report["batch_per_rank"] == 16 and report["recompiles"] == 0


@pytest.mark.slow
def test_sigkill_in_a_fade_in_resumes_bitwise(demo_shards, tmp_path, root, clean_env, metrics):
    # fade-ins of 4 steps: the checkpoint at step 4 is in the middle of 8x8's (alpha 0.5). One
    # intra-op thread: with two, two processes of the same run can differ in the 7th digit from the
    # first steps on, resumed or not (BENCHMARKS.md, repeatability); this test is about resuming.
    clean_env = clean_env | {"OMP_NUM_THREADS": "1"}
    args = ["method.fade_images=64", "train.max_steps=10"]
    killed, stderr_path = tmp_path / "killed", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "pipeline", "train", "spec=progan_demo", *tiny(demo_shards, killed, *args)]
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, cwd=root, env=clean_env, stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for_steps(proc, killed, 5, stderr_path)
    proc.kill()
    proc.wait()
    resumed = subprocess.run(command, cwd=root, env=clean_env, capture_output=True, text=True, timeout=PATIENCE_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the uninterrupted run is the same command, in a process of its own like the killed one
    straight = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "spec=progan_demo",
        *tiny(demo_shards, tmp_path / "straight", *args),
    ]
    done = subprocess.run(straight, cwd=root, env=clean_env, capture_output=True, text=True, timeout=PATIENCE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = metrics(tmp_path / "straight"), metrics(killed)
    assert [(r["step"], r["stage"], r["phase"]) for r in b] == [(r["step"], r["stage"], r["phase"]) for r in a]
    assert [(r["loss_d"], r["loss_g"], r["alpha"]) for r in a] == [(r["loss_d"], r["loss_g"], r["alpha"]) for r in b]


def test_compiled_growth_compiles_per_phase_and_never_inside_one(demo_shards, tmp_path, monkeypatch):
    """Dynamo's graphs (the eager backend: what is counted is tracing, not code generation) appear
    in the first step of each stage and phase only: alpha changes inside a fade-in without one."""
    from torch._dynamo.utils import counters

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, **(kw | {"backend": "eager"})))
    torch._dynamo.reset()
    counters.clear()
    graphs, run_step = [], loop.Trainer.run_step

    def counted(self):
        out = run_step(self)
        graphs.append(int(counters["stats"]["unique_graphs"]))
        return out

    monkeypatch.setattr(loop.Trainer, "run_step", counted)
    loop.train(load_spec("progan_demo", tiny(demo_shards, tmp_path / "run", "compile=true", "train.max_steps=14")))
    new = [b - a for a, b in zip([0, *graphs], graphs, strict=False)]
    firsts = {0, 2, 4, 6, 8, 10, 12}  # steps 1, 3, 5, ... start a phase
    assert all(new[i] > 0 for i in firsts)
    assert all(new[i] == 0 for i in range(14) if i not in firsts), new
    assert graphs[-1] <= RECOMPILES_PER_PHASE * len(firsts)
    torch._dynamo.reset()


def test_a_scheduled_batch_that_does_not_split_is_refused_before_training():
    from pipeline.train.preflight import preflight

    spec = load_spec("progan_demo", ["method.resolutions={16: {batch_size: 15}}"]).spec
    issues = [i for i in preflight(spec, world_size=2) if i.path.startswith("method.")]
    assert [(i.path, i.message) for i in issues] == [
        ("method.resolutions.16.batch_size", "the batch of 15 does not split into 1 accumulation step(s) x 2 rank(s)")
    ]
    (alone,) = [i for i in preflight(spec, world_size=1) if i.path.startswith("method.")]
    assert "the micro-batch of 15 per rank does not split into the groups of 4" in alone.message  # splits; D's groups


def test_every_micro_batch_must_fill_the_minibatch_stddev_groups(demo_shards, cli, tmp_path):
    # D's minibatch_stddev (group_size 4) raised a ValueError traceback in the first step of the stage
    run_dir = tmp_path / "run"
    args = [f"data.shards={demo_shards}", f"run.dir={run_dir}", "method.resolutions={8: {batch_size: 6}}"]
    result = cli("train", "progan_demo", *args, "train.batch_size=10")
    assert result.code == 2 and "Traceback" not in result.err and not run_dir.exists()
    for path, micro in (("train.batch_size", 10), ("method.resolutions.8.batch_size", 6)):
        assert f"{path}: the micro-batch of {micro} per rank does not split into the groups of 4 of " in result.err
    assert "discriminator.nodes.stddev (minibatch standard deviation)" in result.err
    from pipeline.train.preflight import preflight

    fits = load_spec("progan_demo", ["train.batch_size=16", "method.resolutions={8: {batch_size: 3}}"]).spec
    assert not [i for i in preflight(fits, world_size=1) if "groups" in i.message]  # 3 < 4: one group of 3
    assert [i.path for i in preflight(fits, world_size=2) if "groups" in i.message] == []  # 8 per rank, 3 not split
    halves = load_spec("progan_demo", ["train.batch_size=12"]).spec
    assert [i.path for i in preflight(halves, world_size=2) if "groups" in i.message] == ["train.batch_size"]  # 6


def test_a_scheduled_batch_larger_than_the_data_is_refused_before_anything_is_built(demo_shards, cli, tmp_path):
    # a 16x16 stage with a batch of a million grew to 12 GB until the kernel killed it, its lock left
    run_dir = tmp_path / "run"
    args = [f"data.shards={demo_shards}", f"run.dir={run_dir}", "method.resolutions={16: {batch_size: 1000000}}"]
    result = cli("train", "progan_demo", *args, "train.batch_size=8", "method.fade_images=16")
    assert result.code == 2 and "Traceback" not in result.err
    assert "method.resolutions.16.batch_size: the batch of 1,000,000 per rank is larger than" in result.err
    assert not run_dir.exists()


def adam_steps(trainer, engine: str) -> set[int]:
    optimizer = trainer.engines[engine]._engine.optimizer
    return {int(state["step"]) for state in getattr(optimizer, "optimizer", optimizer).state.values()}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_adam_starts_afresh_at_every_fade_in_and_stabilisation(demo_shards, tmp_path, zero_stage):
    # the authors' train.py: G_opt/D_opt.reset_optimizer_state() whenever floor(lod) or ceil(lod)
    # changes, i.e. at the start of each fade-in and each stabilisation (ZeRO 2: the partitions' Adam)
    loaded = load_spec("progan_demo", tiny(demo_shards, tmp_path, f"train.zero_stage={zero_stage}"))
    trainer = loop.Trainer(loaded, resume=False)
    seen = []
    for _ in range(5):  # 4x4 stable, stable, 8x8 fade, fade, 8x8 stable
        trainer.run_step()
        seen.append((adam_steps(trainer, "G"), adam_steps(trainer, "D")))
    assert seen == [({n}, {n}) for n in (1, 2, 1, 2, 1)]
    kept = loop.Trainer(load_spec("progan_demo", tiny(demo_shards, tmp_path / "kept", "method.reset_optimizer=false")))
    for _ in range(3):
        kept.run_step()
    assert adam_steps(kept, "G") == {3}


def test_a_resumed_run_resets_adam_at_the_phase_it_enters(demo_shards, tmp_path):
    loop.train(load_spec("progan_demo", tiny(demo_shards, tmp_path, "train.max_steps=6")), stop_after=4)
    resumed = loop.Trainer(load_spec("progan_demo", tiny(demo_shards, tmp_path, "train.max_steps=6")))
    assert resumed.step == 2  # the last checkpoint (every 2 steps) before the stop
    resumed.run_step()  # step 3: the 8x8 fade-in begins
    assert adam_steps(resumed, "G") == {1} and adam_steps(resumed, "D") == {1}
