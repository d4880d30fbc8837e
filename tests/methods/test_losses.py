"""Losses, regularizers and the EMA of G against their formulas, on hand-made tensors (CPU, fast)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.blocks.layers import BuildContext
from pipeline.methods.losses import LOSSES, GanLoss, get_loss
from pipeline.methods.regularizers import (
    gradient_penalty,
    ortho_penalty,
    ortho_weights,
    r1_penalty,
    r1_r2_penalties,
    r2_penalty,
)
from pipeline.train.ema import EMA

REAL = torch.tensor([2.0, 0.5])
FAKE = torch.tensor([-2.0, 0.5])


def close(a, b, tol=1e-6):
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)


# ----- losses -----
def test_table_matches_the_spec_literal():
    from typing import get_args

    from pipeline.methods.gan import GanMethod

    assert set(LOSSES) == set(get_args(GanMethod.model_fields["loss"].annotation))
    assert all(isinstance(loss, GanLoss) and loss.name == name for name, loss in LOSSES.items())


def test_hinge():
    loss = get_loss("hinge")
    assert close(loss.d(REAL, FAKE), (0 + 0.5) / 2 + (0 + 1.5) / 2)  # 1.0
    assert close(loss.g(FAKE), 0.75)


def test_non_saturating():
    def sp(x):
        return math.log1p(math.exp(x))

    loss = get_loss("non_saturating")
    assert close(loss.d(REAL, FAKE), (sp(-2) + sp(-0.5)) / 2 + (sp(-2) + sp(0.5)) / 2)
    assert close(loss.g(FAKE), (sp(2) + sp(-0.5)) / 2)
    bce = F.binary_cross_entropy_with_logits
    assert close(loss.d(REAL, FAKE), bce(REAL, torch.ones(2)) + bce(FAKE, torch.zeros(2)))


def test_label_smoothing_changes_only_the_real_term():
    plain, smooth = get_loss("non_saturating"), get_loss("non_saturating", label_smoothing=0.1)
    fake_term = F.softplus(FAKE).mean()
    real_term = F.binary_cross_entropy_with_logits(REAL, torch.full((2,), 0.9))
    assert close(smooth.d(REAL, FAKE), real_term + fake_term)
    assert not close(smooth.d(REAL, FAKE), plain.d(REAL, FAKE))
    # only the real term moves: with the same real logits the difference does not depend on the fakes
    other_fake = torch.tensor([3.0, -1.0])
    assert close(smooth.d(REAL, FAKE) - plain.d(REAL, FAKE), smooth.d(REAL, other_fake) - plain.d(REAL, other_fake))
    assert close(smooth.g(FAKE), plain.g(FAKE))  # G is untouched


def test_label_flipping():
    plain = get_loss("non_saturating", label_smoothing=0.1)
    always = get_loss("non_saturating", label_smoothing=0.1, flip_prob=1.0)
    assert close(always.d(REAL, FAKE), plain.d(FAKE, REAL))  # every target swapped
    assert close(get_loss("non_saturating", flip_prob=0.0).d(REAL, FAKE), get_loss("non_saturating").d(REAL, FAKE))

    real, fake = torch.randn(64, 1), torch.randn(64, 1)
    half = get_loss("non_saturating", flip_prob=0.5)
    torch.manual_seed(0)
    a = half.d(real, fake)
    torch.manual_seed(0)
    assert half.d(real, fake) == a  # reproducible under the global seed

    def seeded(s):
        return get_loss("non_saturating", flip_prob=0.5, generator=torch.Generator().manual_seed(s))

    assert seeded(1).d(real, fake) == seeded(1).d(real, fake)
    assert seeded(1).d(real, fake) != seeded(2).d(real, fake)


def test_wgan_gp_and_least_squares():
    wgan = get_loss("wgan_gp")
    assert close(wgan.d(REAL, FAKE), -0.75 - 1.25 + 1e-3 * (4 + 0.25) / 2)
    assert close(get_loss("wgan_gp", drift=0.0).d(REAL, FAKE), -2.0)
    assert close(wgan.g(FAKE), 0.75)
    ls = get_loss("least_squares")
    assert close(ls.d(REAL, FAKE), 0.5 * (1 + 0.25) / 2 + 0.5 * (4 + 0.25) / 2)
    assert close(ls.g(FAKE), 0.5 * (9 + 0.25) / 2)


def test_relativistic_pairing():
    # R3GAN's RpGAN: D softplus(fake_i - real_i), G softplus(real_i - fake_i), means over the pairs
    def sp(x):
        return math.log1p(math.exp(x))

    loss = get_loss("relativistic_pairing")
    assert loss.paired and not any(other.paired for other in LOSSES.values() if other is not loss)
    # pairs (2, -2) and (0.5, 0.5): differences fake - real of -4 and 0
    assert close(loss.d(REAL, FAKE), (sp(-4) + sp(0)) / 2)
    assert close(loss.g(FAKE, REAL), (sp(4) + sp(0)) / 2)
    # paired, not averaged: with the fakes' rows swapped the differences are -1.5 and -2.5
    assert close(loss.d(REAL, FAKE.flip(0)), (sp(-1.5) + sp(-2.5)) / 2)
    with pytest.raises(ValueError, match="real_logits"):
        loss.g(FAKE)
    with pytest.raises(ValueError, match="one shape"):
        loss.d(REAL, FAKE[:1])


def test_losses_are_float32_for_bf16_logits():
    for loss in LOSSES.values():
        assert loss.d(REAL.bfloat16(), FAKE.bfloat16()).dtype == torch.float32
        assert loss.g(FAKE.bfloat16(), REAL.bfloat16()).dtype == torch.float32


def test_get_loss_errors():
    with pytest.raises(KeyError) as err:
        get_loss("hinj")
    assert "hinge" in str(err.value) and "least_squares" in str(err.value) and "did you mean" in str(err.value)
    with pytest.raises(TypeError, match="label_smoothing"):
        get_loss("hinge", label_smoothing=0.1)
    with pytest.raises(ValueError):
        get_loss("non_saturating", label_smoothing=1.0)


# ----- orthogonal regularization -----
class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        ctx = BuildContext(num_classes=10, image_channels=3, meta=False, sn=True)
        self.conv = nn.Conv2d(3, 5, 3)  # out < in: the W Wᵀ route
        self.fc = nn.Linear(4, 12)  # out > in: the Wᵀ W route
        self.sn_fc = ctx.linear(8, 4)
        self.shared = nn.Embedding(10, 6)


def _naive(w):
    w = w.flatten(1)
    gram = w @ w.t()
    return (gram * (1 - torch.eye(w.shape[0], dtype=w.dtype))).square().sum()


def test_ortho_penalty_and_its_gradient():
    torch.manual_seed(0)
    model = _Small().double()
    names = [n for n, _ in ortho_weights(model)]
    assert names == ["conv.weight", "fc.weight", "sn_fc.parametrizations.weight.original"]
    beta = 0.3
    expected = beta * sum(_naive(p) for _, p in ortho_weights(model))
    penalty = ortho_penalty(model, beta)
    assert torch.allclose(penalty, expected, rtol=1e-12, atol=0)

    # autograd through the penalty (the Wᵀ W route included) is the paper's 4 beta (W Wᵀ ⊙ (1 - I)) W
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(penalty, list(params.values()), allow_unused=True)
    for (name, param), grad in zip(params.items(), grads, strict=True):
        if name in names:
            w = param.detach().flatten(1)
            off_diagonal = (w @ w.t()) * (1 - torch.eye(w.shape[0], dtype=w.dtype))
            assert torch.allclose(grad, (4 * beta * off_diagonal @ w).view_as(param), rtol=1e-10, atol=1e-12), name
        else:  # skipped (the shared embedding) or 1-d (biases)
            assert grad is None, name


def test_ortho_skip_sees_through_the_engine_prefix():
    class Engine(nn.Module):  # a DeepSpeed engine holds its network as `module`
        def __init__(self):
            super().__init__()
            self.module = _Small()

    assert all("shared" not in n for n, _ in ortho_weights(Engine()))
    assert any("shared" in n for n, _ in ortho_weights(_Small(), skip=()))


# ----- gradient penalties -----
def test_r1_of_a_linear_discriminator():
    w = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    real = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    d_out = (real * w).flatten(1).sum(1)
    penalty = r1_penalty(d_out, real)
    assert torch.allclose(penalty, w.square().sum(), rtol=1e-12)
    (grad_w,) = torch.autograd.grad(penalty, w)  # create_graph: it reaches D's parameters
    assert torch.allclose(grad_w, 2 * w)


def test_r1_and_r2_of_a_quadratic_discriminator():
    # D(x) = c/2 ||x||² + <w, x>: ∇ₓD = c x + w, so each penalty is the batch mean of ||c x + w||²
    c = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)  # one channel, 1x2 images
    real = torch.tensor([[[[2.0, 0.0]]], [[[0.0, 4.0]]]], dtype=torch.float64, requires_grad=True)
    fake = torch.tensor([[[[-2.0, 2.0]]], [[[0.0, 0.0]]]], dtype=torch.float64, requires_grad=True)

    def d(x):
        return (c / 2 * x.square() + w * x).flatten(1).sum(1)

    # reals: c x + w = (2, -2) and (1, 0): 8 and 1; fakes: (0, -1) and (1, -2): 1 and 5
    r1, r2 = r1_penalty(d(real), real), r2_penalty(d(fake), fake)
    assert close(r1, (8 + 1) / 2) and close(r2, (1 + 5) / 2)
    # both from one backward, through one forward on the joined batch, as the gan method runs D
    out = d(torch.cat([real, fake]))
    both = r1_r2_penalties(out[:2], real, out[2:], fake)
    assert close(both[0], r1) and close(both[1], r2)
    # the penalties reach D's parameters: d/dc of ||c x + w||² = 2 <c x + w, x>, batch-meaned
    # reals: 2 (4 + 0) and 2 (0 + 0); fakes: 2 (0 - 2) and 0
    (grad_c,) = torch.autograd.grad(both[0] + both[1], c)
    assert close(grad_c, (8 + 0) / 2 + (-4 + 0) / 2)


@pytest.mark.parametrize("norm", [1.0, 3.0])
def test_gradient_penalty_of_a_linear_discriminator(norm):
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, dtype=torch.float64)
    w = (w * norm / w.norm()).requires_grad_(True)

    def disc(images, labels):
        return (images * w).flatten(1).sum(1) + labels

    real = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    fake = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    penalty = gradient_penalty(disc, real, fake, torch.zeros(6, dtype=torch.float64))
    assert torch.allclose(penalty, torch.tensor((norm - 1) ** 2, dtype=torch.float64), atol=1e-10)
    grad_w, grad_fake = torch.autograd.grad(penalty, [w, fake], allow_unused=True)
    assert torch.allclose(grad_w, 2 * (norm - 1) * w / norm, atol=1e-10)  # d/dw (||w|| - 1)²
    assert grad_fake is None  # never reaches G


# ----- EMA -----
class _WithBN(nn.Module):
    def __init__(self):
        super().__init__()
        ctx = BuildContext(num_classes=10, image_channels=3, meta=False, sn=True)
        self.fc = ctx.linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_ema():
    torch.manual_seed(0)
    model = _WithBN().double()
    ema = EMA(model, decay=0.9, start_images=100)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    ema_ptrs = {t.data_ptr() for t in ema.state_dict().values()}
    assert not ema_ptrs & {t.data_ptr() for t in model.state_dict().values()}

    # before the start: a copy, buffers included
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 4, dtype=torch.float64))  # moves BN statistics and SN's u, v
    ema.update(model, images_seen=50)
    for key, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value), key

    # after: e_N = p + (e_0 - p) decay^N for constant p; buffers still copied
    e0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0).add_(0.5)
    model(torch.randn(8, 4, dtype=torch.float64))
    n = 7
    for step in range(n):
        ema.update(model, images_seen=100 + step)
    ema_params = dict(ema.module.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(ema_params[name], p + (e0[name] - p) * 0.9**n, rtol=1e-12, atol=1e-12), name
    for name, b in model.named_buffers():
        assert torch.equal(dict(ema.module.named_buffers())[name], b), name

    # state dict round trip, and a float32 average of a lower-precision model
    other = EMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ema.state_dict().values(), strict=True))
    half = EMA(model.bfloat16(), decay=0.9999, dtype=torch.float32)
    before = half.module.fc.parametrizations.weight.original.clone()
    with torch.no_grad():
        model.fc.parametrizations.weight.original.add_(1.0)
    half.update(model, images_seen=1)
    after = half.module.fc.parametrizations.weight.original
    target = model.fc.parametrizations.weight.original.float()
    assert after.dtype == torch.float32
    assert torch.allclose(after, before + 1e-4 * (target - before), rtol=1e-6, atol=1e-7)  # a bf16 copy would not move
