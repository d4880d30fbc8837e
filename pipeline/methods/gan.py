"""`method: gan`, the default: a class-conditional GAN trained with `d_steps` discriminator steps
then one generator step, as in BigGAN, SAGAN, DCGAN and their relatives."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from pipeline.blocks.attention import explicit_attention
from pipeline.blocks.layers import batch_statistics
from pipeline.errors import Issue
from pipeline.methods import latent_opt, unet_gan
from pipeline.methods.augment import Augmenter, AugmentOptions
from pipeline.methods.losses import LOSSES, LeastSquares, NonSaturating, get_loss
from pipeline.methods.registry import Method, MethodRun, NetworkNeed, Options, Phase, Where, register
from pipeline.methods.regularizers import gradient_penalty, ortho_penalty, r1_penalty, r1_r2_penalties, r2_penalty
from pipeline.methods.replay import ImageHistory
from pipeline.precision import full_precision
from pipeline.regions import region

if TYPE_CHECKING:
    from pipeline.graph import NetworkPlan

LossName = Literal["hinge", "non_saturating", "wgan_gp", "least_squares", "relativistic_pairing"]


class CutMix(Options):
    """U-Net GAN's CutMix consistency (Schonfeld et al. 2020, sec. 3.2; boschresearch/unetgan at
    37adcf0, `train_fns.py:GAN_training_function`): on a CutMix round D judges the real batch, the
    fakes (made with the real images' labels) and their mix by a box mask M (real where M = 1) in
    one forward; the decoder learns M per pixel, the encoder calls the mix fake, and the decoder's
    logits on the mix must equal the mix of its logits on the real and the fake batch (weight
    `consistency`). Needs a discriminator whose second output is one logit per pixel."""

    max_probability: float = Field(
        unet_gan.MAX_CUTMIX_PROBABILITY,
        gt=0,
        le=1,
        description="Probability of a CutMix round after the warm-up (0.5), one coin per step (full_batch only).",
    )
    warmup_images: int = Field(
        ge=0,
        description="Real images over which the probability rises linearly from 0 (full_batch only; the authors' "
        "scripts: 100 epochs on FFHQ, 200 on COCO-Animals).",
    )
    consistency: NonNegativeFloat = Field(
        unet_gan.CONSISTENCY_WEIGHT, description="Weight of the consistency regulariser (1.0 in the authors' code)."
    )
    full_batch: bool = Field(
        True,
        description="true: a CutMix round replaces the plain real/fake losses by the CutMix and consistency terms "
        "(the FFHQ and COCO-Animals scripts, --full_batch_mixup); false: every D step adds them to the plain "
        "losses, no coin or warm-up (the CelebA script).",
    )
    box: unet_gan.BoxPlacement = Field(
        "clipped",
        description="How the box is drawn: `clipped`, centred on a random pixel and clipped to the image (the "
        "authors' mixup.py); `inside`, wholly inside the image so its area follows the drawn ratio.",
    )


class SoftLabels(Options):
    """Soft and noisy labels for D (ganhacks tip 6; Salimans et al. 2016 for one-sided
    smoothing): each real sample's target is drawn uniformly in `real`, each fake's in `fake`, and
    with probability `flip` a sample gets a target of the other kind. For the losses with targets:
    non_saturating (cross-entropy; targets in [0, 1], since a target above 1 makes it unbounded
    below) and least_squares (any targets)."""

    real: tuple[float, float] = Field((0.7, 1.2), description="Range of real targets (ganhacks: 0.7 to 1.2).")
    fake: tuple[float, float] = Field((0.0, 0.3), description="Range of fake targets (ganhacks: 0 to 0.3).")
    flip: float = Field(0.0, ge=0, le=1, description="Probability that a sample's target is of the other kind.")

    @model_validator(mode="after")
    def _ranges(self):
        for name, (lo, hi) in (("real", self.real), ("fake", self.fake)):
            if lo > hi:
                raise ValueError(f"{name}: the range [{lo}, {hi}] is empty; give [low, high]")
        return self


class AuxClassifier(Options):
    """AC-GAN (Odena et al. 2017; ganhacks tip 12): D's second output is num_classes class logits
    (e.g. a `linear` node on its pooled features, listed second in discriminator.output); D's loss
    adds the cross-entropy of its class predictions on the real and the fake images, G's loss that
    on the fakes of the classes G was given."""

    weight_d: NonNegativeFloat = Field(1.0, description="Weight of the class cross-entropy in D's loss.")
    weight_g: NonNegativeFloat = Field(1.0, description="Weight of the class cross-entropy in G's loss.")


class Replay(Options):
    """Experience replay (ganhacks tip 8): D's fakes pass through a pool of past generated images
    (the mechanism of CycleGAN's image history): once it holds `size`, each fake is swapped for a
    kept one with probability `fraction`. Checkpointed, so resume stays exact."""

    size: PositiveInt = Field(50, description="Past generated images kept (with their labels).")
    fraction: float = Field(0.5, gt=0, le=1, description="Probability that a fake is replaced by a kept one.")


class InstanceNoise(Options):
    """Instance noise (ganhacks tip 13; Sonderby et al. 2017, Arjovsky & Bottou 2017): Gaussian noise
    added to every input of D, the real and fake images of the D step and G's images in the G step
    (G's gradient is taken through D(G(z) + noise)), its standard deviation falling linearly from
    `std` to 0 over `anneal_images` real images."""

    std: float = Field(0.1, gt=0, description="Standard deviation at the start (images are in [-1, 1]).")
    anneal_images: PositiveInt = Field(description="Real images over which the noise falls to 0.")
    in_g_step: bool = Field(
        True, description="Also add the noise to G's images in the G step (false: the D step only)."
    )


_NGD = latent_opt.BIGGAN_DEEP_NGD


class Logan(Options):
    """LOGAN's latent optimisation (Wu et al. 2019, arXiv:1912.00953): before each D and G
    update, z takes one step up D's score of G(z), and both losses are computed from G(z') plus
    `penalty` x ||Δz||². Defaults: the paper's BigGAN-deep LOGAN (NGD). z' is clipped to [-1, 1]
    when latent.distribution is uniform (the paper's prior, chosen to match the clipping), and
    not clipped for a normal latent.

    Where the paper leaves a choice open (docs/fidelity.md): Algorithm 1 computes one z' for a
    simultaneous D and G update; here, as in deepmind-research's cs_gan, D and G alternate and every
    D step and G step draws a fresh z and takes its own latent step. The step ascends D's logit
    (Algorithm 1's f), which for hinge and WGAN losses is also the G loss's direction. The moved
    elements are drawn at random per sample and step, and the natural gradient's norm is taken over
    them; the penalty is on Δz before the clip (the paper's ||Δz||², cs_gan penalises the move)."""

    alpha: NonNegativeFloat = Field(_NGD.alpha, description="Step size α (0.9; 0 makes the step a no-op).")
    beta: float = Field(
        _NGD.beta, gt=0, description="NGD damping β (5.0, 'much heavier damping is essential for BigGAN')."
    )
    natural: bool = Field(_NGD.natural, description="Natural gradient Δz = α g / (β + ||g||²); false: plain Δz = α g.")
    optimise_fraction: float = Field(
        _NGD.optimise_fraction, gt=0, le=1, description="Share of each z's elements moved (0.5 for BigGAN-deep)."
    )
    penalty: NonNegativeFloat = Field(
        _NGD.penalty_weight, description="Weight w_R of ||Δz||² in both losses (300 for BigGAN-deep)."
    )
    second_order: bool = Field(
        True,
        description="The losses of z' backpropagate through Δz (the second-order terms the paper's analysis rests "
        "on); false treats Δz as a constant.",
    )


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
        0.0,
        description="R1 penalty on real images (Mescheder et al. 2018), weighted r1_gamma / 2, every D step (0: off).",
    )
    r2_gamma: NonNegativeFloat = Field(
        0.0,
        description="R2 penalty on the (detached) fake images, weighted r2_gamma / 2, every D step (0: off); R3GAN: "
        "r1_gamma = r2_gamma = its gamma.",
    )
    gp_weight: NonNegativeFloat = Field(
        0.0, description="WGAN-GP gradient penalty weight (10 in Gulrajani et al.; 0: off)."
    )
    d_batches: Literal["auto", "joint", "separate"] = Field(
        "auto",
        description=(
            "How the D step shows D the real and the fake images: `joint`, one concatenated batch (one forward, "
            "faster); `separate`, an all-real and an all-fake batch (ganhacks tip 4, as in the DCGAN and ProGAN "
            "code): a layer computing statistics over the batch (BatchNorm, minibatch stddev) must not mix them; "
            "`auto`, separate when D has such a layer, else joint."
        ),
    )
    aux_classifier: AuxClassifier | None = Field(
        None, description="AC-GAN's auxiliary classifier (D's second output: class logits); null: off."
    )
    soft_labels: SoftLabels | None = Field(None, description="Soft and noisy targets for D; null: off.")
    replay: Replay | None = Field(None, description="Experience replay of past fakes for D; null: off.")
    instance_noise: InstanceNoise | None = Field(None, description="Annealed noise on D's inputs; null: off.")
    logan: Logan | None = Field(None, description="LOGAN's latent optimisation before D and G updates; null: off.")
    cutmix: CutMix | None = Field(None, description="U-Net GAN's CutMix consistency; null: off.")
    augment: AugmentOptions | None = Field(
        None,
        description="Differentiable augmentation of every image D sees, real and fake, in the D and the G step "
        "(kind: diffaugment or ada; pipeline/methods/augment.py); null: off.",
    )
    generator: str = Field("generator", description="The network trained as G (inputs z and y).")
    discriminator: str = Field("discriminator", description="The network trained as D (inputs image and y).")
    stream: str = Field("images", description="The labelled data stream of real images.")

    @model_validator(mode="after")
    def _options_of_the_loss(self):
        if self.loss != "non_saturating" and (self.label_smoothing or self.label_flip):
            raise ValueError(f"label_smoothing and label_flip apply to the non_saturating loss, not {self.loss}")
        if self.replay is not None and self.logan is not None and self.logan.alpha > 0 and self.logan.second_order:
            raise ValueError(
                "replay shows D stored (detached) fakes, so D's loss cannot reach back through LOGAN's step; "
                "set logan.second_order=false or replay=null"
            )
        if self.aux_classifier is not None and self.cutmix is not None:
            raise ValueError("aux_classifier and cutmix both use D's second output; choose one")
        if self.soft_labels is not None:
            if self.loss not in ("non_saturating", "least_squares"):
                raise ValueError(
                    f"soft_labels apply to the losses with targets (non_saturating, least_squares), not {self.loss}"
                )
            if self.label_smoothing or self.label_flip:
                raise ValueError("soft_labels replace label_smoothing and label_flip; set those to 0")
            if self.loss == "non_saturating" and max(*self.soft_labels.real, *self.soft_labels.fake) > 1:
                raise ValueError(
                    "soft_labels: non_saturating is a cross-entropy, unbounded below for targets above 1; "
                    "use ranges within [0, 1], e.g. real: [0.7, 1.0] (or loss: least_squares)"
                )
        if get_loss(self.loss).paired and self.cutmix is not None:
            raise ValueError(f"cutmix's per-pixel targets have no real-fake pairs; {self.loss} needs them")
        if self.cutmix is not None:
            try:
                unet_gan.check_pixel_targets(get_loss(self.loss, **self._loss_options()))
            except ValueError as exc:
                raise ValueError(f"cutmix: {exc}") from None
        return self

    def _loss_options(self) -> dict:
        if self.loss != "non_saturating":
            return {}
        return {"label_smoothing": self.label_smoothing, "flip_prob": self.label_flip}

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

    def check(self, spec, plans: dict[str, NetworkPlan], where: Where) -> list[Issue]:
        issues = []
        if spec.latent is None:  # G's step draws z (and the sample grid shows fixed z) from latent:
            issues.append(
                Issue(
                    f"method {self.kind!r} draws the generator's latents from `latent:`, which the spec does not have",
                    "latent",
                    *where(("latent",)),
                    "add e.g. `latent: {z_dim: 128}`",
                )
            )
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
        shapes = plans[self.discriminator].output_shapes if self.discriminator in plans else None
        if self.aux_classifier is not None and shapes is not None:
            path = f"{spec.network_path(self.discriminator)}.output"
            if not d.num_classes:
                issues.append(
                    Issue(
                        "the auxiliary classifier needs classes, and data.num_classes is 0",
                        "method.aux_classifier",
                        *where(("method", "aux_classifier")),
                    )
                )
            elif len(shapes) != 2 or shapes[1] != (d.num_classes,):
                outputs = " + ".join("x".join(map(str, s)) or "label" for s in shapes)
                issues.append(
                    Issue(
                        f"with method.aux_classifier, the discriminator's outputs are one logit per image and "
                        f"{d.num_classes} class logits; got {outputs}",
                        path,
                        *where(tuple(path.split("."))),
                        f"add a linear node with out_features: {d.num_classes} on D's pooled features and list it "
                        "second in discriminator.output",
                    )
                )
            shapes = shapes[:1]  # the class logits are accounted for
        if self.soft_labels is not None and shapes is not None and len(shapes) == 2:
            issues.append(
                Issue(
                    "soft_labels set targets for one logit per image; this discriminator also has per-pixel logits "
                    "(a U-Net D), whose loss takes no targets",
                    "method.soft_labels",
                    *where(("method", "soft_labels")),
                    "set method.soft_labels=null, or give the discriminator one output",
                )
            )
        if shapes is not None and (len(shapes) > 2 or (len(shapes) == 2 and shapes[1] != (1, *image[1:]))):
            path = f"{spec.network_path(self.discriminator)}.output"
            issues.append(
                Issue(
                    "a discriminator's outputs are one logit per image and, optionally, one per pixel (shape "
                    f"1x{d.resolution}x{d.resolution}); got " + " + ".join("x".join(map(str, s)) for s in shapes),
                    path,
                    *where(tuple(path.split("."))),
                    "end the decoder with a pixel_head, or give one output",
                )
            )
        if self.logan is not None and self.generator in plans:
            declared = spec.all_networks()[self.generator].inputs
            if declared and not any(i.kind == "latent" for i in declared.values()):
                issues.append(
                    Issue(
                        f"LOGAN optimises the generator's latent, but {self.generator} has no latent input",
                        "method.logan",
                        *where(("method", "logan")),
                        "give the generator a latent input (inputs: {z: latent, y: labels}) or set method.logan=null",
                    )
                )
        if get_loss(self.loss).paired and shapes is not None and len(shapes) == 2:
            issues.append(
                Issue(
                    f"the {self.loss} loss compares one logit per image; this discriminator also has per-pixel logits",
                    "method.loss",
                    *where(("method", "loss")),
                    "give the discriminator one output, or choose another loss",
                )
            )
        if self.cutmix is not None and shapes is not None and len(shapes) < 2:
            issues.append(
                Issue(
                    "CutMix needs a discriminator with per-pixel logits as its second output (a U-Net D)",
                    "method.cutmix",
                    *where(("method", "cutmix")),
                    "add a decoder with a pixel_head and list it in discriminator.output, or set method.cutmix=null",
                )
            )
        if shapes is not None and shapes[0] != (1,):
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
        # rows are classes, columns samples; the same latents at every step. With a U-Net D, also
        # where D thinks each sample is real (white) or fake (black), pixel by pixel
        rows = min(10, spec.data.num_classes)
        generator = torch.Generator().manual_seed(spec.seed + 1)
        shape = (rows * 8, spec.latent.z_dim)
        uniform = spec.latent.distribution == "uniform"
        z = torch.rand(shape, generator=generator) * 2 - 1 if uniform else torch.randn(shape, generator=generator)
        z = z.to(device)
        y = torch.linspace(0, spec.data.num_classes - 1, rows).long().repeat_interleave(8).to(device)

        def grid(nets):
            images = nets[self.generator](z, y)
            out = {"": images.unflatten(0, (rows, -1))}
            if self.aux_classifier is not None:  # D's second output is class logits, nothing to draw
                return out
            judged = nets[self.discriminator](images, y)
            if isinstance(judged, tuple):
                out["-d-pixels"] = (torch.sigmoid(judged[1].float()) * 2 - 1).unflatten(0, (rows, -1))
            return out

        return grid

    def d_loss_bounded(self) -> bool:
        return self.loss != "wgan_gp"

    def diversity_probe(self, spec, device):
        # 32 fixed latents (classes 0, 1, ... in turn), from a seed of their own
        if spec.latent is None:
            return None
        generator = torch.Generator().manual_seed(spec.seed + 2)
        z = torch.randn(32, spec.latent.z_dim, generator=generator).to(device)
        classes = spec.data.num_classes
        y = (torch.arange(32) % classes).to(device) if classes else None
        return self.generator, (z, y)

    def build(self, spec) -> MethodRun:
        return _GanRun(self, spec)


def _differentiable_twice(objective, needed: bool):
    """`objective` with attention that can be differentiated twice, when `needed`."""
    if not needed:
        return objective

    def objective_twice(step):
        with explicit_attention():
            return objective(step)

    return objective_twice


def _logit(out):
    """The global logit of a discriminator's output (its first, for a U-Net D)."""
    return out[0] if isinstance(out, tuple) else out


def _rows(out, part: slice):
    return tuple(o[part] for o in out) if isinstance(out, tuple) else out[part]


def _float(out):
    """D's outputs promoted from half precision to float32 (float64 stays float64)."""
    return tuple(full_precision(o) for o in out) if isinstance(out, tuple) else full_precision(out)


class _GanRun(MethodRun):
    def __init__(self, m: GanMethod, spec):
        self.m = m
        self.loss = get_loss(m.loss, **m._loss_options())
        # CutMix's coin and boxes: one generator, the same seed on every rank (the same branch
        # everywhere), its state checkpointed so a resumed run draws what it would have drawn
        self.cutmix_rng = torch.Generator().manual_seed(spec.seed + 31) if m.cutmix is not None else None
        self.cutmix_step: int | None = None  # the step the mask was drawn for
        self.cutmix_mask: torch.Tensor | None = None  # and the mask (None: a plain round)
        # LOGAN's element masks, drawn like CutMix's from a generator of the method's own
        self.logan_rng = torch.Generator().manual_seed(spec.seed + 37) if m.logan is not None else None
        self.separate: bool | None = None  # whether D sees real and fake apart: decided from D's modules on first use
        self.replay = ImageHistory(m.replay.size, spec.seed + 41, m.replay.fraction) if m.replay is not None else None
        self.labels_rng = torch.Generator().manual_seed(spec.seed + 43) if m.soft_labels is not None else None
        self.augment = Augmenter(m.augment, spec.seed + 47) if m.augment is not None else None
        self.clip = (-1.0, 1.0) if spec.latent is not None and spec.latent.distribution == "uniform" else None
        # with LOGAN, the D step's latent gradient runs through G: G is frozen there (no gradient of
        # D's loss may reach G's parameters)
        latent_grads = m.logan is not None and m.logan.alpha > 0
        # a loss on D's input gradient (R1, WGAN-GP) or on G's through LOGAN's step is differentiated
        # twice: that phase's attention runs by its explicit formula (see explicit_attention)
        second_order = latent_grads and m.logan is not None and m.logan.second_order
        twice_d = bool(m.r1_gamma or m.r2_gamma or m.gp_weight) or second_order
        twice_g = second_order
        self.phases = [
            Phase(
                "D",
                ("D",),
                _differentiable_twice(self.d_objective, twice_d),
                repeat=m.d_steps,
                frozen=(m.generator,) if latent_grads else (),
            ),
            Phase("G", ("G",), _differentiable_twice(self.g_objective, twice_g), frozen=(m.discriminator,)),
        ]

    def _generators(self) -> dict:
        named = (("cutmix_rng", self.cutmix_rng), ("logan_rng", self.logan_rng), ("labels_rng", self.labels_rng))
        return {k: g for k, g in named if g is not None}

    def state_dict(self) -> dict:
        state = {name: g.get_state() for name, g in self._generators().items()}
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        if self.augment is not None:
            state["augment"] = self.augment.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        generators = self._generators()
        self.cutmix_step = None  # the next step draws its own round, as it would have without the stop
        kept = set(generators) | ({"replay"} if self.replay is not None else set())
        kept |= {"augment"} if self.augment is not None else set()
        if set(state) != kept:
            raise ValueError(f"the checkpoint's method state holds {sorted(state)}, this run keeps {sorted(kept)}")
        for name, g in generators.items():
            g.set_state(state[name])
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])
        if self.augment is not None:
            self.augment.load_state_dict(state["augment"])

    def _targets(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft, noisy targets for n real and n fake samples (drawn on the CPU from the method's generator)."""
        s = self.m.soft_labels
        assert s is not None  # called only with soft labels on (labels_rng is set)
        draw = torch.rand(4, n, generator=self.labels_rng)
        real = s.real[0] + (s.real[1] - s.real[0]) * draw[0]
        fake = s.fake[0] + (s.fake[1] - s.fake[0]) * draw[1]
        flip_real, flip_fake = draw[2] < s.flip, draw[3] < s.flip
        real, fake = torch.where(flip_real, fake, real), torch.where(flip_fake, real, fake)
        return real.to(device), fake.to(device)

    def _noise_std(self, step) -> float:
        noise = self.m.instance_noise
        assert noise is not None  # called only with instance noise on
        return noise.std * max(0.0, 1.0 - step.images_seen / noise.anneal_images)

    def _latents(self, step, G, D, labels=None):
        """z (LOGAN's z' when it is on), the labels (`labels` in place of the drawn ones when
        given), and the latent penalty to add to the loss."""
        z, y = step.latents(step.micro)
        y = y if labels is None else labels
        lo = self.m.logan
        if lo is None or lo.alpha == 0:
            return z, y, None
        with region("latent_opt"), step.mixed():
            z, delta = latent_opt.latent_step(
                z.requires_grad_(True),
                # G gets a view, not the leaf itself: flop_counter's module hooks cannot follow
                # autograd.grad to a leaf that is a module's input ("_will_engine_execute_node")
                lambda latent: _logit(_float(D(G(latent.view_as(latent), y), y))),
                alpha=lo.alpha,
                beta=lo.beta,
                natural=lo.natural,
                clip=self.clip,
                optimise_fraction=lo.optimise_fraction,
                second_order=lo.second_order,
                generator=self.logan_rng,
            )
            penalty = latent_opt.latent_step_penalty(delta, weight=lo.penalty)
        return z, y, penalty

    def d_objective(self, step):
        m, G, D = self.m, step.nets[self.m.generator], step.nets[self.m.discriminator]
        if self.augment is not None:
            self.augment.adapt(step)  # ADA: p for this step (every interval-th), before it reads
        real, y_real = self.real_batch(step)
        mask = self._cutmix_round(step, real)
        # a CutMix round makes its fakes with the real images' labels (the authors' G_D.forward: gy = dy),
        # and so does a paired loss: fake row i is judged against real row i, of the same class (R3GAN's
        # Trainer passes one Conditions to G and to D on both batches)
        paired_labels = mask is not None or self.loss.paired
        z, y_fake, penalty = self._latents(step, G, D, labels=y_real if paired_labels else None)
        # no graph through G, unless D's loss must reach D's parameters through LOGAN's Δz
        through_delta = penalty is not None and m.logan is not None and m.logan.second_order  # a penalty: LOGAN is on
        with region("G_fwd"), torch.set_grad_enabled(through_delta), step.mixed():
            fake = G(z, y_fake)
        if self.replay is not None:
            fake, y_fake = self.replay(fake, y_fake) if y_fake is not None else (self.replay(fake), None)
        if m.instance_noise is not None and (std := self._noise_std(step)) > 0:
            real = real + std * torch.randn_like(real)
            fake = fake + std * torch.randn_like(fake)
        if m.r1_gamma:
            real = real.detach().requires_grad_(True)
        fake = fake.to(real.dtype)
        if m.r2_gamma and not fake.requires_grad:  # no graph to G: the penalty's gradient reaches D only
            fake = fake.detach().requires_grad_(True)
        # R1's (and R2's) gradient is taken at the images before augmentation, as the references'
        real_leaf, fake_leaf = real, fake
        if self.augment is not None:  # D sees the real and the fake images augmented alike
            real, fake = self.augment(real, step), self.augment(fake, step)
        batches, labels = [real, fake], [y_real, y_fake]
        if mask is not None:
            batches.append(unet_gan.mix(real.detach(), fake.detach(), mask))
            labels.append(y_real)
        with region("D_fwd"), step.mixed():
            real_out, fake_out, *mixed_out = self._judge(D, batches, labels)
            real_logits, fake_logits = _logit(real_out), _logit(fake_out)
            aux = m.aux_classifier
            # the authors skip the plain losses on a mixed round (a mask: CutMix is on)
            if mask is not None and m.cutmix is not None and m.cutmix.full_batch:
                d_loss = real_logits.new_zeros((), dtype=torch.float32)
            elif isinstance(real_out, tuple) and aux is None:  # U-Net D: the encoder's and the decoder's losses
                d_loss = unet_gan.unet_d_loss(self.loss, real_out, fake_out)
            elif self.labels_rng is not None:
                # soft labels are refused for the losses without targets (GanMethod's validator)
                assert isinstance(self.loss, NonSaturating | LeastSquares)
                d_loss = self.loss.d_targets(real_logits, fake_logits, *self._targets(step.micro, real.device))
            else:
                d_loss = self.loss.d(real_logits, fake_logits)
            if aux is not None:  # AC-GAN: D also classifies the real and the fake images
                classes = F.cross_entropy(real_out[1], y_real) + F.cross_entropy(fake_out[1], y_fake)
                d_loss = d_loss + aux.weight_d * classes
            if m.r1_gamma and m.r2_gamma:  # R3GAN's regularised D loss: both penalties, one backward
                r1, r2 = r1_r2_penalties(real_logits, real_leaf, fake_logits, fake_leaf)
                d_loss = d_loss + m.r1_gamma / 2 * r1 + m.r2_gamma / 2 * r2
            elif m.r1_gamma:
                r1 = r1_penalty(real_logits, real_leaf)
                d_loss = d_loss + m.r1_gamma / 2 * r1
            elif m.r2_gamma:
                r2 = r2_penalty(fake_logits, fake_leaf)
                d_loss = d_loss + m.r2_gamma / 2 * r2
            if m.gp_weight:
                d_loss = d_loss + m.gp_weight * gradient_penalty(lambda x, y: _logit(D(x, y)), real, fake, y_real)
            if mask is not None:
                assert m.cutmix is not None  # a mask is drawn only with CutMix on
                cutmix = unet_gan.cutmix_d_loss(self.loss, mixed_out[0], mask)
                consistency = unet_gan.consistency_loss(mixed_out[0], real_out, fake_out, mask)
                d_loss = d_loss + cutmix + m.cutmix.consistency * consistency
        logs = {"d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
        if self.augment is not None:
            self.augment.observe(real_logits, step)  # ADA's statistic: the signs of D's outputs on the reals
            logs |= self.augment.logs(real_logits.device)
        if aux is not None:
            logs |= {
                "aux_loss_d": classes.detach(),
                "aux_accuracy_real": (real_out[1].detach().argmax(1) == y_real).float().mean(),
            }
        if m.r2_gamma:  # the penalties R3GAN reports (logged with R2 only: R1-only runs log as before)
            logs |= {"r2": r2.detach()} | ({"r1": r1.detach()} if m.r1_gamma else {})
        if mask is not None:
            logs |= {"loss_cutmix": cutmix.detach(), "consistency": consistency.detach()}
        if penalty is not None:
            d_loss = d_loss + penalty
            logs["latent_penalty"] = penalty.detach()
        return {"D": d_loss}, {"loss_d": d_loss.detach(), **logs}

    def real_batch(self, step):
        """The D step's real images and their labels."""
        return step.next(self.m.stream)

    def _separate(self, D) -> bool:
        if self.separate is None:
            self.separate = self.m.d_batches == "separate" or (self.m.d_batches == "auto" and bool(batch_statistics(D)))
        return self.separate

    def _judge(self, D, batches, labels) -> list:
        """D's outputs on each batch: one forward over them all (as the authors' G_D.forward), or
        one forward each when D must see them apart (`d_batches`)."""
        if self._separate(D):
            return [_float(D(x, y)) for x, y in zip(batches, labels, strict=True)]
        out = _float(D(torch.cat(batches), None if labels[0] is None else torch.cat(labels)))
        starts = [0, *itertools.accumulate(x.shape[0] for x in batches)]
        return [_rows(out, slice(a, b)) for a, b in itertools.pairwise(starts)]

    def _cutmix_round(self, step, real):
        """The mask M of this step's CutMix round, or None on a plain round. One coin and one set of
        masks per step, shared by its D steps and micro-batches, as the authors draw
        use_mixup_in_this_round and target_map once per iteration."""
        c = self.m.cutmix
        if c is None:
            return None
        if self.cutmix_step != step.step:
            self.cutmix_step = step.step
            if step.counting_flops or not c.full_batch:
                mixing = True  # FLOPs are counted for a step that mixes (an upper bound of the average)
            else:
                probability = unet_gan.cutmix_probability(
                    step.images_seen, warmup_images=c.warmup_images, maximum=c.max_probability
                )
                mixing = unet_gan.cutmix_this_step(probability, generator=self.cutmix_rng)
            height, width = real.shape[-2:]
            self.cutmix_mask = (
                unet_gan.cutmix_mask(step.micro, height, width, placement=c.box, generator=self.cutmix_rng)[0]
                if mixing
                else None
            )
        return None if self.cutmix_mask is None else self.cutmix_mask.to(real.device, real.dtype)

    def g_objective(self, step):
        m, G, D = self.m, step.nets[self.m.generator], step.nets[self.m.discriminator]
        # a paired loss judges each fake against a real image of its class: the G step reads its own
        # real batch (as R3GAN's loop fetches one for G, training_loop.py: G_img), counted as seen
        real, y_real = self.real_batch(step) if self.loss.paired else (None, None)
        z, y, penalty = self._latents(step, G, D, labels=y_real)
        with region("G_fwd"), step.mixed():
            fake = G(z, y)
        noise = m.instance_noise
        if noise is not None and noise.in_g_step and (std := self._noise_std(step)) > 0:
            fake = fake + std * torch.randn_like(fake)
            real = None if real is None else real + std * torch.randn_like(real)
        if self.augment is not None:  # D judges augmented images in G's step too, the paired reals included
            fake = self.augment(fake, step)
            real = None if real is None else self.augment(real, step)
        real_logits = None
        if real is not None:  # D is frozen and the reals need no gradient: no graph kept
            with region("D_fwd"), torch.no_grad(), step.mixed():
                real_logits = _logit(_float(D(real, y_real)))
        with region("D_fwd"), step.mixed():
            out = _float(D(fake, y))
            aux, logs = m.aux_classifier, {}
            if aux is not None:  # AC-GAN: G also wants its images classified as the class it was given
                classes = F.cross_entropy(out[1], y)
                g_loss = self.loss.g(out[0], real_logits) + aux.weight_g * classes
                logs["aux_loss_g"] = classes.detach()
            elif isinstance(out, tuple):
                g_loss = unet_gan.unet_g_loss(self.loss, out)
            else:
                g_loss = self.loss.g(out, real_logits)
        if penalty is not None:
            g_loss = g_loss + penalty
        if m.ortho_reg:
            with region("G_fwd"):
                g_loss = g_loss + ortho_penalty(G, m.ortho_reg)
        return {"G": g_loss}, {"loss_g": g_loss.detach(), **logs}
