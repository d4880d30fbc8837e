"""Differentiable augmentation of D's inputs for limited data (`method.augment` of the gan family).

Two kinds, chosen by `kind`:

- `diffaugment`: DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient
  GAN Training"; mit-han-lab/data-efficient-gans at 0b63395, `DiffAugment_pytorch.py`): colour
  (brightness, saturation, contrast), translation by up to 1/8 of the image with zeros shifted in,
  and cutout of a square half the image's side, every op on every sample.
- `ada`: the non-leaking pipeline of ADA (Karras et al. 2020, "Training Generative Adversarial
  Networks with Limited Data"; NVlabs/stylegan2-ada-pytorch at d72cc7d, `training/augment.py`,
  `AugmentPipe` with the `bgc` groups of `train.py`): each op applied to each sample with
  probability p, p fixed or adapted from the sign of D's outputs on the real images
  (`training/training_loop.py`, the ADA heuristic).

Both transform the real and the fake images alike, in the D and the G step, on the device after
the data loader, differentiably (G's gradient and R1's flow through them). The random parameters
are drawn on the CPU from the run's own generator (checkpointed) for the global batch, each rank
taking its rows as with the latents, so a run on N ranks augments as a run on one. The
augmentation runs eagerly, outside the compiled networks.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from pipeline.methods.registry import KindOptions

DIFFAUGMENT_OPS = ("color", "translation", "cutout")

# ADA's op groups (stylegan2-ada-pytorch train.py, augpipe_specs) and the strengths AugmentPipe
# takes by default (training/augment.py, AugmentPipe.__init__)
ADA_GROUPS = {
    "blit": ("xflip", "rotate90", "xint"),
    "geom": ("scale", "rotate", "aniso", "xfrac"),
    "color": ("brightness", "contrast", "lumaflip", "hue", "saturation"),
}
ADA_PIPELINES = {
    "blit": ADA_GROUPS["blit"],
    "geom": ADA_GROUPS["geom"],
    "color": ADA_GROUPS["color"],
    "bg": ADA_GROUPS["blit"] + ADA_GROUPS["geom"],
    "bgc": ADA_GROUPS["blit"] + ADA_GROUPS["geom"] + ADA_GROUPS["color"],
}
XINT_MAX, SCALE_STD, ROTATE_MAX, ANISO_STD, XFRAC_STD = 0.125, 0.2, 1.0, 0.2, 0.125
BRIGHTNESS_STD, CONTRAST_STD, HUE_MAX, SATURATION_STD = 0.2, 0.5, 1.0, 1.0


class DiffAugment(KindOptions):
    """DiffAugment (Zhao et al. 2020): every op of `policy` on every real and fake image D sees,
    in the D and the G step. Formulas as the authors' DiffAugment_pytorch.py (0b63395): brightness
    x + (r - 0.5); saturation (x - mean over channels) * 2r + that mean; contrast (x - mean over the
    image) * (r + 0.5) + that mean, r ~ U(0, 1) per sample; translation by an integer in
    [-s, s] pixels per axis, s = round(side * translation_ratio), zeros shifted in; cutout of a
    round(side * cutout_ratio) square centred at a random pixel, zeroed."""

    kind: Literal["diffaugment"] = "diffaugment"
    policy: str = Field(
        "color,translation,cutout",
        description="Comma-separated ops, applied in this order: color, translation, cutout (the authors' "
        "'color,translation,cutout' for unconditional and 'translation,cutout' for their BigGAN CIFAR runs).",
    )
    translation_ratio: float = Field(
        0.125, ge=0, le=1, description="Largest shift as a share of the image side (the authors': 1/8)."
    )
    cutout_ratio: float = Field(
        0.5, ge=0, le=1, description="Side of the cutout square as a share of the image side (the authors': 1/2)."
    )

    @field_validator("policy")
    @classmethod
    def _known_ops(cls, value: str) -> str:
        ops = [op.strip() for op in value.split(",") if op.strip()]
        unknown = [op for op in ops if op not in DIFFAUGMENT_OPS]
        if not ops or unknown:
            raise ValueError(
                f"policy {value!r}: ops are {', '.join(DIFFAUGMENT_OPS)}, comma-separated"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        return ",".join(ops)


class Ada(KindOptions):
    """ADA (Karras et al. 2020): the non-leaking augmentation pipeline, each op applied to each
    sample with probability p. With a `target`, p adapts: every `interval` steps the mean sign of
    D's outputs on the real images since the last adjustment (over every rank) is compared with the
    target, and p moves by sign(mean - target) x images / (kimg x 1000), the images being the real
    images D saw since the last adjustment (the authors: batch x interval), never below 0. Without
    a target, p stays fixed (R3GAN: p 0.55 with adaptation off). p is logged as `augment_p` and
    checkpointed."""

    kind: Literal["ada"] = "ada"
    p: float = Field(0.0, ge=0, le=1, description="The probability at the start (fixed when `target` is null).")
    target: float | None = Field(
        0.6,
        ge=0,
        le=1,
        description="The target of E[sign(D(real))] (the paper's r_t, 0.6); null: p fixed at `p`.",
    )
    interval: PositiveInt = Field(4, description="Steps between adjustments of p (the authors' ada_interval, 4).")
    kimg: PositiveFloat = Field(
        500, description="Thousands of real images over which p can move by 1 (the authors' ada_kimg, 500)."
    )
    pipeline: Literal["blit", "geom", "color", "bg", "bgc"] = Field(
        "bgc",
        description="The op groups (the authors' --augpipe): blit (x-flip, 90-degree rotation, integer "
        "translation), geom (isotropic scaling, rotation, anisotropic scaling, fractional translation), color "
        "(brightness, contrast, luma flip, hue rotation, saturation); bg, bgc (the paper's default) combine them.",
    )

    @model_validator(mode="after")
    def _something_to_do(self):
        if self.target is None and self.p == 0:
            raise ValueError("with target null, p stays fixed: p 0 never augments; set p (e.g. 0.55) or a target")
        return self


AugmentOptions = Annotated[DiffAugment | Ada, Field(discriminator="kind")]


# ----- DiffAugment's ops, each a function of its per-sample parameters (differentiable in x)
def brightness(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x + offset per sample (DiffAugment: offset = r - 0.5)."""
    return x + offset.view(-1, 1, 1, 1)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scales each pixel's deviation from its mean over channels (DiffAugment: factor = 2r)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1) + mean


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scales each image's deviation from its mean over channels and pixels (DiffAugment: factor = r + 0.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1) + mean


def translate(x: torch.Tensor, shift_h: torch.Tensor, shift_w: torch.Tensor) -> torch.Tensor:
    """out[i, j] = x[i + shift_h, j + shift_w] per sample (integer shifts), zero outside the image."""
    b, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device) + shift_h.view(-1, 1) + 1).clamp(0, h + 1)  # into the 1-pixel pad
    cols = (torch.arange(w, device=x.device) + shift_w.view(-1, 1) + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    batch = torch.arange(b, device=x.device).view(-1, 1, 1)
    return padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zeroes rows [top, top + size[0]) and columns [left, left + size[1]) of each sample (clipped)."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = top.view(-1, 1, 1), left.view(-1, 1, 1)
    inside = (rows >= top) & (rows < top + size[0]) & (cols >= left) & (cols < left + size[1])
    return x * (~inside).to(x.dtype).unsqueeze(1)


# ----- ADA's transforms: 3x3 (geometric, pixel coordinates about the image centre) and 4x4 (colour, homogeneous RGB)
def _matrices(rows: list[list[torch.Tensor | float]], n: int) -> torch.Tensor:
    """(n, R, C) from rows of per-sample tensors (n,) or constants."""
    cols = [torch.as_tensor(v, dtype=torch.float32).expand(n) for row in rows for v in row]
    return torch.stack(cols, dim=-1).view(n, len(rows), len(rows[0]))


def _translate2d(tx, ty, n):
    return _matrices([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n)


def _scale2d(sx, sy, n):
    return _matrices([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n)


def _rotate2d(theta, n):
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrices([[c, -s, 0], [s, c, 0], [0, 0, 1]], n)


def _translate3d(t, n):
    return _matrices([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n)


def _scale3d(s, n):
    return _matrices([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n)


_LUMA = torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)  # the luma axis (homogeneous)


def _rotate_about_luma(theta, n):
    vx, vy, vz = (float(v) for v in _LUMA[:3])
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _matrices(
        [
            [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
            [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
            [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
            [0, 0, 0, 1],
        ],
        n,
    )


def warp(x: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """x resampled through g_inv (n, 3, 3), which maps output pixel coordinates about the image
    centre to input ones: bilinear, reflecting at the borders."""
    _, _, h, w = x.shape
    to_unit = _scale2d(2 / w, 2 / h, 1)  # pixels about the centre -> grid_sample's [-1, 1] (align_corners=False)
    theta = to_unit @ g_inv @ torch.linalg.inv(to_unit)
    grid = F.affine_grid(theta[:, :2, :].to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def recolour(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x through the colour transforms c (n, 4, 4) on homogeneous RGB; for one channel, as the
    authors: the mean of the RGB rows."""
    b, ch, h, w = x.shape
    c = c.to(x.device, x.dtype)
    flat = x.reshape(b, ch, h * w)
    if ch == 3:
        flat = c[:, :3, :3] @ flat + c[:, :3, 3:]
    elif ch == 1:
        c = c[:, :3, :].mean(dim=1, keepdim=True)
        flat = flat * c[:, :, :3].sum(dim=2, keepdim=True) + c[:, :, 3:]
    else:
        raise ValueError(f"ADA's colour ops need RGB or grey images, got {ch} channels")
    return flat.reshape(b, ch, h, w)


class _Draws:
    """Per-sample random numbers for the rows of this rank: drawn on the CPU for the global batch
    (n x world_size rows) from one generator, so every rank draws alike and takes its own rows."""

    def __init__(self, generator: torch.Generator, n: int, rank: int, world_size: int):
        self.g, self.n, self.world = generator, n, world_size
        self.rows = slice(rank * n, (rank + 1) * n)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(self.n * self.world, *shape, generator=self.g)[self.rows]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(self.n * self.world, *shape, generator=self.g)[self.rows]

    def randint(self, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (self.n * self.world,), generator=self.g)[self.rows]


def ada_transforms(ops: tuple[str, ...], p: float, draws: _Draws, size: tuple[int, int], channels: int):
    """ADA's per-sample geometric (g_inv, or None without geometric ops) and colour (or None)
    transforms at probability p, drawn in the order of the authors' AugmentPipe.forward."""
    n, (h, w) = draws.n, size

    def chosen(shape=()):  # applied to a sample with probability p
        return draws.rand(*shape) < p

    g_inv = None
    if "xflip" in ops:
        i = torch.floor(draws.rand() * 2)
        i = torch.where(chosen(), i, torch.zeros_like(i))
        g_inv = _scale2d(1 - 2 * i, 1, n)  # its own inverse
    if "rotate90" in ops:
        i = torch.floor(draws.rand() * 4)
        i = torch.where(chosen(), i, torch.zeros_like(i))
        g_inv = _compose(g_inv, _rotate2d(math.pi / 2 * i, n))  # the inverse of a rotation by -pi/2 i
    if "xint" in ops:
        t = (draws.rand(2) * 2 - 1) * XINT_MAX
        t = torch.where(chosen((1,)), t, torch.zeros_like(t))
        g_inv = _compose(g_inv, _translate2d(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h), n))
    if "scale" in ops:
        s = torch.exp2(draws.randn() * SCALE_STD)
        s = torch.where(chosen(), s, torch.ones_like(s))
        g_inv = _compose(g_inv, _scale2d(1 / s, 1 / s, n))
    p_rot = 1 - math.sqrt(min(max(1 - p, 0.0), 1.0))  # P(pre or post rotation) = p
    if "rotate" in ops:
        theta = (draws.rand() * 2 - 1) * math.pi * ROTATE_MAX
        theta = torch.where(draws.rand() < p_rot, theta, torch.zeros_like(theta))
        g_inv = _compose(g_inv, _rotate2d(theta, n))  # before the anisotropic scaling
    if "aniso" in ops:
        s = torch.exp2(draws.randn() * ANISO_STD)
        s = torch.where(chosen(), s, torch.ones_like(s))
        g_inv = _compose(g_inv, _scale2d(1 / s, s, n))
    if "rotate" in ops:
        theta = (draws.rand() * 2 - 1) * math.pi * ROTATE_MAX
        theta = torch.where(draws.rand() < p_rot, theta, torch.zeros_like(theta))
        g_inv = _compose(g_inv, _rotate2d(theta, n))  # after it
    if "xfrac" in ops:
        t = draws.randn(2) * XFRAC_STD
        t = torch.where(chosen((1,)), t, torch.zeros_like(t))
        g_inv = _compose(g_inv, _translate2d(-t[:, 0] * w, -t[:, 1] * h, n))

    c = None
    if "brightness" in ops:
        b = draws.randn() * BRIGHTNESS_STD
        b = torch.where(chosen(), b, torch.zeros_like(b))
        c = _translate3d(b, n)
    if "contrast" in ops:
        k = torch.exp2(draws.randn() * CONTRAST_STD)
        k = torch.where(chosen(), k, torch.ones_like(k))
        c = _then(c, _scale3d(k, n))
    vv = torch.outer(_LUMA, _LUMA)
    if "lumaflip" in ops:
        i = torch.floor(draws.rand(1, 1) * 2)
        i = torch.where(chosen((1, 1)), i, torch.zeros_like(i))
        c = _then(c, torch.eye(4) - 2 * vv * i)  # Householder reflection about the luma axis
    if "hue" in ops and channels > 1:
        theta = (draws.rand() * 2 - 1) * math.pi * HUE_MAX
        theta = torch.where(chosen(), theta, torch.zeros_like(theta))
        c = _then(c, _rotate_about_luma(theta, n))
    if "saturation" in ops and channels > 1:
        s = torch.exp2(draws.randn(1, 1) * SATURATION_STD)
        s = torch.where(chosen((1, 1)), s, torch.ones_like(s))
        c = _then(c, vv + (torch.eye(4) - vv) * s)
    return g_inv, c


def _compose(g_inv, m):
    """g_inv @ m (the authors' G_inv = G_inv @ op_inv), or m alone."""
    return m if g_inv is None else g_inv @ m


def _then(c, m):
    """m @ c (the authors' C = op @ C), or m alone."""
    return m if c is None else m @ c


class Augmenter:
    """The augmentation of one run: applies it (`__call__`), and for ADA keeps p, the sign
    statistic since the last adjustment and adjusts p (`observe`, `adapt`); checkpointed."""

    def __init__(self, options: DiffAugment | Ada, seed: int):
        self.o = options
        self.rng = torch.Generator().manual_seed(seed)
        self.p = options.p if isinstance(options, Ada) else 1.0
        self.adaptive = isinstance(options, Ada) and options.target is not None
        self.signs: torch.Tensor | None = None  # sum of sign(D(real)) on this rank since the last adjustment
        self.count = 0  # and how many outputs
        self.images_at_adjustment = 0  # real images seen at the last adjustment (all ranks)
        self.adjusted_at: int | None = None  # the step whose adjustment is done

    def __call__(self, x: torch.Tensor, step) -> torch.Tensor:
        """x (n, C, H, W) augmented, differentiably; computed in float32, returned in x's dtype."""
        if step.counting_flops:
            return x  # a few elementwise ops per pixel: not counted
        if self.p == 0:
            return x  # ADA at p 0: nothing is applied
        draws = _Draws(self.rng, x.shape[0], step.rank, step.world_size)
        out = x.float()
        if isinstance(self.o, DiffAugment):
            out = self._diffaugment(out, draws)
        else:
            size = (x.shape[-2], x.shape[-1])
            g_inv, c = ada_transforms(ADA_PIPELINES[self.o.pipeline], self.p, draws, size, x.shape[1])
            if g_inv is not None:
                out = warp(out, g_inv)
            if c is not None:
                out = recolour(out, c)
        return out.to(x.dtype)

    def _diffaugment(self, x: torch.Tensor, draws: _Draws) -> torch.Tensor:
        o, (h, w), dev = self.o, x.shape[-2:], x.device
        assert isinstance(o, DiffAugment)
        for op in o.policy.split(","):
            if op == "color":
                x = brightness(x, (draws.rand() - 0.5).to(dev))
                x = saturation(x, (draws.rand() * 2).to(dev))
                x = contrast(x, (draws.rand() + 0.5).to(dev))
            elif op == "translation":
                sh, sw = int(h * o.translation_ratio + 0.5), int(w * o.translation_ratio + 0.5)
                x = translate(x, draws.randint(-sh, sh + 1).to(dev), draws.randint(-sw, sw + 1).to(dev))
            else:  # cutout: a centre in [0, side + (1 - size % 2)), as the authors
                size = int(h * o.cutout_ratio + 0.5), int(w * o.cutout_ratio + 0.5)
                top = draws.randint(0, h + (1 - size[0] % 2)) - size[0] // 2
                left = draws.randint(0, w + (1 - size[1] % 2)) - size[1] // 2
                x = cutout(x, top.to(dev), left.to(dev), size)
        return x

    def observe(self, real_logits: torch.Tensor, step) -> None:
        """ADA: adds the signs of D's outputs on (augmented) real images to the statistic (no host sync)."""
        if not self.adaptive or step.counting_flops:
            return
        signs = real_logits.detach().float().sign().sum()
        self.signs = signs if self.signs is None else signs + self.signs.to(signs.device)
        self.count += real_logits.numel()

    def adapt(self, step) -> None:
        """ADA: at the start of every `interval`-th step (after steps interval, 2 x interval, ...,
        as the authors adjust after those batches), the statistic summed over ranks (one
        collective) moves p; once per step."""
        o = self.o
        if not isinstance(o, Ada) or o.target is None or step.counting_flops:
            return
        if step.step == 0 or step.step % o.interval or self.adjusted_at == step.step:
            return
        self.adjusted_at = step.step
        local = torch.stack(
            [
                torch.zeros((), dtype=torch.float32) if self.signs is None else self.signs.float().cpu(),
                torch.tensor(float(self.count)),
            ]
        )
        signs, count = step.all_sum(local).tolist()
        images = step.images_seen - self.images_at_adjustment
        self.signs, self.count, self.images_at_adjustment = None, 0, step.images_seen
        if count > 0:
            self.p = max(self.p + adjustment(signs / count, o.target, images, o.kimg), 0.0)

    def logs(self, device) -> dict[str, torch.Tensor]:
        if not isinstance(self.o, Ada):
            return {}
        return {"augment_p": torch.tensor(self.p, dtype=torch.float64, device=device)}

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.get_state(),
            "p": self.p,
            "signs": 0.0 if self.signs is None else float(self.signs.item()),
            "count": self.count,
            "images_at_adjustment": self.images_at_adjustment,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.p = float(state["p"])
        self.signs = torch.tensor(float(state["signs"])) if state["count"] else None
        self.count = int(state["count"])
        self.images_at_adjustment = int(state["images_at_adjustment"])
        self.adjusted_at = None


def adjustment(mean_sign: float, target: float, images: int, kimg: float) -> float:
    """ADA's step of p: sign(E[sign(D(real))] - target) x images / (kimg x 1000)
    (stylegan2-ada-pytorch training_loop.py: np.sign(...) * (batch_size * ada_interval) / (ada_kimg * 1000))."""
    direction = (mean_sign > target) - (mean_sign < target)
    return direction * images / (kimg * 1000)
