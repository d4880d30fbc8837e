"""Regularizers as pure functions returning a scalar tensor; the loop scales them, adds them to
a loss and calls backward() once.

- `ortho_penalty`: BigGAN's modified orthogonal regularization, on G.
- `r1_penalty`: R1 on real images (Mescheder et al. 2018), on D.
- `r2_penalty`: R2, the same zero-centred penalty on fake images; `r1_r2_penalties`: both from one
  backward (R3GAN's D loss).
- `gradient_penalty`: WGAN-GP's penalty on interpolates (Gulrajani et al. 2017), on D.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

# The prefix a DeepSpeed engine adds to its module's parameter names; stripped before matching
# `skip`, so either the engine or its module works. (nn.Module.compile, which this project uses,
# adds none.)
_ENGINE_PREFIX = "module"


# ----- BigGAN's modified orthogonal regularization -----
def ortho_weights(model: nn.Module, skip: Sequence[str] = ("shared",)) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters the orthogonal penalty covers: every parameter with ndim >= 2 (conv, linear
    and embedding weights), except those of the nodes named in `skip`.

    A spectral-norm (or equalized-LR) parametrized weight is covered through its raw parameter,
    `<node>.parametrizations.weight.original`: the penalty is on the stored weight, as in
    BigGAN-PyTorch, whose SN layers keep the raw weight as the parameter."""
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        parts = name.split(".")
        while len(parts) > 1 and parts[0] == _ENGINE_PREFIX:
            parts = parts[1:]
        if parts[0] in skip:
            continue
        yield name, param


def _offdiag_gram_sq(w: Tensor) -> Tensor:
    """||W Wᵀ ⊙ (1 - I)||²_F for W of shape (out, in).

    When out > in, W Wᵀ is out x out (BigGAN's first linear: 24576², 2.4 GB in float32), so this
    uses ||W Wᵀ||²_F = ||Wᵀ W||²_F, an in x in product, and subtracts the diagonal terms
    Σᵢ ||wᵢ||⁴. Rows cannot be orthogonal when out > in, so the subtraction loses little."""
    if w.shape[0] <= w.shape[1]:
        gram = w @ w.t()
        return gram.square().sum() - torch.diagonal(gram).square().sum()
    return (w.t() @ w).square().sum() - w.square().sum(dim=1).square().sum()


def ortho_penalty(model: nn.Module, beta: float, *, skip: Sequence[str] = ("shared",)) -> Tensor:
    """BigGAN's modified orthogonal regularization (Brock et al. 2019, sec. 3.1):

        R(W) = beta * || W Wᵀ ⊙ (1 - I) ||²_F,   W reshaped to (out, -1),

    summed over `ortho_weights(model, skip)` (BigGAN skips the shared class embedding). It only
    pushes filters towards mutual orthogonality, leaving their norms free.

    Convention: this is the paper's formula, whose gradient is 4 beta (W Wᵀ ⊙ (1 - I)) W.
    BigGAN-PyTorch's `utils.ortho(model, strength)` adds 2 strength (W Wᵀ ⊙ (1 - I)) W to the
    gradients, i.e. the gradient of (strength / 2) ||...||²_F: its strength s equals our
    beta = s / 2 (its `--G_ortho 1e-4` is beta 5e-5 here).

    Returns a scalar tensor (zero when nothing is covered) that the loop adds to the G loss."""
    total = None
    for _, weight in ortho_weights(model, skip):
        term = _offdiag_gram_sq(weight.flatten(1))
        total = term if total is None else total + term
    if total is None:
        param = next(iter(model.parameters()), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return beta * total


# ----- gradient penalties on D -----
def _batch_mean_sq(grad: Tensor) -> Tensor:
    if grad.dtype in (torch.float16, torch.bfloat16):
        grad = grad.float()
    return grad.square().flatten(1).sum(dim=1).mean()


def r1_penalty(d_out: Tensor, real_images: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?"): the
    batch mean of ||∇ₓ D(x)||² over real images, summed over pixels.

    `real_images` must have requires_grad=True before D ran on them and `d_out` be D's output on
    them. The graph is kept (create_graph=True) so the penalty's backward reaches D's parameters.
    The caller multiplies by gamma / 2 (and by the lazy interval when applied lazily)."""
    (grad,) = torch.autograd.grad(d_out.sum(), real_images, create_graph=True)
    return _batch_mean_sq(grad)


def r2_penalty(d_out: Tensor, fake_images: Tensor) -> Tensor:
    """R2 (Mescheder et al. 2018; R3GAN, Huang et al. 2024): R1's penalty on generated images, the
    batch mean of ||∇ₓ D(x)||² at the fakes. `fake_images` must be detached from G (the penalty
    trains D only) with requires_grad=True before D ran on them, as in brownvc/R3GAN at 19a7ddf,
    R3GAN/Trainer.py, AccumulateDiscriminatorGradients. The caller multiplies by gamma / 2."""
    (grad,) = torch.autograd.grad(d_out.sum(), fake_images, create_graph=True)
    return _batch_mean_sq(grad)


def r1_r2_penalties(
    real_out: Tensor, real_images: Tensor, fake_out: Tensor, fake_images: Tensor
) -> tuple[Tensor, Tensor]:
    """R1 and R2 from one backward through D: the gradients of D's summed outputs on the real and
    the fake batch, taken together. Equal to `r1_penalty` and `r2_penalty` when no real sample's
    output depends on a fake one or back (a D without batch statistics, or one run on each batch
    apart), which is what both penalties assume."""
    real_grad, fake_grad = torch.autograd.grad(
        real_out.sum() + fake_out.sum(), (real_images, fake_images), create_graph=True
    )
    return _batch_mean_sq(real_grad), _batch_mean_sq(fake_grad)


def gradient_penalty(
    discriminator: Callable[[Tensor, Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    y: Tensor,
    *,
    target: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP's gradient penalty (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs"):
    mean over the batch of (||∇ D(x̂, y)||₂ - target)², at x̂ = ε real + (1 - ε) fake with
    ε ~ U(0, 1) per sample (from `generator`, else the global RNG on real's device).

    `discriminator` is any callable (images, labels) -> logits. x̂ is built from detached inputs,
    so the penalty's gradient reaches D's parameters only, never G's. The caller multiplies by
    lambda (10 in the paper)."""
    device = generator.device if generator is not None else real.device
    eps = torch.rand(real.shape[0], generator=generator, device=device, dtype=real.dtype)
    eps = eps.to(real.device).view(-1, *([1] * (real.dim() - 1)))
    x_hat = torch.lerp(fake.detach(), real.detach(), eps).requires_grad_(True)
    # D gets a view, not the leaf itself: flop_counter's module hooks (profile's FLOP count)
    # cannot follow autograd.grad to a leaf that is a module's input
    logits = discriminator(x_hat.view_as(x_hat), y)
    (grad,) = torch.autograd.grad(logits.sum(), x_hat, create_graph=True)
    if grad.dtype in (torch.float16, torch.bfloat16):
        grad = grad.float()
    norms = grad.flatten(1).norm(dim=1)
    return (norms - target).square().mean()
