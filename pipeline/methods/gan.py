"""`method: gan`, the default: a class-conditional GAN trained with `d_steps` discriminator steps
then one generator step, as in BigGAN, SAGAN, DCGAN and their relatives."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from pipeline.errors import Issue
from pipeline.methods.registry import Method, MethodRun, NetworkNeed, Phase, register
from pipeline.profile.regions import region
from pipeline.train.losses import LOSSES, get_loss
from pipeline.train.regularizers import gradient_penalty, ortho_penalty, r1_penalty

LossName = Literal["hinge", "non_saturating", "wgan_gp", "least_squares"]


@register
class GanMethod(Method):
    """A generator G(z, y) and a discriminator D(image, y), one labelled image stream."""

    kind: Literal["gan"] = "gan"
    loss: LossName = Field("hinge", description="GAN loss: " + ", ".join(LOSSES) + ".")
    d_steps: PositiveInt = Field(1, description="Discriminator steps per generator step.")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="non_saturating: one-sided label smoothing of D's real targets (1 - smoothing; "
        "Salimans et al. 2016).",
    )
    label_flip: float = Field(
        0.0, ge=0, le=1, description="non_saturating: probability of flipping each of D's real/fake targets."
    )
    ortho_reg: NonNegativeFloat = Field(
        0.0,
        description=(
            "BigGAN's modified orthogonal regularization beta * ||W W^T * (1 - I)||_F^2 (0: off); BigGAN-PyTorch's "
            "--G_ortho strength s corresponds to beta = s / 2."
        ),
    )
    r1_gamma: NonNegativeFloat = Field(
        0.0, description="R1 penalty weight on real images (Mescheder et al. 2018; 0: off)."
    )
    gp_weight: NonNegativeFloat = Field(
        0.0, description="WGAN-GP gradient penalty weight (10 in Gulrajani et al.; 0: off)."
    )
    generator: str = Field("generator", description="The network trained as G (inputs z and y).")
    discriminator: str = Field("discriminator", description="The network trained as D (inputs image and y).")
    stream: str = Field("images", description="The labelled data stream of real images.")

    @model_validator(mode="after")
    def _options_of_the_loss(self):
        if self.loss != "non_saturating" and (self.label_smoothing or self.label_flip):
            raise ValueError(f"label_smoothing and label_flip apply to the non_saturating loss, not {self.loss}")
        return self

    def networks(self, spec) -> dict[str, NetworkNeed]:
        return {
            self.generator: NetworkNeed("generator", {"z": "latent", "y": "labels"}),
            self.discriminator: NetworkNeed("discriminator", {"image": f"image:{self.stream}", "y": "labels"}),
        }

    def engines(self, spec) -> dict[str, tuple[str, ...]]:
        return {"G": (self.generator,), "D": (self.discriminator,)}

    def streams(self, spec) -> dict[str, bool]:
        return {self.stream: True}

    def exports(self, spec) -> tuple[str, ...]:
        return (self.generator,)

    def check(self, spec, plans, where) -> list[Issue]:
        issues = []
        d = spec.data
        image = (d.channels, d.resolution, d.resolution)
        if self.generator in plans and plans[self.generator].output_shapes[0] != image:
            got = plans[self.generator].output_shapes[0]
            path = f"{spec.network_path(self.generator)}.output"
            issues.append(
                Issue(
                    f"the generator outputs {'x'.join(map(str, got))}, but data.resolution {d.resolution} with "
                    f"{d.channels} channels makes images of {'x'.join(map(str, image))}, the discriminator's input",
                    path,
                    *where(tuple(path.split("."))),
                    "add or remove up-sampling stages, or set data.resolution to the generator's output size",
                )
            )
        if self.discriminator in plans and plans[self.discriminator].output_shapes[0] != (1,):
            got = plans[self.discriminator].output_shapes[0]
            path = f"{spec.network_path(self.discriminator)}.output"
            issues.append(
                Issue(
                    "the discriminator's first output must be one logit per image (shape 1), got "
                    f"{'x'.join(map(str, got)) or 'label'}",
                    path,
                    *where(tuple(path.split("."))),
                    "end with a d_head, or reshape to [1]",
                )
            )
        return issues

    def sample_grid(self, spec, device):
        # rows are classes, columns samples; the same latents at every step
        rows = min(10, spec.data.num_classes)
        generator = torch.Generator().manual_seed(spec.seed + 1)
        z = torch.randn(rows * 8, spec.latent.z_dim, generator=generator).to(device)
        y = torch.linspace(0, spec.data.num_classes - 1, rows).long().repeat_interleave(8).to(device)
        return lambda nets: nets[self.generator](z, y).unflatten(0, (rows, -1))

    def build(self, spec) -> MethodRun:
        return _GanRun(self)


class _GanRun(MethodRun):
    def __init__(self, m: GanMethod):
        self.m = m
        self.loss = get_loss(
            m.loss,
            **({"label_smoothing": m.label_smoothing, "flip_prob": m.label_flip} if m.loss == "non_saturating" else {}),
        )
        self.phases = [
            Phase("D", ("D",), self.d_objective, repeat=m.d_steps),
            Phase("G", ("G",), self.g_objective, frozen=(m.discriminator,)),
        ]

    def d_objective(self, step):
        m, G, D = self.m, step.nets[self.m.generator], step.nets[self.m.discriminator]
        real, y_real = step.next(m.stream)
        with region("G_fwd"), torch.no_grad(), step.mixed():
            z, y_fake = step.latents(step.micro)
            fake = G(z, y_fake)
        if m.r1_gamma:
            real = real.detach().requires_grad_(True)
        with region("D_fwd"), step.mixed():
            # real and fake in one batch: one forward of D
            logits = D(torch.cat([real, fake.to(real.dtype)]), torch.cat([y_real, y_fake])).float()
            real_logits, fake_logits = logits[: step.micro], logits[step.micro :]
            d_loss = self.loss.d(real_logits, fake_logits)
            if m.r1_gamma:
                d_loss = d_loss + m.r1_gamma / 2 * r1_penalty(real_logits, real)
            if m.gp_weight:
                d_loss = d_loss + m.gp_weight * gradient_penalty(D, real, fake, y_real)
        logs = {"loss_d": d_loss.detach(), "d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
        return {"D": d_loss}, logs

    def g_objective(self, step):
        m, G, D = self.m, step.nets[self.m.generator], step.nets[self.m.discriminator]
        with region("G_fwd"), step.mixed():
            z, y = step.latents(step.micro)
            fake = G(z, y)
        with region("D_fwd"), step.mixed():
            g_loss = self.loss.g(D(fake, y).float())
        if m.ortho_reg:
            with region("G_fwd"):
                g_loss = g_loss + ortho_penalty(G, m.ortho_reg)
        return {"G": g_loss}, {"loss_g": g_loss.detach()}
