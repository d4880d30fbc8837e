"""The "How to train a GAN" tips as spec switches (issue 15): each does what it says."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from pipeline.blocks.layers import batch_statistics
from pipeline.graph import build_network
from pipeline.spec import load_spec


class Step:
    """The StepInputs an objective sees, over fixed batches: real images from a list, fixed latents."""

    def __init__(self, nets, real, y, z):
        self.nets, self.micro = nets, real.shape[0]
        self.real, self.y, self.z = real, y, z
        self.images_seen, self.counting_flops = 0, False

    def next(self, stream):
        return self.real, self.y

    def latents(self, n):
        return self.z[:n], self.y[:n]

    def mixed(self):
        return contextlib.nullcontext()


def _gan(spec_name: str, *overrides: str):
    loaded = load_spec(spec_name, ["compile.enabled=false", *overrides])
    torch.manual_seed(0)
    nets = {which: build_network(loaded, which) for which in ("generator", "discriminator")}
    return loaded.spec, nets


def _d_real_logged(spec, nets, real, y, z) -> torch.Tensor:
    run = spec.method.build(spec)
    _, logs = run.phases[0].objective(Step(nets, real, y, z))
    return logs["d_real"]


@pytest.mark.parametrize("spec_name, layer", [("dcgan_32", "BatchNorm"), ("progan_demo_d", "minibatch_stddev")])
def test_d_sees_real_and_fake_apart_when_it_has_batch_statistics(spec_name, layer, write_spec):
    if spec_name == "progan_demo_d":  # a D with minibatch stddev and no BatchNorm
        spec_name = str(write_spec(PROGAN_STYLE_D))
    spec, nets = _gan(spec_name, "train.batch_size=8")
    D = nets["discriminator"]
    assert batch_statistics(D), layer
    torch.manual_seed(1)
    real, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.zeros(8, dtype=torch.long)
    z1, z2 = torch.randn(8, spec.latent.z_dim), 5 * torch.randn(8, spec.latent.z_dim)
    with torch.no_grad():
        alone = D(real, y).mean()
    # the step's D(real) is D on the real batch alone, whatever the fakes are
    assert torch.equal(_d_real_logged(spec, nets, real, y, z1), alone)
    assert torch.equal(_d_real_logged(spec, nets, real, y, z2), alone)
    # with joint batches (the old behaviour), the fakes move D(real): what tip 4 is about
    spec_joint, _ = _gan(spec_name, "train.batch_size=8", "method.d_batches=joint")
    joint_1 = _d_real_logged(spec_joint, nets, real, y, z1)
    joint_2 = _d_real_logged(spec_joint, nets, real, y, z2)
    assert not torch.allclose(joint_1, joint_2)


@pytest.mark.integration
def test_d_without_batch_statistics_keeps_one_joint_batch(monkeypatch):
    spec, nets = _gan("tiny_biggan")
    assert not batch_statistics(nets["discriminator"])
    run = spec.method.build(spec)
    calls = []
    D = nets["discriminator"]
    monkeypatch.setattr(D, "forward", lambda *a, f=D.forward: calls.append(a[0].shape[0]) or f(*a))
    real, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.zeros(4, dtype=torch.long)
    run.phases[0].objective(Step(nets, real, y, torch.randn(4, spec.latent.z_dim)))
    assert calls == [8]  # one forward of real and fake together


PROGAN_STYLE_D = """\
base: dcgan_32
discriminator:
  init: normal
  nodes:
    down_16: {kind: dcgan_down, in: image,   out_channels: 16, norm: false}
    down_8:  {kind: dcgan_down, in: down_16, out_channels: 32, norm: false}
    down_4:  {kind: dcgan_down, in: down_8,  out_channels: 32, norm: false}
    stddev:  {kind: minibatch_stddev, in: down_4}
    logit:   {kind: conv, in: stddev, out_channels: 1, kernel_size: 4, padding: 0}
    head:    {kind: reshape, in: logit, shape: [1]}
  output: head
"""


# ----- block kinds
def _block(kind: str, in_shape: tuple, **params):
    from pipeline.blocks.registry import REGISTRY
    from pipeline.graph.plan import context

    spec = load_spec("tiny_biggan").spec
    node = REGISTRY[kind].model_validate({"kind": kind, "in": "x", **params})
    return node.build({"in": in_shape}, context(spec, "generator", meta=False).for_node(node))


def test_layer_norm_normalises_each_sample_over_all_its_features():
    norm = _block("layer_norm", (4, 3, 3))
    x = torch.randn(2, 4, 3, 3) * 5 + 3
    y = norm(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(y.var(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-3)
    assert torch.equal(norm(x[:1]), y[:1])  # no batch statistics


def test_pixel_shuffle_upsamples_with_a_conv_per_output_pixel():
    up = _block("pixel_shuffle", (8, 4, 4), out_channels=3)
    assert up(torch.randn(2, 8, 4, 4)).shape == (2, 3, 8, 8)
    assert sum(p.numel() for p in up.parameters()) == 12 * 8 * 3 * 3 + 12  # one 3x3 conv to 3 x 2^2 channels


@pytest.mark.parametrize("kind, params", [("dropout", {"p": 0.5}), ("gaussian_noise", {"std": 0.5})])
def test_noise_in_g_is_on_in_training_and_off_in_eval_unless_always_on(kind, params):
    x = torch.ones(64, 16)
    for always_on in (False, True):
        layer = _block(kind, (16,), **params, always_on=always_on)
        assert not torch.equal(layer.train()(x), x)
        assert torch.equal(layer.eval()(x), x) is not always_on
    dropped = _block("dropout", (16,), p=0.5, always_on=True).eval()(torch.ones(20000))
    assert set(dropped.unique().tolist()) == {0.0, 2.0} and abs((dropped == 0).float().mean() - 0.5) < 0.02


def test_minibatch_discrimination_sees_how_alike_the_batch_is():
    mbd = _block("minibatch_discrimination", (6,), kernels=4, kernel_dim=3)
    assert batch_statistics(mbd)
    varied = torch.randn(8, 6) * 3
    collapsed = varied[:1].repeat(8, 1)
    out_varied, out_collapsed = mbd(varied), mbd(collapsed)
    assert out_varied.shape == (8, 10) and torch.equal(out_varied[:, :6], varied)
    # o(x_i)_b = sum_j exp(-L1): identical samples give the batch size, distinct ones less
    assert torch.allclose(out_collapsed[:, 6:], torch.full((8, 4), 8.0))
    assert (out_varied[:, 6:] < 8).all() and (out_varied[:, 6:] >= 1).all()


# ----- method switches
def test_soft_labels_draw_targets_in_their_ranges_and_flip():
    spec, nets = _gan("dcgan_32", "train.batch_size=8", "method.loss=least_squares", "method.soft_labels={}")
    run = spec.method.build(spec)
    real, fake = run._targets(10000, "cpu")
    assert real.min() >= 0.7 and real.max() <= 1.2 and fake.min() >= 0.0 and fake.max() <= 0.3
    assert abs(real.mean() - 0.95) < 0.01 and abs(fake.mean() - 0.15) < 0.01
    spec, _ = _gan("dcgan_32", "method.loss=least_squares", "method.soft_labels={flip: 0.25}")
    real, fake = spec.method.build(spec)._targets(10000, "cpu")
    assert abs((real <= 0.3).float().mean() - 0.25) < 0.02 and abs((fake >= 0.7).float().mean() - 0.25) < 0.02
    # the D loss is least squares toward those targets
    from pipeline.methods.losses import get_loss

    logits = torch.randn(4, 1)
    t_real, t_fake = torch.full((4,), 0.8), torch.full((4,), 0.1)
    expected = 0.5 * ((logits - 0.8) ** 2).mean() + 0.5 * ((logits - 0.1) ** 2).mean()
    assert torch.allclose(get_loss("least_squares").d_targets(logits, logits, t_real, t_fake), expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.soft_labels={}"], "unbounded below for targets above 1"),  # dcgan_32: non_saturating
        (["method.loss=hinge", "method.soft_labels={}"], "losses with targets"),
        (["method.loss=least_squares", "method.soft_labels={real: [1.0, 0.7]}"], "is empty"),
    ],
)
def test_soft_labels_are_refused_where_they_mean_nothing(overrides, message):
    from pipeline.errors import SpecError

    with pytest.raises(SpecError, match=message):
        load_spec("dcgan_32", overrides)
    with pytest.raises(SpecError, match="per-pixel logits"):  # a U-Net D's decoder loss takes no targets
        load_spec(
            "demo_unet", ["method.loss=least_squares", "method.soft_labels={real: [0.7, 1.0]}", "method.cutmix=null"]
        )


def test_replay_and_logans_second_order_step_exclude_each_other():
    from pipeline.errors import SpecError

    with pytest.raises(SpecError, match="set logan.second_order=false"):
        load_spec("demo_logan", ["method.replay={}"])
    load_spec("demo_logan", ["method.replay={}", "method.logan.second_order=false"])


def test_replay_shows_d_past_fakes_and_resumes_exactly():
    from pipeline.methods.replay import ImageHistory

    pool = ImageHistory(4, seed=0, probability=1.0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    shown, labels = pool(first, torch.arange(4))
    assert torch.equal(shown, first)  # filling up: shown as they are
    state = pool.state_dict()
    second = torch.arange(10.0, 14.0).view(4, 1, 1, 1)
    shown, labels = pool(second, torch.arange(10, 14))
    assert set(shown.flatten().tolist()) <= set(range(14)) and not torch.equal(shown, second)
    assert torch.equal(shown.flatten().long(), labels)  # each replayed image keeps its own label
    again = ImageHistory(4, seed=99, probability=1.0)
    again.load_state_dict(state)
    assert torch.equal(again(second, torch.arange(10, 14))[0], shown)


@pytest.mark.integration
def test_instance_noise_falls_to_zero_over_its_images():
    spec, nets = _gan("dcgan_32", "train.batch_size=8", "method.instance_noise={std: 0.2, anneal_images: 1000}")
    run = spec.method.build(spec)
    step = Step(nets, torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), torch.randn(8, 100))
    seen = []
    D = nets["discriminator"]
    original = D.forward
    D.forward = lambda x, y=None: seen.append(x.std().item()) or original(x, y)
    for images in (0, 500, 1000):
        step.images_seen = images
        seen.clear()
        run.phases[0].objective(step)
        assert seen[0] == pytest.approx(0.2 * (1 - images / 1000), abs=0.02)  # the real batch of zeros


@pytest.mark.parametrize("in_g_step", [True, False])
def test_instance_noise_reaches_d_in_the_g_step_too(in_g_step):
    # G's gradient is taken through D(G(z) + noise) (Arjovsky & Bottou 2017; ganhacks tip 13: noise
    # on D's inputs), unless in_g_step is false
    noise = f"method.instance_noise={{std: 0.2, anneal_images: 1000, in_g_step: {str(in_g_step).lower()}}}"
    spec, nets = _gan("dcgan_32", "train.batch_size=8", noise)
    run = spec.method.build(spec)
    z = torch.randn(8, 100)
    step = Step(nets, torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), z)
    G, D = nets["generator"], nets["discriminator"]
    seen, original = [], D.forward
    D.forward = lambda x, y=None: seen.append(x.detach()) or original(x, y)
    images = []
    G.register_forward_hook(lambda module, args, out: images.append(out.detach()))
    run.phases[1].objective(step)  # the G step
    difference = seen[0] - images[0]
    if in_g_step:
        assert difference.std().item() == pytest.approx(0.2, abs=0.02)
    else:
        assert torch.equal(difference, torch.zeros_like(difference))


def test_the_switches_train_together_and_resume_exactly(demo_shards, tmp_path, metrics):
    from pipeline.train import loop

    def run(run_dir, stop_after=None):
        loaded = load_spec(
            "demo",
            [
                f"data.shards={demo_shards}",
                f"run.dir={run_dir}",
                "train.batch_size=8",
                "train.max_steps=3",
                "train.log_every=1",
                "train.checkpoint_every=2",
                "eval.every=0",
                "method.loss=least_squares",
                "method.soft_labels={flip: 0.1}",
                "method.replay={size: 8}",  # full after the first D step: later steps replay
                "method.instance_noise={std: 0.1, anneal_images: 1000}",
            ],
        )
        loop.train(loaded, stop_after=stop_after)
        return [[r[k] for k in ("loss_d", "loss_g", "d_real", "d_fake")] for r in metrics(run_dir)]

    straight = run(tmp_path / "straight")
    run(tmp_path / "broken", stop_after=2)
    assert run(tmp_path / "broken") == straight


def test_validate_warns_when_a_generator_output_is_not_bounded(cli):
    import json

    linear = cli("validate", "progan_256", "--json")
    assert linear.code == 0 and "generator.nodes.rgb" in json.loads(linear.out)["warnings"][0]
    for name in ("demo", "dcgan_32", "csgan_demo"):  # tanh, BigGAN's g_output, reflect_conv with tanh
        assert json.loads(cli("validate", name, "--json").out)["warnings"] == [], name
    assert "warning: " in cli("validate", "progan_256").out


def test_sgd_for_d_is_used_with_its_momentum_and_resumes_exactly(demo_shards, tmp_path, metrics):
    from pipeline.train import loop

    sgd = ["train.d_opt.kind=sgd", "train.d_opt.momentum=0.9", "train.d_opt.lr=0.01"]
    base = [f"data.shards={demo_shards}", "train.batch_size=8", "train.max_steps=3", "train.log_every=1"]
    base += ["train.checkpoint_every=2", "eval.every=0", "train.zero_stage=1", *sgd]
    trainer = loop.Trainer(load_spec("demo", [*base, f"run.dir={tmp_path / 'look'}"]), resume=False)
    d_opt, g_opt = (trainer.engines[e]._engine.basic_optimizer for e in ("D", "G"))
    assert isinstance(d_opt, torch.optim.SGD) and d_opt.param_groups[0]["momentum"] == 0.9
    assert d_opt.param_groups[0]["lr"] == 0.01 and isinstance(g_opt, torch.optim.Adam)

    def run(run_dir, stop_after=None):
        loop.train(load_spec("demo", [*base, f"run.dir={run_dir}"]), stop_after=stop_after)
        return [[r[k] for k in ("loss_d", "loss_g")] for r in metrics(run_dir)]

    straight = run(tmp_path / "straight")
    run(tmp_path / "broken", stop_after=2)
    assert run(tmp_path / "broken") == straight


def test_momentum_belongs_to_sgd():
    from pipeline.errors import SpecError

    with pytest.raises(SpecError, match="momentum is an option of kind: sgd"):
        load_spec("demo", ["train.d_opt.momentum=0.9"])


ACGAN = """\
base: demo
method: {aux_classifier: {weight_d: 1.0, weight_g: 0.5}}
discriminator:
  nodes:
    pooled: {kind: sum_pool, in: final}
    classes: {kind: linear, in: pooled, out_features: 10}
  output: [head, classes]
"""


@pytest.mark.integration
def test_the_auxiliary_classifier_adds_class_cross_entropies_to_both_losses(write_spec):
    import torch.nn.functional as F

    spec, nets = _gan(str(write_spec(ACGAN)), "train.batch_size=4")
    G, D = nets["generator"], nets["discriminator"]
    torch.manual_seed(3)
    real, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([1, 2, 3, 4])
    z = torch.randn(4, spec.latent.z_dim)
    run = spec.method.build(spec)
    step = Step(nets, real, y, z)
    d_losses, d_logs = run.phases[0].objective(step)
    g_losses, g_logs = run.phases[1].objective(step)
    with torch.no_grad():
        fake = G(z, y)
        (r, r_cls), (f, f_cls) = D(real, y), D(fake, y)
        hinge_d = F.relu(1 - r).mean() + F.relu(1 + f).mean()
        classes_d = F.cross_entropy(r_cls, y) + F.cross_entropy(f_cls, y)
        g_logit, g_cls = D(G(z, y), y)
    assert torch.allclose(d_losses["D"].detach(), hinge_d + classes_d, atol=1e-5)
    assert torch.allclose(d_logs["aux_loss_d"], classes_d, atol=1e-5)
    assert torch.allclose(g_losses["G"].detach(), -g_logit.mean() + 0.5 * F.cross_entropy(g_cls, y), atol=1e-5)


def test_the_auxiliary_classifier_needs_class_logits_as_ds_second_output(write_spec):
    from pipeline.errors import SpecError

    wrong = ACGAN.replace("out_features: 10", "out_features: 7")
    with pytest.raises(SpecError, match="one logit per image and 10 class logits; got 1 \\+ 7"):
        load_spec(str(write_spec(wrong)))
    with pytest.raises(SpecError, match="one logit per image and 10 class logits; got 1"):
        load_spec(str(write_spec("base: demo\nmethod: {aux_classifier: {}}\n", "one.yaml")))


def test_an_acgan_trains_and_logs_its_classifier(write_spec, demo_shards, tmp_path, metrics):
    from pipeline.train import loop

    path = write_spec(ACGAN)
    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", "train.batch_size=8", "train.max_steps=2"]
    loop.train(load_spec(str(path), [*args, "train.log_every=1", "eval.every=0"]))
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(0 <= r["aux_accuracy_real"] <= 1 and r["aux_loss_g"] > 0 for r in rows)


# ----- failure tracking (tip 10)
def _tracker(**settings):
    from pipeline.spec.schema import FailureSpec
    from pipeline.train.failures import FailureTracker

    return FailureTracker(FailureSpec(**{"intervals": 3, **settings}), bounded_d_loss=True)


def _line(step, **values):
    return {"step": step, "loss_d": 1.0, "loss_g": 1.0, "d_real": 1.0, "d_fake": -1.0, "grad_norm_d": 5.0} | values


def test_d_loss_at_zero_fires_after_its_intervals_and_names_when_it_began():
    tracker = _tracker()
    fired = [tracker.check(_line(s, loss_d=1.0 if s < 30 else 1e-4)) for s in range(10, 70, 10)]
    assert [bool(f) for f in fired] == [False, False, False, False, True, True]  # 30, 40, 50: three lines
    (failure,) = fired[4]
    assert failure.detector == "d_loss_zero" and failure.since_step == 30 and "loss_d" in failure.message
    assert not _tracker(d_loss_below=1e-5).check(_line(10, loss_d=1e-4))
    wgan = _tracker()
    wgan.bounded_d_loss = False
    assert not any(wgan.check(_line(s, loss_d=-5.0)) for s in range(5))


def test_grad_norm_is_judged_against_the_runs_own_history():
    # the default: 10x above or below the median of the last 10 values, once 5 are known
    tracker = _tracker()
    healthy = [112.0, 60.0, 45.0, 30.0, 25.0, 20.0, 18.0, 17.0, 16.0]  # the demo's start at batch 8: no alarm
    assert not any(tracker.check(_line(10 * i, grad_norm_d=v)) for i, v in enumerate(healthy, 1))
    (up,) = tracker.check(_line(100, grad_norm_d=260.0))  # the median of the 9 values: 25
    assert up.detector == "grad_norm" and up.since_step == 100 and "10.4x above the median" in up.message
    tracker = _tracker()
    for i, v in enumerate([20.0, 22.0, 18.0, 21.0, 19.0], 1):
        assert not tracker.check(_line(i, grad_norm_d=v))
    assert not tracker.check(_line(6, grad_norm_d=2.01))  # 9.95x below: within the factor
    (down,) = tracker.check(_line(7, grad_norm_d=1.5))  # a dead D: its gradient vanishes
    assert "13x below the median of its last 6 logged values (19.5)" in down.message  # 2.01 joined them
    (again,) = tracker.check(_line(8, grad_norm_d=1.5))  # what fired did not join: a lasting symptom goes on firing
    assert "13x below the median of its last 6 logged values (19.5)" in again.message
    (nan,) = tracker.check(_line(9, grad_norm_d=float("nan")))
    assert "grad_norm_d is nan, against the median" in nan.message
    # not before the warm-up; the fixed threshold of the tip only when asked for
    early = _tracker()
    assert not any(early.check(_line(s, grad_norm_d=v)) for s, v in enumerate([1.0, 1.0, 1.0, 1.0, 1000.0]))
    fixed = _tracker(grad_norm_above=100, grad_norm_change=None)
    (norm,) = fixed.check(_line(10, grad_norm_d=150.0))
    assert norm.detector == "grad_norm" and "150" in norm.message and "above 100" in norm.message
    assert not any(fixed.check(_line(s, grad_norm_d=1e-3 if s > 5 else 50.0)) for s in range(10))


def test_the_grad_norm_history_survives_a_resume():
    tracker = _tracker()
    for i in range(5):
        tracker.check(_line(i, grad_norm_d=20.0))
    resumed = _tracker()
    resumed.reset(json.loads(json.dumps(tracker.state_dict())))  # as state.json keeps it
    (found,) = resumed.check(_line(6, grad_norm_d=1.0))  # judged at once: no second warm-up
    assert found.detector == "grad_norm"
    damaged = _tracker()
    damaged.reset({"norms": {"grad_norm_d": ["x", None], "grad_norm_g": [float("nan")], "loss": 3}})
    assert damaged.norms == {}
    damaged.reset({"norms": [1, 2]})
    assert damaged.norms == {}


def test_g_fooling_and_diversity_detectors():
    tracker = _tracker()
    lines = [_line(s, d_fake=2.0, d_real=0.5, loss_g=1.0 - s / 100) for s in (10, 20, 30)]
    found = [tracker.check(line) for line in lines]
    assert not found[0] and not found[1] and found[2][0].detector == "g_fooling" and found[2][0].since_step == 10
    healthy = _tracker()  # G's loss falling and D's fake logit rising is normal while fakes stay below reals
    assert not any(healthy.check(_line(s, d_fake=-2 + s / 100, loss_g=2 - s / 100)) for s in range(10, 100, 10))
    collapse = _tracker(diversity_below=0.25)
    assert not collapse.check(_line(10), diversity=8.0) and not collapse.check(_line(20), diversity=4.0)
    (gone,) = collapse.check(_line(30), diversity=1.0)
    assert gone.detector == "diversity" and "12%" in gone.message


def test_diversity_of_a_collapsed_batch_is_zero():
    from pipeline.train.failures import diversity

    varied = torch.rand(8, 3, 8, 8)
    assert diversity(varied[:1].repeat(8, 1, 1, 1)) == 0.0 and diversity(varied) > 0.5


# the settings the provocations below are calibrated for (the demo's until it was tuned for speed)
CALIBRATED = ["method.d_steps=2", "train.g_opt.lr=2e-4", "train.d_opt.lr=2e-4"]


def _provoke_d_once(monkeypatch, at_step: int, lr: float):
    """An absurd learning rate for D from `at_step` on, once (a rollback sets the rates anew)."""
    from pipeline.train import loop

    run_step, done = loop.Trainer.run_step, []

    def provoked(self):
        if self.step == at_step and not done:
            done.append(True)
            for group in self.engines["D"]._engine.optimizer.param_groups:
                group["lr"] = lr
        return run_step(self)

    monkeypatch.setattr(loop.Trainer, "run_step", provoked)


def test_a_provoked_collapse_is_rolled_back_to_the_checkpoint_before_it(demo_shards, tmp_path, monkeypatch, metrics):
    import json as json_module

    from pipeline.train import checkpoint, loop

    _provoke_d_once(monkeypatch, at_step=4, lr=0.05)  # 250x D's: its gradient norm explodes at step 5
    restored = {}
    restore = loop.Trainer.restore

    def watched(self, path):
        restore(self, path)
        if path is not None:
            restored[path.name] = {k: v.clone() for k, v in self.nets["discriminator"].state_dict().items()}

    monkeypatch.setattr(loop.Trainer, "restore", watched)
    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", "train.batch_size=8", "train.max_steps=8", *CALIBRATED]
    args += ["train.log_every=1", "train.checkpoint_every=2", "eval.every=0", "train.failures.on_failure=rollback"]
    args += ["train.failures.grad_norm_warmup=3"]  # judged from step 4 on (4 lines known at step 5)
    summary = loop.train(load_spec("demo", args))
    assert summary.step == 8
    rows = metrics(tmp_path)
    (rollback,) = [r for r in rows if "rollback" in r]
    assert rollback["step"] == 4 and rollback["at_step"] == 5 and "grad_norm_d" in rollback["reason"]
    # the weights D continued from are exactly those of the checkpoint of step 4
    saved = checkpoint.network_weights(tmp_path / "checkpoints" / "step-00000004", "discriminator")
    assert restored.keys() == {"step-00000004"}
    assert all(torch.equal(restored["step-00000004"][k], saved[k].to(torch.float32)) for k in saved)
    # and continued with the learning rates of the networks whose gradient norm fired halved (here both:
    # D's exploded, G's vanished behind it; the others' would stay), recorded in later checkpoints
    fired = [name for name in ("D", "G") if f"grad_norm_{name.lower()} is" in rollback["reason"]]
    assert "D" in fired
    after = [r for r in rows if r["step"] > 4 and "lr_d" in r]
    lrs = {name: (1e-4 if name in fired else 2e-4) for name in ("D", "G")}
    assert after and all(r["lr_d"] == pytest.approx(lrs["D"]) and r["lr_g"] == pytest.approx(lrs["G"]) for r in after)
    state = json_module.loads((tmp_path / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert [(r["at_step"], r["engines"]) for r in state["rollbacks"]] == [(5, fired)]


def test_a_resume_may_set_new_learning_rates_and_keeps_the_grad_norm_history(demo_shards, tmp_path, metrics):
    from pipeline.errors import SpecError
    from pipeline.train import loop

    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", "train.batch_size=8", "train.log_every=1"]
    args += ["train.checkpoint_every=2", "eval.every=0"]
    loop.train(load_spec("demo", [*args, "train.max_steps=4"]))
    state = json.loads((tmp_path / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert sorted(state["failures"]["norms"]) == ["grad_norm_d", "grad_norm_g"]
    assert [round(v, 4) for v in state["failures"]["norms"]["grad_norm_d"]] == [
        round(r["grad_norm_d"], 4) for r in metrics(tmp_path)
    ]
    # a resumed run takes the new rates (e.g. to calm a run grown unstable); other settings stay refused
    loop.train(load_spec("demo", [*args, "train.max_steps=6", "train.d_opt.lr=1e-3", "train.g_opt.lr=5e-5"]))
    after = [r for r in metrics(tmp_path) if r["step"] > 4]
    assert len(after) == 2 and all(r["lr_d"] == 1e-3 and r["lr_g"] == 5e-5 for r in after)
    with pytest.raises(SpecError, match="train.d_opt.betas"):
        loop.train(load_spec("demo", [*args, "train.max_steps=8", "train.d_opt.betas=[0.5, 0.999]"]))


def test_stop_on_failure_names_the_last_good_checkpoint(demo_shards, tmp_path, monkeypatch):
    from pipeline.errors import SpecError
    from pipeline.train import loop

    _provoke_d_once(monkeypatch, at_step=4, lr=0.05)
    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", "train.batch_size=8", "train.max_steps=8", *CALIBRATED]
    args += ["train.log_every=1", "train.checkpoint_every=2", "eval.every=0", "train.failures.on_failure=stop"]
    args += ["train.failures.grad_norm_warmup=3"]
    with pytest.raises(
        SpecError, match=r"grad_norm_d is .* at step 5; stopped. The last good checkpoint is .*step-00000004"
    ):
        loop.train(load_spec("demo", args))


def test_a_stop_names_the_checkpoint_from_before_the_symptom(demo_shards, tmp_path):
    # the rollback limit and on_failure: stop named the newest checkpoint, though one written after
    # the symptom began (step 6 for a symptom since step 5) already carries it
    from pipeline.train import loop
    from pipeline.train.stops import stopped as stop_message

    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", "train.batch_size=8", "train.max_steps=6"]
    loop.train(load_spec("demo", [*args, "train.checkpoint_every=2", "eval.every=0"]))
    stopped = stop_message(["d_real stuck"], 7, tmp_path, before=5)
    assert "The last good checkpoint is" in str(stopped) and "step-00000004, the newest from before step 5" in str(
        stopped
    )
    assert "step-00000006" in str(stop_message(["nan"], 7, tmp_path))
