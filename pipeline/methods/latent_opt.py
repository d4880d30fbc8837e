"""LOGAN's latent optimisation step (Wu et al. 2019, "LOGAN: Latent Optimisation for Generative
Adversarial Networks", arXiv:1912.00953) as pure functions: no module state, no optimizer step;
the loop computes its losses from the returned z' and owns backward().

With f(z) = D(G(z)) and g = ∂f/∂z, one step moves each latent *up* D's score of its fake:

    GD   Δz = α g                        (the latent step of CS-GAN, LOGAN's starting point)
    NGD  Δz = α g / (β + ||g||²)         (LOGAN's natural-gradient step; per sample)
    z'   = clip(z + Δz, -1, 1)           (Algorithm 1; p(z) = U(-1, 1) "to be consistent with
                                          the clipping operation")

NGD preconditions g with the damped empirical Fisher F' = g gᵀ + β I; by Sherman-Morrison
F'⁻¹ g = g / (β + ||g||²), a per-sample scalar, so the step costs no more than GD. The losses of
both players are then computed from G(z') and a regulariser w_R ||Δz||² is added to both.

The paper's BigGAN-deep LOGAN (NGD), quoted from the BigGAN-deep (ImageNet 128) experiments of the
later arXiv revision (abstract: "we improve CS-GAN with natural gradient-based latent
optimisation"), which follow its SN-GAN ones of sec. 5.1: "we use the same large step size of α = 0.9
as in SN-GAN (section 5.1). However, we found much heavier damping is essential for BigGAN, so we
use the damping factor β = 5.0, and only optimise 50% of z's elements. [...] a much larger weight
of 300.0 for the regulariser R_z (eq. 17) works best [...] All other hyper-parameters, including
learning rates and a large batch size of 2048, remain the same as in BigGAN-deep." The same
section enlarges z from 128 to 256, draws it from U(-1, 1) and uses leaky ReLU (slope 0.2) in both
networks "for smoother gradient flow for ∂f(z)/∂z". Those four numbers are `BIGGAN_DEEP_NGD`.

    z_opt, delta_z = latent_step(z, lambda z: D(G(z, y), y), **BIGGAN_DEEP_NGD.step_kwargs(), generator=rng)
    g_loss = loss.g(D(G(z_opt, y), y)) + latent_step_penalty(delta_z, weight=BIGGAN_DEEP_NGD.penalty_weight)

Other implementations differ from the paper here: PyTorch-StudioGAN's `src/utils/losses.py:
latent_optimise` moves whole samples rather than a share of each z's elements, and at commit
5c62666 (2021-07-28) returned its boolean flag `trans_cost` in place of the transport cost, so the
penalty it added was a constant (lo_lambda x 1) with no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class LatentStepSettings:
    """One published LOGAN configuration: the arguments of `latent_step` and the weight w_R of
    `latent_step_penalty`."""

    alpha: float
    beta: float
    natural: bool
    optimise_fraction: float
    penalty_weight: float

    def step_kwargs(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "natural": self.natural,
            "optimise_fraction": self.optimise_fraction,
        }


# LOGAN (NGD) on BigGAN-deep, ImageNet 128 (arXiv:1912.00953, later revision, the BigGAN-deep
# experiments; R_z is its eq. 17). The paper's BigGAN-deep LOGAN (GD) settings were not found in
# the sources consulted, so there is no GD counterpart here.
BIGGAN_DEEP_NGD = LatentStepSettings(alpha=0.9, beta=5.0, natural=True, optimise_fraction=0.5, penalty_weight=300.0)


def latent_step(
    z: Tensor,
    score: Callable[[Tensor], Tensor],
    *,
    alpha: float,
    beta: float = BIGGAN_DEEP_NGD.beta,
    natural: bool = True,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    optimise_fraction: float = 1.0,
    second_order: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One LOGAN latent step: returns (z', Δz) with z' = clip(z + Δz), gradient *ascent* on `score`.

    `score(z)` returns one number per sample, shape (B,) or (B, 1): D's logit of G(z), the paper's
    f(z) = D(G(z)) (for a U-Net discriminator, its global logit). To step on a loss instead, pass
    minus the per-sample generator loss; for the hinge and Wasserstein losses that is f itself.

    - `alpha`: the step size α. 0 turns LOGAN off exactly: z itself comes back (bitwise), Δz is
      zeros, and neither `score` nor any RNG is touched. Negative values are refused: they would
      descend D's score.
    - `beta`: NGD's Tikhonov damping β (5.0, the paper's BigGAN-deep value). Ignored by GD.
    - `natural`: NGD (default; LOGAN (NGD), the paper's best model) or plain GD (LOGAN (GD)).
    - `clip`: the box z' is clipped to; (-1, 1) as in Algorithm 1, for p(z) = U(-1, 1). None for
      none. The clip is part of the graph, so a clipped coordinate passes no gradient back.
    - `optimise_fraction`: the share of each sample's elements that move ("only optimise 50% of
      z's elements" on BigGAN-deep). The elements are drawn afresh per sample and per call from
      `generator` (else the global RNG on z's device); 1.0 moves all and draws nothing. Under
      NGD the norm is taken over the moved elements only, i.e. the natural step in their subspace
      (the paper does not say; this is the reading under which the mask and the Fisher agree).
    - `second_order`: keep the graph of the gradient (create_graph=True), so that losses computed
      from z' backpropagate through Δz into the parameters of G and D. That is the method the paper
      analyses (the second-order terms that relate LOGAN to SGA and unrolled GANs) and what the
      first author's CS-GAN code does (deepmind-research/cs_gan/utils.py differentiates through
      its latent loop). False detaches Δz: a first-order approximation, one double
      backward cheaper.

    The gradient is that of score(z).sum() with respect to z. It is the per-sample gradient for
    networks without batch statistics; with BatchNorm in train mode (BigGAN's G) samples are
    coupled and it is the gradient of the batch's summed score, which is what a batched
    implementation of Algorithm 1 computes. Its squared norm, the NGD denominator, is reduced in
    float32 or wider, so the step is the same under torch.autocast(bf16). Runs on the meta device.

    Δz is returned as computed (masked, before the clip): the Δz of the paper's regulariser; the
    realised move z' - z is smaller where the clip bites. Cost: one more forward of G and D and a
    backward through both, plus (second_order) a double backward in the loss's backward.
    """
    if alpha < 0:
        raise ValueError(f"latent_step: alpha must be >= 0 (LOGAN ascends D's score), got {alpha}")
    if natural and beta <= 0:
        raise ValueError(f"latent_step: the NGD damping beta must be > 0, got {beta}")
    if not 0.0 < optimise_fraction <= 1.0:
        raise ValueError(f"latent_step: optimise_fraction must be in (0, 1], got {optimise_fraction}")
    if clip is not None and not clip[0] < clip[1]:
        raise ValueError(f"latent_step: clip must be (low, high) with low < high, got {clip}")
    if alpha == 0:
        return z, torch.zeros_like(z)

    # Enabled even under no_grad (latent optimisation at sampling time needs the gradient too).
    with torch.enable_grad():
        z_in = z if z.requires_grad else z.detach().requires_grad_(True)
        gen_score = score(z_in)
        if gen_score.shape[:1] != z.shape[:1] or gen_score.numel() != z.shape[0]:
            raise ValueError(
                f"latent_step: score must return one value per sample, shape ({z.shape[0]},) or "
                f"({z.shape[0]}, 1); got {tuple(gen_score.shape)}"
            )
        (grad,) = torch.autograd.grad(gen_score.float().sum(), z_in, create_graph=second_order)

    if optimise_fraction < 1.0:
        grad = grad * _element_mask(z, optimise_fraction, generator).to(grad.dtype)
    if natural:
        wide = _promote(grad)
        sq_norm = wide.square().flatten(1).sum(dim=1).view(-1, *([1] * (z.dim() - 1)))
        delta_z = (alpha * wide / (beta + sq_norm)).to(z.dtype)
    else:
        delta_z = alpha * grad
    if not second_order:
        delta_z = delta_z.detach()

    z_opt = z + delta_z
    if clip is not None:
        z_opt = z_opt.clamp(clip[0], clip[1])
    return z_opt, delta_z


def latent_step_penalty(delta_z: Tensor, *, weight: float) -> Tensor:
    """LOGAN's regulariser R_z = w_R ||Δz||² (eq. 17 of the later arXiv revision), added to both
    the D and the G loss: `weight` times the batch mean of each sample's squared Euclidean norm,
    reduced in float32 or wider. The paper's BigGAN-deep weight is 300.0
    (`BIGGAN_DEEP_NGD.penalty_weight`). With a second-order Δz its gradient reaches G's and D's
    parameters."""
    return weight * _promote(delta_z).square().flatten(1).sum(dim=1).mean()


def _promote(x: Tensor) -> Tensor:
    """Squared norms of bf16 values lose digits; reduce them in float32 (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _element_mask(z: Tensor, fraction: float, generator: torch.Generator | None) -> Tensor:
    """A 0/1 mask of z's shape with round(fraction * n) ones per sample, n = elements per sample."""
    num_per_sample = z[0].numel()
    num_kept = max(1, round(fraction * num_per_sample))
    device = generator.device if generator is not None else z.device
    noise = torch.rand(z.shape[0], num_per_sample, generator=generator, device=device)
    kept = noise.topk(num_kept, dim=1).indices
    mask = torch.zeros(z.shape[0], num_per_sample, dtype=torch.bool, device=device).scatter_(1, kept, True)
    return mask.view(z.shape).to(z.device)
