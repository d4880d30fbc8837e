"""`method: progressive`: ProGAN's progressive growing (Karras et al. 2018, "Progressive Growing of
GANs for Improved Quality, Stability, and Variation", sec. 2 and appendix A.1).

The networks grow from `start_resolution` to data.resolution one stage at a time, each stage
(a resolution) being a node instance of the spec's `grow:` chain. A new stage first fades in over
`fade_images` real images (alpha rising linearly from 0 to 1: G's image is (1 - alpha) x
upsample(previous to_rgb) + alpha x new to_rgb, D's input path blends the same way), then trains
stable for `stable_images`; the last stage trains until train.max_steps. The real images follow:
read at the stage's resolution and, during a fade-in, blended like G's output so that D sees the
same blur in both. The paper: 800k real images per fade-in and per stabilisation, WGAN-GP with
the drift term 0.001, Adam lr 1e-3 betas (0, 0.99) eps 1e-8, minibatch 16 up to 128x128, then 14,
6 and 3 at 256, 512 and 1024.

Each step is the gan method's (D steps, then a G step, every option of `gan` included): this
method adds the schedule, which the loop applies before each step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from torch.nn import functional as F

from pipeline.blocks.layers import avgpool2, upsample2
from pipeline.errors import Issue
from pipeline.methods.gan import GanMethod, LossName, _GanRun
from pipeline.methods.registry import Options, Schedule, Where, register

if TYPE_CHECKING:
    from pipeline.graph import NetworkPlan

PAPER_PHASE_IMAGES = 800_000  # real images per fade-in and per stabilisation (paper, sec. A.1)


class StageOverride(Options):
    """Settings of one resolution that differ from the spec's (the paper lowers the batch at 256
    and up to fit the memory; the authors' code raises the learning rate at high resolutions)."""

    batch_size: PositiveInt | None = Field(None, description="The global batch at this resolution.")
    g_lr: PositiveFloat | None = Field(None, description="The generators' learning rate at this resolution.")
    d_lr: PositiveFloat | None = Field(None, description="The discriminators' learning rate at this resolution.")


@register
class ProgressiveMethod(GanMethod):
    """ProGAN's schedule over a growing G and D (both with `grow:`), each step a gan step."""

    # a kind of its own, as the discriminated union of methods needs (mypy sees gan's Literal narrowed)
    kind: Literal["progressive"] = "progressive"  # type: ignore[assignment]
    loss: LossName = Field("wgan_gp", description="GAN loss (ProGAN: wgan_gp, with its drift term 0.001).")
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP gradient penalty weight (ProGAN: 10).")
    start_resolution: PositiveInt = Field(4, description="The resolution of the first stage (ProGAN: 4).")
    fade_images: PositiveInt = Field(
        PAPER_PHASE_IMAGES, description="Real images over which each new stage fades in (ProGAN: 800k)."
    )
    stable_images: PositiveInt = Field(
        PAPER_PHASE_IMAGES,
        description="Real images each stage trains after its fade-in, before the next (ProGAN: 800k); the last "
        "stage trains until train.max_steps.",
    )
    resolutions: dict[PositiveInt, StageOverride] = Field(
        default_factory=dict, description="Per-resolution overrides: {256: {batch_size: 14}, ...}."
    )
    reset_optimizer: bool = Field(
        True,
        description="Clear the optimizers' states (Adam's moments and step counts) at the start of every fade-in "
        "and stabilisation, as the authors' train.py does (reset_optimizer_state whenever the level of detail "
        "changes); false keeps them through the growth.",
    )

    @field_validator("resolutions", mode="before")
    @classmethod
    def _resolutions_are_numbers(cls, value):
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, bool):
                    raise ValueError(f"a resolution is a number of pixels, not {str(key).lower()}")
        return value

    def stages(self, spec) -> list[int]:
        """The resolution of each stage of the spec's growing generator, smallest first."""
        net = spec.all_networks().get(self.generator)
        node = net.nodes.get(net.grow) if net is not None and net.grow else None
        n = node.repeat if node is not None else 0
        return [spec.data.resolution >> (n - k) for k in range(n + 1)]

    def batch_sizes(self, spec) -> dict[str, int]:
        return {f"method.resolutions.{r}.batch_size": o.batch_size for r, o in self.resolutions.items() if o.batch_size}

    def check(self, spec, plans: dict[str, NetworkPlan], where: Where) -> list[Issue]:
        issues = super().check(spec, plans, where)
        growth = {name: plans[name].growth for name in (self.generator, self.discriminator) if name in plans}
        for name, g in growth.items():
            if g is None:
                path = spec.network_path(name)
                issues.append(
                    Issue(
                        f"method progressive grows its networks, and {name} has no `grow:`",
                        path,
                        *where(tuple(path.split("."))),
                        "name the repeated node whose instances are the stages (grow: up in G, grow: down in D)",
                    )
                )
        if issues or len(growth) < 2:
            return issues
        g_growth, d_growth = growth[self.generator], growth[self.discriminator]
        assert g_growth is not None and d_growth is not None  # a network without `grow:` returned above
        g_res = [s.resolution for s in g_growth.stages]
        d_res = [s.resolution for s in d_growth.stages]
        if g_res != d_res:
            path = f"{spec.network_path(self.discriminator)}.grow"
            issues.append(
                Issue(
                    f"the generator grows through {g_res}, the discriminator through {d_res}",
                    path,
                    *where(tuple(path.split("."))),
                    "give both chains one instance per stage after the first",
                )
            )
        if self.start_resolution not in g_res:
            issues.append(
                Issue(
                    f"start_resolution {self.start_resolution} is not a stage; the stages are {g_res}",
                    "method.start_resolution",
                    *where(("method", "start_resolution")),
                )
            )
        for res in self.resolutions:
            if res not in g_res:
                issues.append(
                    Issue(
                        f"resolutions.{res}: not a stage; the stages are {g_res}",
                        f"method.resolutions.{res}",
                        *where(("method", "resolutions")),
                    )
                )
        return issues

    def sample_grid(self, spec, device):
        grid = super().sample_grid(spec, device)
        side = spec.data.resolution

        def shown(nets):  # every stage shown at the final size, so that the growth is visible
            return {k: _upsampled(v, side) for k, v in grid(nets).items()}

        return shown

    def diversity_probe(self, spec, device):
        # none: the probe's distance (L2 over pixels) grows with each stage's image size, so it
        # cannot be compared with its first value, as the collapse detector does
        return None

    def build(self, spec):
        return _ProgressiveRun(self, spec)


def _upsampled(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-1] == side:
        return images
    flat = images.flatten(0, -4)
    return F.interpolate(flat, size=(side, side), mode="nearest").unflatten(0, images.shape[:-3])


class _ProgressiveRun(_GanRun):
    m: ProgressiveMethod

    def __init__(self, m: ProgressiveMethod, spec):
        super().__init__(m, spec)
        self.resolutions = m.stages(spec)
        self.first = self.resolutions.index(m.start_resolution) if m.start_resolution in self.resolutions else 0
        self.now: Schedule | None = None

    def schedule(self, images_seen: int) -> Schedule:
        m = self.m
        stage, fading, alpha = self.first, False, 1.0
        left = images_seen - m.stable_images  # the first stage has no fade-in
        while left >= 0 and stage + 1 < len(self.resolutions):
            stage += 1
            if left < m.fade_images:
                fading, alpha = True, left / m.fade_images
                break
            left -= m.fade_images + m.stable_images
        res = self.resolutions[stage]
        override = m.resolutions.get(res)
        lr = {}
        if override is not None:
            lr = {role: v for role, v in (("generator", override.g_lr), ("discriminator", override.d_lr)) if v}
        batch = override.batch_size if override else None
        self.now = Schedule(stage, fading, alpha, res, batch, lr, reset_optimizers=m.reset_optimizer)
        return self.now

    def phase_start(self, stage: int, fading: bool) -> int:
        """The real images seen when a stage's fade-in (or its stabilisation) begins."""
        m, grown = self.m, stage - self.first
        if grown <= 0:
            return 0
        return m.stable_images + (grown - 1) * (m.fade_images + m.stable_images) + (0 if fading else m.fade_images)

    def profiled_at(self) -> int:
        return self.phase_start(len(self.resolutions) - 1, fading=False)

    def real_batch(self, step):
        real, y = super().real_batch(step)
        if self.now is not None and self.now.fading:  # the paper's trick: reals faded in like G's output
            real = torch.lerp(upsample2(avgpool2(real)), real, self.now.alpha)
        return real, y
