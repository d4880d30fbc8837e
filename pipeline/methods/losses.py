"""GAN losses as pure functions of logits, chosen by the spec's `train.loss` name.

A `GanLoss` has `d(real_logits, fake_logits)` and `g(fake_logits, real_logits=None)`, each returning
a scalar: the mean over the batch (and over any spatial logits, e.g. a U-Net discriminator's per-pixel
ones). A `paired` loss compares fake row i with real row i, so its `g` needs D's logits on a real batch
too; the method then runs D on one in the G step (and makes fakes with the real rows' labels).
Nothing here calls backward() or holds module state; the loop owns both. Half-precision logits
(bf16/fp16 under autocast) are promoted to float32 before any reduction.

    loss = get_loss("non_saturating", label_smoothing=0.1)
    d_loss = loss.d(real_logits, fake_logits)  # the loop calls d_loss.backward()
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import did_you_mean
from pipeline.precision import full_precision as _promote


@dataclass(frozen=True)
class GanLoss(abc.ABC):
    """A GAN loss: the discriminator's and the generator's objective, both to be minimised."""

    name: ClassVar[str] = "base"  # the spec's train.loss value
    # True: d and g compare each fake logit with the real one in the same row; g needs real_logits
    paired: ClassVar[bool] = False

    @abc.abstractmethod
    def d(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def g(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        """G's loss; `real_logits` (D's logits on a real batch) is read by a paired loss only."""


@dataclass(frozen=True)
class Hinge(GanLoss):
    """Hinge loss (Lim & Ye 2017, "Geometric GAN"; Miyato et al. 2018, "Spectral Normalization for
    GANs"), as used by SAGAN and BigGAN: D minimises relu(1 - D(x)) + relu(1 + D(G(z))), G
    minimises -D(G(z))."""

    name = "hinge"

    def d(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_logits, fake_logits = _promote(real_logits), _promote(fake_logits)
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()

    def g(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return -_promote(fake_logits).mean()


@dataclass(frozen=True)
class NonSaturating(GanLoss):
    """The non-saturating GAN loss (Goodfellow et al. 2014): D is a binary classifier trained with
    cross-entropy on logits (softplus(-D(x)) + softplus(D(G(z)))); G maximises log D(G(z)), i.e.
    minimises softplus(-D(G(z))), whose gradient does not vanish when D rejects the fakes.

    Two tricks for D only, both off by default:
    - one-sided label smoothing (Salimans et al. 2016, "Improved Techniques for Training GANs"):
      the real target becomes 1 - label_smoothing; the fake target stays 0.
    - label flipping: each sample's target is swapped with probability `flip_prob`, independently
      for the real and the fake batch. A flipped real sample gets the fake target 0; a flipped
      fake sample gets the (smoothed) real target, so flip_prob=1 is D(fake, real) exactly.
      The draws come from `generator` when given, else from torch's global RNG on the logits'
      device, so they are reproducible under torch.manual_seed.
    """

    name = "non_saturating"
    label_smoothing: float = 0.0
    flip_prob: float = 0.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def _flipped(self, logits: Tensor) -> Tensor:
        """A per-sample boolean mask, shaped to broadcast over the logits."""
        device = self.generator.device if self.generator is not None else logits.device
        draw = torch.rand(logits.shape[0], generator=self.generator, device=device)
        return (draw < self.flip_prob).to(logits.device).view(-1, *([1] * (logits.dim() - 1)))

    def d(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_logits, fake_logits = _promote(real_logits), _promote(fake_logits)
        real_target = 1.0 - self.label_smoothing
        if self.flip_prob == 0.0:
            if real_target == 1.0:
                return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            real_targets = torch.full_like(real_logits, real_target)
            return F.binary_cross_entropy_with_logits(real_logits, real_targets) + F.softplus(fake_logits).mean()
        # Targets as tensors only when flipping, which consumes RNG draws.
        one, zero = real_logits.new_tensor(real_target), real_logits.new_tensor(0.0)
        real_targets = torch.where(self._flipped(real_logits), zero, one).expand_as(real_logits)
        fake_targets = torch.where(self._flipped(fake_logits), one, zero).expand_as(fake_logits)
        return F.binary_cross_entropy_with_logits(real_logits, real_targets) + F.binary_cross_entropy_with_logits(
            fake_logits, fake_targets
        )

    def g(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return F.softplus(-_promote(fake_logits)).mean()

    def d_targets(self, real_logits: Tensor, fake_logits: Tensor, real_targets: Tensor, fake_targets: Tensor) -> Tensor:
        """D's loss toward given per-sample targets (soft and noisy labels): cross-entropy on logits."""
        real_logits, fake_logits = _promote(real_logits), _promote(fake_logits)
        return F.binary_cross_entropy_with_logits(
            real_logits, real_targets.view(-1, *[1] * (real_logits.dim() - 1)).expand_as(real_logits)
        ) + F.binary_cross_entropy_with_logits(
            fake_logits, fake_targets.view(-1, *[1] * (fake_logits.dim() - 1)).expand_as(fake_logits)
        )


@dataclass(frozen=True)
class WganGp(GanLoss):
    """The Wasserstein critic loss of WGAN-GP (Gulrajani et al. 2017): D minimises
    D(G(z)) - D(x), G minimises -D(G(z)). `drift` adds drift * D(x)^2, ProGAN's small penalty
    (Karras et al. 2018, eps_drift = 1e-3) that keeps the critic's output near zero.
    The gradient penalty itself is `regularizers.gradient_penalty`, added by the loop."""

    name = "wgan_gp"
    drift: float = 1e-3

    def d(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_logits, fake_logits = _promote(real_logits), _promote(fake_logits)
        loss = fake_logits.mean() - real_logits.mean()
        return loss + self.drift * real_logits.square().mean() if self.drift else loss

    def g(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return -_promote(fake_logits).mean()


@dataclass(frozen=True)
class LeastSquares(GanLoss):
    """Least-squares GAN (Mao et al. 2017), with the a=0, b=1, c=1 coding: D minimises
    0.5 (D(x) - 1)^2 + 0.5 D(G(z))^2, G minimises 0.5 (D(G(z)) - 1)^2."""

    name = "least_squares"

    def d(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_logits, fake_logits = _promote(real_logits), _promote(fake_logits)
        return 0.5 * (real_logits - 1.0).square().mean() + 0.5 * fake_logits.square().mean()

    def g(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return 0.5 * (_promote(fake_logits) - 1.0).square().mean()

    def d_targets(self, real_logits: Tensor, fake_logits: Tensor, real_targets: Tensor, fake_targets: Tensor) -> Tensor:
        """D's loss toward given per-sample targets (soft and noisy labels) in place of b = 1 and a = 0."""
        real_logits, fake_logits = _promote(real_logits), _promote(fake_logits)
        shape = (-1, *[1] * (real_logits.dim() - 1))
        return (
            0.5 * (real_logits - real_targets.view(shape)).square().mean()
            + 0.5 * (fake_logits - fake_targets.view(shape)).square().mean()
        )


@dataclass(frozen=True)
class RelativisticPairing(GanLoss):
    """The relativistic pairing loss RpGAN (Jolicoeur-Martineau 2019), the loss of R3GAN (Huang et
    al. 2024, sec. 2): each fake is judged against the real sample of its row, by the difference of
    their logits. D minimises softplus(D(G(z)) - D(x)), G minimises softplus(D(x) - D(G(z))), each
    the mean over the pairs; as brownvc/R3GAN at 19a7ddf, R3GAN/Trainer.py,
    AdversarialTraining.Accumulate{Discriminator,Generator}Gradients (softplus(-(real - fake)) and
    softplus(-(fake - real))). With zero-centred R1 and R2 (`r1_gamma`, `r2_gamma` of the gan
    method) it is the paper's regularised loss."""

    name = "relativistic_pairing"
    paired = True

    @staticmethod
    def _pairs(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
        if real_logits.shape != fake_logits.shape:
            raise ValueError(
                f"relativistic_pairing pairs real and fake rows, so their logits must have one shape; got "
                f"{tuple(real_logits.shape)} real and {tuple(fake_logits.shape)} fake"
            )
        return _promote(real_logits), _promote(fake_logits)

    def d(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_logits, fake_logits = self._pairs(real_logits, fake_logits)
        return F.softplus(fake_logits - real_logits).mean()

    def g(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        if real_logits is None:
            raise ValueError("relativistic_pairing's G loss compares each fake with a real sample: pass real_logits")
        real_logits, fake_logits = self._pairs(real_logits, fake_logits)
        return F.softplus(real_logits - fake_logits).mean()


# Keyed by the spec's `train.loss` values; each entry holds its default options.
LOSSES: dict[str, GanLoss] = {
    loss.name: loss for loss in (Hinge(), NonSaturating(), WganGp(), LeastSquares(), RelativisticPairing())
}


class UnknownLossError(KeyError):
    """An unknown loss name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0])


def get_loss(name: str, **options) -> GanLoss:
    """The loss called `name`, with `options` replacing its defaults (e.g. label_smoothing=0.1).
    Raises UnknownLossError (a KeyError) for an unknown name, TypeError for an option the loss
    does not take."""
    if name not in LOSSES:
        hint = did_you_mean(name, LOSSES)
        raise UnknownLossError(
            f"unknown loss {name!r}; known: {', '.join(LOSSES)}"
            + (f" ({hint})" if hint and hint.startswith("did") else "")
        )
    loss = LOSSES[name]
    if not options:
        return loss
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(loss)})
    if unknown:
        taken = ", ".join(f.name for f in dataclasses.fields(loss)) or "none"
        raise TypeError(f"loss {name!r} takes no option {', '.join(unknown)} (options: {taken})")
    return dataclasses.replace(loss, **options)
