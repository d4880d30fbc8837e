"""R3GAN's objectives in the gan method: the relativistic pairing loss and R1 + R2, on a hand-made D
(brownvc/R3GAN at 19a7ddf, R3GAN/Trainer.py, AdversarialTraining), and a short run of r3gan_demo."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.gan import GanMethod

REAL = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # two 1x1x2 images
REAL_LABELS = torch.tensor([3, 5])
DRAWN_LABELS = torch.tensor([0, 0])  # what the latent draw would give: a paired loss must not use them


class LabelledG(nn.Module):
    """G(z, y) = z + y / 10, reshaped to 1x1x2; records the labels it was given."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.labels = []

    def forward(self, z, y):
        self.labels.append(y.clone())
        return (self.scale * z + y[:, None] / 10).view(-1, 1, 1, 2)


class QuadraticD(nn.Module):
    """D(x, y) = c/2 ||x||² + <w, x> + y / 10: ∇ₓD = c x + w."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.5))
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))

    def d(self, x, y):
        x = x.flatten(1)
        return (self.c / 2 * x.square().sum(1) + x @ self.w + y / 10).unsqueeze(1)

    def forward(self, x, y):
        return self.d(x, y)


class Step:
    """The StepInputs the objectives read: one stream of REAL and fixed latents."""

    def __init__(self, G, D, z):
        self.nets = {"generator": G, "discriminator": D}
        self.micro, self.images_seen, self.step, self.counting_flops = 2, 0, 0, False
        self.z, self.reads = z, 0

    def next(self, stream):
        self.reads += 1
        return REAL.clone(), REAL_LABELS.clone()

    def latents(self, n):
        return self.z.clone(), DRAWN_LABELS.clone()

    def mixed(self):
        return contextlib.nullcontext()


def run_of(**options):
    method = GanMethod(kind="gan", loss="relativistic_pairing", **options)
    spec = SimpleNamespace(seed=0, latent=SimpleNamespace(distribution="normal"))
    return method.build(spec)


def test_the_g_step_judges_each_fake_against_a_real_image_of_its_class():
    G, D, z = LabelledG(), QuadraticD(), torch.tensor([[0.5, 0.0], [-1.0, 2.0]])
    step = Step(G, D, z)
    losses, logs = run_of().g_objective(step)
    assert step.reads == 1  # the G step reads its own real batch
    assert torch.equal(G.labels[-1], REAL_LABELS)  # fakes of the real rows' classes
    fake = (G.scale * z + REAL_LABELS[:, None] / 10).view(-1, 1, 1, 2)
    expected = F.softplus(D.d(REAL, REAL_LABELS) - D.d(fake, REAL_LABELS)).mean()  # Trainer.py's G loss
    assert torch.allclose(losses["G"], expected)
    # G's gradient comes through the fakes only (the real logits are constants)
    (grad,) = torch.autograd.grad(losses["G"], G.scale)
    (by_hand,) = torch.autograd.grad(expected, G.scale)
    assert torch.allclose(grad, by_hand) and grad != 0


def test_other_losses_read_no_real_batch_in_the_g_step():
    G, D = LabelledG(), QuadraticD()
    step = Step(G, D, torch.zeros(2, 2))
    spec = SimpleNamespace(seed=0, latent=SimpleNamespace(distribution="normal"))
    GanMethod(kind="gan", loss="hinge").build(spec).g_objective(step)
    assert step.reads == 0 and torch.equal(G.labels[-1], DRAWN_LABELS)


@pytest.mark.parametrize("gammas", [(0.4, 0.4), (0.4, 0.0), (0.0, 0.6)])
def test_the_d_loss_is_the_pairing_loss_plus_half_gamma_r1_and_r2(gammas):
    r1_gamma, r2_gamma = gammas
    G, D, z = LabelledG(), QuadraticD(), torch.tensor([[-2.0, 2.0], [0.0, 0.0]])
    step = Step(G, D, z)
    losses, logs = run_of(r1_gamma=r1_gamma, r2_gamma=r2_gamma).d_objective(step)
    assert torch.equal(G.labels[-1], REAL_LABELS)
    fake = (z + REAL_LABELS[:, None] / 10).view(-1, 1, 1, 2)
    pairing = F.softplus(D.d(fake, REAL_LABELS) - D.d(REAL, REAL_LABELS)).mean()
    # ∇ₓD = c x + w with c = 0.5, w = (1, -2), the batch mean of its squared norm
    c, w = 0.5, torch.tensor([1.0, -2.0])
    r1 = (c * REAL.flatten(1) + w).square().sum(1).mean()  # (1.5, -1)², (1, -2.5)²: (3.25 + 7.25) / 2
    r2 = (c * fake.flatten(1) + w).square().sum(1).mean()
    assert torch.isclose(r1, torch.tensor(5.25))
    expected = pairing + r1_gamma / 2 * r1 + r2_gamma / 2 * r2
    assert torch.allclose(losses["D"], expected)
    if r2_gamma:
        assert torch.allclose(logs["r2"], r2)
    # the penalties train D and never G: no graph from D's loss reaches G
    assert not any(p.grad is not None for p in G.parameters())
    losses["D"].backward()
    assert G.scale.grad is None and D.c.grad is not None


def test_a_paired_loss_is_refused_with_cutmix():
    with pytest.raises(ValueError, match="pairs"):
        GanMethod(kind="gan", loss="relativistic_pairing", cutmix={"warmup_images": 10})


def test_r3gan_demo_trains_two_steps(demo_shards, tmp_path):
    from pipeline.spec import load_spec
    from pipeline.train import loop

    run_dir = tmp_path / "run"
    overrides = [
        f"data.shards={demo_shards}",
        f"run.dir={run_dir}",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.log_every=1",
        "train.sample_every=100",
        "train.checkpoint_every=100",
        "eval.every=0",
    ]
    loop.train(load_spec("r3gan_demo", overrides))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss_d" in row]
    # each step reads 8 real images for D and 8 for G
    assert [row["images_seen"] for row in steps] == [16, 32]
    assert all(row["r1"] > 0 and row["r2"] > 0 and row["loss_g"] > 0 for row in steps)


@pytest.mark.parametrize("kind", ["d", "g"])
def test_an_identity_augmentation_leaves_the_paired_steps_and_penalties_as_they_are(kind):
    """ADA's first step, p still at its start of 0, is the identity: with it on, the paired loss, R1
    and R2 (taken at the images before augmentation) come out exactly as without it, in D's step and
    in G's."""
    z = torch.tensor([[-2.0, 2.0], [0.0, 0.0]])
    results = []
    for augment in (None, {"kind": "ada"}):
        G, D = LabelledG(), QuadraticD()
        step = Step(G, D, z)
        step.rank, step.world_size, step.all_sum = 0, 1, lambda t: t
        run = run_of(r1_gamma=0.4, r2_gamma=0.6, augment=augment)
        losses, _ = run.d_objective(step) if kind == "d" else run.g_objective(step)
        (loss,) = losses.values()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in (*G.parameters(), *D.parameters())]))
    (plain, plain_grads), (augmented, augmented_grads) = results
    assert torch.equal(plain, augmented)
    for a, b in zip(plain_grads, augmented_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
