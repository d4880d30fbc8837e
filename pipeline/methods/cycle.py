"""`method: cycle`: unpaired image-to-image translation between two domains A and B, as in CSGAN
(Kancharagunta & Dubey 2019, "CSGAN: Cyclic-Synthesized Generative Adversarial Networks for
Image-to-Image Transformation", arXiv:1901.03554), built on CycleGAN (Zhu et al. 2017).

Four networks: G_AB translates A to B, G_BA translates B to A, D_A tells real A images from
G_BA's, D_B real B images from G_AB's. With real a and b, synthesized b' = G_AB(a), a' = G_BA(b)
and cycled a'' = G_BA(b'), b'' = G_AB(a'), the generators minimise

    adv(D_B(b')) + adv(D_A(a'))                      adversarial: CycleGAN's MSE(D(fake), 1) by default
    + lambda_cycle (|a'' - a|_1 + |b'' - b|_1)       cycle consistency (CycleGAN)
    + lambda_cs (|a' - a''|_1 + |b' - b''|_1)        cyclic-synthesized loss (CSGAN's contribution)
    + lambda_identity lambda_cycle (|G_BA(a) - a|_1 + |G_AB(b) - b|_1)   identity (optional)

and each discriminator (MSE(D(real), 1) + MSE(D(fake), 0)) / 2 (CycleGAN's GANLoss and
backward_D_basic; the other losses follow the same convention, see CYCLEGAN_SCALE) on real
images against the synthesized ones of the same step,
drawn through a history of past fakes (CycleGAN's image pool of 50) when `history` is set. As in
the authors' code, the generators step first, then the discriminators on that step's fakes, and
the cycled image in the cyclic-synthesized term is a constant (no gradient flows through it).

The cyclic-synthesized term compares images made from a and from b, so it needs a and b to be a
pair: CSGAN is evaluated on paired datasets (CUHK faces, CMP facades), and `paired` streams are
read in lockstep. With lambda_cs 0 and unpaired streams this is CycleGAN.

Both generators are optimised with one loss, so they share one engine (with a param group each,
as the authors' code chains them into one Adam); D_A and D_B each have their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator

from pipeline.errors import Issue
from pipeline.methods.losses import LOSSES, get_loss
from pipeline.methods.registry import Method, MethodRun, NetworkNeed, Options, Phase, Schedule, Where, register
from pipeline.methods.replay import ImageHistory
from pipeline.precision import full_precision
from pipeline.regions import region

if TYPE_CHECKING:
    from pipeline.graph import NetworkPlan


class LrDecay(Options):
    """CycleGAN's 'linear' policy (models/networks.py:get_scheduler): every learning rate stays at its
    spec value for `constant_images` real images, then falls linearly to 0 over `decay_images`. The
    authors step it once per epoch (1 - k / (n + 1) in the k-th of n decay epochs); here it follows
    the same line step by step, as progress is counted in images."""

    constant_images: NonNegativeInt = Field(
        description="Real images at the initial rate, counted as the run counts them (an a and a b image per "
        "pair): 100 epochs in CycleGAN, 2 x 100 x the pairs of the dataset."
    )
    decay_images: PositiveInt = Field(description="Real images over which the rate falls to 0 (100 epochs).")

    def factor(self, images_seen: int) -> float:
        return max(0.0, 1.0 - max(0, images_seen - self.constant_images) / self.decay_images)


@register
class CycleMethod(Method):
    """Two generators and two discriminators on two unpaired image streams (CSGAN, CycleGAN)."""

    kind: Literal["cycle"] = "cycle"
    use: ClassVar[Literal["generate", "translate"]] = "translate"
    loss: Literal["hinge", "non_saturating", "wgan_gp", "least_squares"] = Field(
        "least_squares",
        description="Adversarial loss of both pairs: " + ", ".join(LOSSES) + " (least squares as in CycleGAN).",
    )
    lambda_cycle: NonNegativeFloat = Field(
        10.0, description="Weight of the cycle-consistency L1 losses (10 in CycleGAN and CSGAN)."
    )
    lambda_cs: NonNegativeFloat = Field(
        30.0,
        description="Weight of the cyclic-synthesized L1 losses, synthesized vs cycled image of each domain "
        "(30 in the CSGAN authors' code; 0 gives CycleGAN).",
    )
    lambda_identity: NonNegativeFloat = Field(
        0.0,
        description="Identity loss |G_BA(a) - a| + |G_AB(b) - b|, relative to lambda_cycle (CycleGAN's option, "
        "0.5 there for photo-painting tasks; 0: off).",
    )
    paired: bool = Field(
        True,
        description="The two streams hold the same scenes in the same order (as CSGAN's datasets do) and are "
        "read in lockstep, so each step's a and b are a pair. The cyclic-synthesized loss needs it; CycleGAN "
        "(lambda_cs 0) works on unpaired streams.",
    )
    history: NonNegativeInt = Field(
        50, description="Past generated images per domain the discriminators also see (CycleGAN's pool of 50; 0: off)."
    )
    lr_decay: LrDecay | None = Field(
        None,
        description="CycleGAN's learning-rate schedule (constant, then linear to 0); null: constant. The authors "
        "train 100 epochs at the initial rate and decay over 100 more: give both in images of the dataset.",
    )
    g_ab: str = Field("G_AB", description="The network translating domain A to B.")
    g_ba: str = Field("G_BA", description="The network translating domain B to A.")
    d_a: str = Field("D_A", description="The network judging images of domain A.")
    d_b: str = Field("D_B", description="The network judging images of domain B.")
    domain_a: str = Field("a", description="The data stream of domain A (unlabelled images).")
    domain_b: str = Field("b", description="The data stream of domain B (unlabelled images).")

    @model_validator(mode="after")
    def _synthesized_loss_needs_pairs(self):
        if self.lambda_cs and not self.paired:
            raise ValueError(
                "lambda_cs compares G_BA(b) with G_BA(G_AB(a)), which only means something when a and b are a "
                "pair; on unpaired streams it drives both generators to ignore their input. Set paired: true "
                "with paired shards, or lambda_cs: 0 (CycleGAN)"
            )
        return self

    def read_together(self, spec) -> bool:
        return self.paired

    def networks(self, spec) -> dict[str, NetworkNeed]:
        a, b = f"image:{self.domain_a}", f"image:{self.domain_b}"
        return {
            self.g_ab: NetworkNeed("generator", {"image": a}),
            self.g_ba: NetworkNeed("generator", {"image": b}),
            self.d_a: NetworkNeed("discriminator", {"image": a}),
            self.d_b: NetworkNeed("discriminator", {"image": b}),
        }

    def engines(self, spec) -> dict[str, tuple[str, ...]]:
        return {"G": (self.g_ab, self.g_ba), self.d_a: (self.d_a,), self.d_b: (self.d_b,)}

    def streams(self, spec) -> dict[str, bool]:
        return {self.domain_a: False, self.domain_b: False}

    def exports(self, spec) -> tuple[str, ...]:
        return (self.g_ab, self.g_ba)

    def check(self, spec, plans: dict[str, NetworkPlan], where: Where) -> list[Issue]:
        issues = []
        for g, target in ((self.g_ab, self.d_b), (self.g_ba, self.d_a)):
            if g in plans and target in plans:
                got, image = plans[g].output_shapes[0], plans[target].inputs["image"]
                if got != image:
                    path = f"{spec.network_path(g)}.output"
                    issues.append(
                        Issue(
                            f"{g} outputs {'x'.join(map(str, got))}, but {target} judges images of "
                            f"{'x'.join(map(str, image))}",
                            path,
                            *where(tuple(path.split("."))),
                            "a translation must give images of the other domain's shape",
                        )
                    )
        for d in (self.d_a, self.d_b):
            if d in plans and plans[d].output_shapes[0][:1] != (1,):
                path = f"{spec.network_path(d)}.output"
                issues.append(
                    Issue(
                        "a discriminator's first output must be one logit per image or a 1-channel patch map, got "
                        f"{'x'.join(map(str, plans[d].output_shapes[0])) or 'label'}",
                        path,
                        *where(tuple(path.split("."))),
                        "end with a patch_head (PatchGAN) or a d_head",
                    )
                )
        return issues

    def sample_grid(self, spec, device):
        # rows: A | G_AB(A) | G_BA(G_AB(A)), then B | G_BA(B) | G_AB(G_BA(B)), 8 fixed images each
        from pipeline.data.dali import first_images

        a = first_images(spec, self.domain_a, 8, device)
        b = first_images(spec, self.domain_b, 8, device)

        def grid(nets):
            ab, ba = nets[self.g_ab], nets[self.g_ba]
            fake_b, fake_a = ab(a), ba(b)
            return {"": torch.stack([a, fake_b, ba(fake_b), b, fake_a, ab(fake_a)])}

        return grid

    def d_loss_bounded(self) -> bool:
        return self.loss != "wgan_gp"

    def build(self, spec) -> MethodRun:
        return _CycleRun(self, spec)


def l1(x, target):
    """The L1 loss in at least float32 (images under autocast may be bf16)."""
    return F.l1_loss(full_precision(x), full_precision(target))


# CycleGAN's GANLoss convention (junyanz/pytorch-CycleGAN-and-pix2pix, `models/networks.py:GANLoss`,
# `models/cycle_gan_model.py:backward_D_basic`, `backward_G`): each D minimises
# (crit(D(real), real) + crit(D(fake), fake)) / 2 and the generators crit(D(fake), real), with crit
# the plain MSE ('lsgan'), BCE with logits ('vanilla') or -/+ mean ('wgangp'). Relative to this
# project's losses (D: the sum of both terms, G: the criterion; least squares with LSGAN's own
# 1/2 on every term), that is (D factor, G factor); hinge, not a CycleGAN option, follows the same rule:
CYCLEGAN_SCALE = {"least_squares": (1.0, 2.0), "non_saturating": (0.5, 1.0), "wgan_gp": (0.5, 1.0), "hinge": (0.5, 1.0)}


class _CycleRun(MethodRun):
    def __init__(self, m: CycleMethod, spec):
        self.m = m
        # CycleGAN's 'wgangp' criterion has no drift term
        self.loss = get_loss(m.loss, **({"drift": 0.0} if m.loss == "wgan_gp" else {}))
        self.d_scale, self.g_scale = CYCLEGAN_SCALE[m.loss]
        self.history = {d: ImageHistory(m.history, spec.seed + i) for i, d in enumerate((m.d_a, m.d_b))}
        self.pending: list[tuple] = []  # (real a, real b, fake a, fake b) of each G micro-batch, for D
        self.phases = [
            Phase("G", ("G",), self.g_objective, frozen=(m.d_a, m.d_b)),
            Phase("D", (m.d_a, m.d_b), self.d_objective),
        ]

    def schedule(self, images_seen: int) -> Schedule | None:
        decay = self.m.lr_decay
        if decay is None:
            return None
        return Schedule(lr_scale=decay.factor(images_seen))

    def g_objective(self, step):
        m, n = self.m, step.nets
        G_AB, G_BA, D_A, D_B = n[m.g_ab], n[m.g_ba], n[m.d_a], n[m.d_b]
        real_a, _ = step.next(m.domain_a)
        real_b, _ = step.next(m.domain_b)
        with region("G_fwd"), step.mixed():
            fake_b, fake_a = G_AB(real_a), G_BA(real_b)
            cycled_a, cycled_b = G_BA(fake_b), G_AB(fake_a)
        with region("D_fwd"), step.mixed():
            adversarial = self.g_scale * (self.loss.g(D_B(fake_b)) + self.loss.g(D_A(fake_a)))
        with region("G_fwd"):
            cycle = l1(cycled_a, real_a) + l1(cycled_b, real_b)
            synthesized = l1(fake_a, cycled_a.detach()) + l1(fake_b, cycled_b.detach())
            loss = adversarial + m.lambda_cycle * cycle + m.lambda_cs * synthesized
            logs = {"loss_cycle": cycle.detach(), "loss_cs": synthesized.detach()}
            if m.lambda_identity:
                with step.mixed():
                    same_a, same_b = G_BA(real_a), G_AB(real_b)
                identity = l1(same_a, real_a) + l1(same_b, real_b)
                loss = loss + m.lambda_identity * m.lambda_cycle * identity
                logs["loss_identity"] = identity.detach()
        logs["loss_g"] = loss.detach()
        self.pending.append((real_a, real_b, fake_a.detach(), fake_b.detach()))
        return {"G": loss}, logs

    def d_objective(self, step):
        m, n = self.m, step.nets
        real_a, real_b, fake_a, fake_b = self.pending.pop(0)
        fake_a, fake_b = self.history[m.d_a](fake_a), self.history[m.d_b](fake_b)
        with region("D_fwd"), step.mixed():
            logits_a = n[m.d_a](torch.cat([real_a, fake_a.to(real_a.dtype)]))
            logits_b = n[m.d_b](torch.cat([real_b, fake_b.to(real_b.dtype)]))
            half = real_a.shape[0]
            loss_a = self.d_scale * self.loss.d(logits_a[:half], logits_a[half:])
            loss_b = self.d_scale * self.loss.d(logits_b[:half], logits_b[half:])
        logs = {"loss_d_a": loss_a.detach(), "loss_d_b": loss_b.detach()}
        return {m.d_a: loss_a, m.d_b: loss_b}, logs

    def state_dict(self) -> dict:
        return {"history": {d: h.state_dict() for d, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        for d, h in self.history.items():
            h.load_state_dict(state["history"][d])
