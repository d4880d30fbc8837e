"""LOGAN's latent step (pipeline/methods/latent_opt.py): exact no-op at alpha 0, the GD and NGD steps
against hand computation, ascent on a real G and D, the clip, the second-order term, the
regulariser, the optimised fraction, bf16 autocast and the meta device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.methods.latent_opt import BIGGAN_DEEP_NGD, latent_step, latent_step_penalty

Z_DIM = 4


def _linear_quadratic_score(weight: torch.Tensor, curvature: torch.Tensor):
    """f(z) = w·z + ½ Σ c z², whose gradient is w + c ⊙ z for each sample, independently."""

    def score(z: torch.Tensor) -> torch.Tensor:
        return (z * weight).sum(dim=1) + 0.5 * (curvature * z.square()).sum(dim=1)

    return score


def _tiny_gan(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(Z_DIM, 16), nn.LeakyReLU(0.2), nn.Linear(16, 6)).to(dtype)
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)).to(dtype)
    return gen, disc


def _small_case():
    z = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.5, 0.5, -0.5, -0.5], [-0.9, 0.8, 0.05, 0.2]], dtype=torch.float64)
    weight = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    curvature = torch.tensor([1.0, 4.0, -2.0, 0.5], dtype=torch.float64)
    return z, weight, curvature, _linear_quadratic_score(weight, curvature)


# ----- alpha = 0 -----
def test_alpha_zero_returns_z_bitwise_and_touches_neither_score_nor_rng():
    z = torch.rand(5, Z_DIM) * 2 - 1

    def score(_):
        raise AssertionError("score must not run at alpha 0")

    rng_state = torch.get_rng_state()
    z_opt, delta_z = latent_step(z, score, alpha=0.0, optimise_fraction=0.5)
    assert z_opt is z
    assert torch.equal(delta_z, torch.zeros_like(z)) and delta_z.shape == z.shape
    assert torch.equal(torch.get_rng_state(), rng_state)


# ----- the steps, by hand -----
def test_ngd_step_is_per_sample_damped_gradient():
    z, weight, curvature, score = _small_case()
    alpha, beta = 0.9, 5.0
    z_opt, delta_z = latent_step(z, score, alpha=alpha, beta=beta, natural=True, clip=None)
    for i in range(3):
        grad = weight + curvature * z[i]
        expected = alpha * grad / (beta + float(grad @ grad))
        torch.testing.assert_close(delta_z[i], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_opt, z + delta_z, rtol=0, atol=0)
    # a damping by the whole batch's norm (one scalar) would be a different step
    grads = weight + curvature * z
    batch_damped = alpha * grads / (beta + grads.square().sum())
    assert not torch.allclose(delta_z, batch_damped)


def test_gd_step_is_alpha_times_gradient():
    z, weight, curvature, score = _small_case()
    z_opt, delta_z = latent_step(z, score, alpha=0.05, natural=False, clip=None)
    torch.testing.assert_close(delta_z, 0.05 * (weight + curvature * z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_opt, z + delta_z, rtol=0, atol=0)


@pytest.mark.parametrize("natural", [True, False], ids=["ngd", "gd"])
def test_step_raises_discriminator_score_of_a_real_gan(natural):
    gen, disc = _tiny_gan(torch.float64)
    z = torch.rand(64, Z_DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1

    def score(latent):
        return disc(gen(latent)).squeeze(1)

    z_opt, _ = latent_step(z, score, alpha=0.05, beta=0.1, natural=natural)
    with torch.no_grad():
        assert score(z_opt).mean() > score(z).mean()


def test_score_of_shape_b_by_1_is_accepted_and_other_shapes_are_not():
    gen, disc = _tiny_gan()
    z = torch.rand(8, Z_DIM) * 2 - 1
    z_opt, _ = latent_step(z, lambda latent: disc(gen(latent)), alpha=0.9)  # (B, 1)
    assert z_opt.shape == z.shape
    with pytest.raises(ValueError, match=r"one value per sample.*got \(8, 2\)"):
        latent_step(z, lambda latent: gen(latent)[:, :2], alpha=0.9)


def test_negative_alpha_is_refused():
    z = torch.zeros(2, Z_DIM)
    with pytest.raises(ValueError, match="ascends"):
        latent_step(z, lambda latent: latent.sum(dim=1), alpha=-0.1)


# ----- clip -----
def test_clip_keeps_z_in_the_box():
    z = torch.tensor([[0.99, -0.99, 0.5, -0.5], [0.9, 0.0, -0.95, 0.2]])
    push_out = torch.tensor([1.0, -1.0, 1.0, -1.0])  # gradient of z·push_out: towards the walls

    def score(latent):
        return latent @ push_out

    z_opt, delta_z = latent_step(z, score, alpha=10.0, natural=False)
    assert z_opt.min() >= -1.0 and z_opt.max() <= 1.0
    assert (z_opt.abs() == 1.0).any()
    assert (z + delta_z).abs().max() > 1.0  # Δz itself is the unclipped step
    z_box, _ = latent_step(z, score, alpha=10.0, natural=False, clip=(-0.5, 0.5))
    assert z_box.min() >= -0.5 and z_box.max() <= 0.5


# ----- second-order term -----
def test_second_order_term_matches_closed_form():
    # f(z; θ) = θ·z, so g = θ, z' = z + αθ (GD) and L = Σ_i f(z'_i) = Σ_i θ·z_i + B α ||θ||².
    # dL/dθ = Σ z_i + 2 B α θ through Δz; Σ z_i + B α θ with Δz held constant.
    theta = torch.tensor([0.3, -0.7, 1.1, 0.2], dtype=torch.float64, requires_grad=True)
    z = torch.rand(3, Z_DIM, dtype=torch.float64) * 2 - 1
    alpha, batch = 0.1, z.shape[0]

    def score(latent):
        return latent @ theta

    for second_order, factor in ((True, 2.0), (False, 1.0)):
        z_opt, _ = latent_step(z, score, alpha=alpha, natural=False, clip=None, second_order=second_order)
        (grad,) = torch.autograd.grad(score(z_opt).sum(), theta)
        expected = z.sum(dim=0) + factor * batch * alpha * theta.detach()
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_first_order_gradient_equals_the_one_with_delta_z_detached():
    gen, disc = _tiny_gan(torch.float64)
    z = torch.rand(16, Z_DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    param = disc[0].weight

    def score(latent):
        return disc(gen(latent)).squeeze(1)

    def grad_of_g_loss(z_opt):
        (grad,) = torch.autograd.grad(-score(z_opt).mean(), param)
        return grad

    z_second, delta_z = latent_step(z, score, alpha=0.9, beta=0.1, second_order=True)
    z_first, _ = latent_step(z, score, alpha=0.9, beta=0.1, second_order=False)
    grad_second, grad_first = grad_of_g_loss(z_second), grad_of_g_loss(z_first)
    grad_detached = grad_of_g_loss((z + delta_z.detach()).clamp(-1.0, 1.0))
    torch.testing.assert_close(grad_first, grad_detached, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad_second, grad_first, rtol=1e-6, atol=1e-9)
    assert z_first.grad_fn is None  # nothing of G or D behind a first-order z'


# ----- the regulariser -----
def test_penalty_is_weighted_batch_mean_of_squared_norms_and_reaches_the_networks():
    delta_z = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    penalty = latent_step_penalty(delta_z, weight=300.0)
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, torch.tensor(300.0 * (25.0 + 1.0 + 0.0) / 3))

    gen, disc = _tiny_gan()
    z = torch.rand(8, Z_DIM) * 2 - 1
    _, delta_z = latent_step(z, lambda latent: disc(gen(latent)), alpha=0.9)
    latent_step_penalty(delta_z, weight=BIGGAN_DEEP_NGD.penalty_weight).backward()
    assert gen[0].weight.grad is not None and gen[0].weight.grad.abs().sum() > 0
    assert disc[0].weight.grad is not None and disc[0].weight.grad.abs().sum() > 0


# ----- the optimised fraction -----
def test_optimise_fraction_moves_that_share_of_each_sample_reproducibly():
    z = torch.zeros(6, 8)

    def score(latent):  # gradient 1 everywhere
        return latent.sum(dim=1)

    _, delta_a = latent_step(z, score, alpha=0.9, optimise_fraction=0.5, generator=torch.Generator().manual_seed(3))
    _, delta_b = latent_step(z, score, alpha=0.9, optimise_fraction=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(delta_a, delta_b)
    assert ((delta_a != 0).sum(dim=1) == 4).all()
    # NGD in the moved subspace: g has 4 ones there, so each moved element is α / (β + 4)
    torch.testing.assert_close(delta_a[delta_a != 0], torch.full((24,), 0.9 / (5.0 + 4.0)))

    rng_state = torch.get_rng_state()
    latent_step(z, score, alpha=0.9, optimise_fraction=1.0)
    assert torch.equal(torch.get_rng_state(), rng_state)


# ----- precision and devices -----
def test_bf16_autocast_step_stays_float32_and_close_to_fp32():
    gen, disc = _tiny_gan()
    z = torch.rand(16, Z_DIM, generator=torch.Generator().manual_seed(4)) * 2 - 1

    def score(latent):
        return disc(gen(latent))

    ref_z, ref_delta = latent_step(z, score, alpha=0.9, beta=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_opt, delta_z = latent_step(z, score, alpha=0.9, beta=0.1)
        loss = -score(z_opt).float().mean() + latent_step_penalty(delta_z, weight=1.0)
    loss.backward()
    assert z_opt.dtype == delta_z.dtype == torch.float32
    assert torch.isfinite(z_opt).all() and torch.isfinite(gen[0].weight.grad).all()
    torch.testing.assert_close(delta_z, ref_delta, rtol=0.1, atol=0.02)
    torch.testing.assert_close(z_opt, ref_z, rtol=0.05, atol=0.02)


def test_runs_on_the_meta_device():
    with torch.device("meta"):
        gen, disc = (
            nn.Sequential(nn.Linear(Z_DIM, 16), nn.LeakyReLU(0.2), nn.Linear(16, 6)),
            nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)),
        )
        z = torch.empty(8, Z_DIM)

    def score(latent):
        return disc(gen(latent)).squeeze(1)

    z_opt, delta_z = latent_step(z, score, alpha=0.9, optimise_fraction=0.5, generator=torch.Generator())
    assert z_opt.device.type == delta_z.device.type == "meta" and z_opt.shape == z.shape
    (-score(z_opt).mean() + latent_step_penalty(delta_z, weight=300.0)).backward()
    assert disc[0].weight.grad is not None and disc[0].weight.grad.device.type == "meta"
