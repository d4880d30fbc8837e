"""U-Net GAN's losses and CutMix consistency as pure functions (Schönfeld, Schiele & Khoreva 2020,
"A U-Net Based Discriminator for Generative Adversarial Networks", CVPR 2020, arXiv:2002.12655).

A U-Net discriminator returns a pair `(enc_logits (B, 1), dec_logits (B, 1, H, W))`: the encoder's
global real/fake logit and the decoder's per-pixel ones (`specs/unet_d_128.yaml`,
`pipeline/blocks/unet.py`). Every function here takes those pairs (or, for the per-pixel terms,
the decoder's logits alone), returns a scalar, and leaves backward() to the loop. Half-precision
logits are promoted to float32 before any reduction; nothing syncs with the host, so all of it runs
on the `meta` device.

What the paper (sec. 3.1-3.2) and the authors' code (boschresearch/unetgan: `train_fns.py`,
`mixup.py`, `BigGAN.py` class `G_D`, `train.py`, `how_to_unetgan.pdf` sec. 3-4) do, and where
this module follows it:

- D's loss is the encoder's GAN loss plus the decoder's, the decoder's one averaged over pixels
  (paper sec. 3.1, L_D = L_Denc + L_Ddec). The code averages every pixel's BCE (`.view(-1)`,
  how_to sec. 3.1) and weights D_loss = 0.5 (real terms) + 0.5 (fake terms), i.e. 0.5 per head;
  G's loss is 0.5 L_Genc + 0.5 L_Gdec, the non-saturating loss (BCE with target 1) on both.
  `unet_d_loss` / `unet_g_loss` default to those 0.5 weights.
- CutMix (sec. 3.2): x̃ = mix(x, G(z), M) = M ⊙ x + (1 - M) ⊙ G(z), M = 1 where the pixel is
  real (`G_D.forward`: `target_map*x + (1-target_map)*G_z`). The decoder's per-pixel target is M;
  the encoder's target for x̃ is *fake* (paper sec. 3.2: "the class label c for the new CutMix
  image x̃ is set to be fake, i.e. c = 0", unlike CutMix's soft labels, or G learns to produce
  CutMix artifacts; code: `mix_bce` against `fake_target`; how_to sec. 3.2.1 calls soft targets
  the risky option). So there is no ratio-valued encoder target here. Both CutMix terms have
  weight 1 in the code (`mix_loss = D_loss_mixed_2d + mixed_middle_loss`).
- The box (`mixup.py:CutMix`, after CutMix-PyTorch's `rand_bbox`): lam ~ Beta(1, 1) = U(0, 1),
  a box of side int(sqrt(1 - lam) x image side) centred on a random pixel and clipped to the
  image is made fake, then the whole mask is inverted with probability 0.5.
  `cutmix_mask(placement="clipped")` draws exactly that distribution (the default);
  `placement="inside"` keeps the box inside the image so that its area follows the ratio.
- Consistency (sec. 3.2): || D_dec(mix(x, G(z), M)) - mix(D_dec(x), D_dec(G(z)), M) ||², on the
  decoder's *logits* (how_to sec. 4.1: no sigmoid), as a mean squared error over pixels
  (`F.mse_loss(D_mixed, mix)`), weight 1.0 in the code (`CONSISTENCY_WEIGHT`). The code does not
  detach the target side: D_dec(x) and D_dec(G(z)) come from the same forward pass and receive
  gradients too. It trains D only: G(z) is made without grad in D's step (`G_D.forward`, with
  `torch.set_grad_enabled(train_G)`) and G's step never sees CutMix images.
- How often (`train.py`, `--full_batch_mixup --slow_mixup`): one coin per training iteration
  (`train_fns.py`: `use_mixup_in_this_round`, drawn once before the D steps) decides whether the
  *whole batch* is mixed, with probability 0.5 · min(1, epoch / warmup_epochs) (paper: raised
  linearly from 0 to 0.5 over the first n epochs); the masks are drawn once per iteration too
  (`train.py`: `target_map`) and serve every D step and accumulation of it. On a mixed round the
  plain real/fake losses are skipped (`skip_normal_real_fake_loss`): D's loss is the CutMix terms
  plus the consistency term only. The scripts at HEAD (37adcf0) use warmup_epochs = 100 (FFHQ,
  `training_scripts/train_ffhq.sh`) and 200 (COCO-Animals, `train_cocoanimals.sh`); the CelebA
  script instead adds CutMix and consistency to every batch with no warm-up (`train_celeba.sh`,
  no `--full_batch_mixup`).
- One forward per D step (`BigGAN.py:G_D.forward`): on a mixed round D judges
  cat(G(z), x, mix(x, G(z), M)) in one call (one spectral-norm power iteration), and the fakes
  are generated with the real images' labels (`gy = dy`), so the mix and its parts share a class.

    mask, _ = cutmix_mask(batch, h, w, generator=gen)
    out = D(cat(real_img, gen_img, mix(real_img, gen_img, mask)), cat(y, y, y))   # gen_img = G(z, y)
    real_out, fake_out, mixed_out = split(out)
    d_loss = cutmix_d_loss(loss, mixed_out, mask) + CONSISTENCY_WEIGHT * consistency_loss(
        mixed_out, real_out, fake_out, mask)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.methods.losses import GanLoss, Hinge, LeastSquares, NonSaturating
from pipeline.precision import full_precision as _promote

# The authors' defaults (see the module docstring for where each comes from).
MAX_CUTMIX_PROBABILITY = 0.5
CONSISTENCY_WEIGHT = 1.0

UnetOutput = Sequence[Tensor]  # (enc_logits (B, 1), dec_logits (B, 1, H, W))
_Term = Callable[[Tensor], Tensor]


def split_unet_output(out: UnetOutput, name: str = "output") -> tuple[Tensor, Tensor]:
    """(enc_logits, dec_logits) of a U-Net discriminator's output, checked: a pair whose second
    member is (B, 1, H, W) and whose first has the same batch size. `name` goes into the message."""
    if isinstance(out, Tensor) or len(out) != 2:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"{len(out)} tensors"
        raise ValueError(f"{name}: a U-Net discriminator returns (enc_logits, dec_logits), got {got}")
    enc_logits, dec_logits = out
    if dec_logits.dim() != 4 or dec_logits.shape[1] != 1:
        raise ValueError(f"{name}: dec_logits must be (B, 1, H, W), got {tuple(dec_logits.shape)}")
    if enc_logits.shape[0] != dec_logits.shape[0]:
        raise ValueError(
            f"{name}: enc_logits has batch {enc_logits.shape[0]} but dec_logits has batch {dec_logits.shape[0]}"
        )
    return enc_logits, dec_logits


def _dec_logits(out: UnetOutput | Tensor, name: str) -> Tensor:
    """The decoder's logits from a discriminator output pair, or the logits themselves."""
    return out if isinstance(out, Tensor) else split_unet_output(out, name)[1]


# ----- the plain U-Net losses: both heads, any GanLoss -----
def unet_d_loss(
    loss: GanLoss,
    real_out: UnetOutput,
    fake_out: UnetOutput,
    *,
    encoder_weight: float = 0.5,
    decoder_weight: float = 0.5,
) -> Tensor:
    """D's loss on real and generated images: encoder_weight · loss.d(enc) + decoder_weight ·
    loss.d(dec), the decoder's term a mean over pixels (paper eq. L_D = L_Denc + L_Ddec; the 0.5
    weights are the authors' code, `train_fns.py` D_loss). Any of the project's losses works.
    A zero weight skips that head, so (1, 0) is the plain loss on the global logit."""
    real_enc, real_dec = split_unet_output(real_out, "real_out")
    fake_enc, fake_dec = split_unet_output(fake_out, "fake_out")
    total = real_enc.new_zeros((), dtype=torch.float32)
    if encoder_weight:
        total = total + encoder_weight * loss.d(real_enc, fake_enc)
    if decoder_weight:
        total = total + decoder_weight * loss.d(real_dec, fake_dec)
    return total


def unet_g_loss(
    loss: GanLoss, fake_out: UnetOutput, *, encoder_weight: float = 0.5, decoder_weight: float = 0.5
) -> Tensor:
    """G's loss: encoder_weight · loss.g(enc) + decoder_weight · loss.g(dec), the decoder's term a
    mean over pixels (authors' code: G_loss = 0.5 enc + 0.5 dec). G never sees CutMix images."""
    fake_enc, fake_dec = split_unet_output(fake_out, "fake_out")
    total = fake_enc.new_zeros((), dtype=torch.float32)
    if encoder_weight:
        total = total + encoder_weight * loss.g(fake_enc)
    if decoder_weight:
        total = total + decoder_weight * loss.g(fake_dec)
    return total


# ----- per-pixel targets -----
def _terms(loss: GanLoss) -> tuple[_Term, _Term]:
    """The loss's per-element real and fake terms for D, such that loss.d(real, fake) is
    mean(real_term(real)) + mean(fake_term(fake))."""
    if isinstance(loss, NonSaturating):
        if loss.flip_prob:
            raise ValueError(
                f"non_saturating with flip_prob={loss.flip_prob} cannot take per-pixel targets: label flipping "
                "swaps whole samples; use flip_prob=0 with CutMix"
            )
        smooth = loss.label_smoothing
        if smooth:
            # BCE against the smoothed target 1 - s: (1 - s) softplus(-l) + s softplus(l).
            return (lambda x: (1.0 - smooth) * F.softplus(-x) + smooth * F.softplus(x)), F.softplus
        return (lambda x: F.softplus(-x)), F.softplus
    if isinstance(loss, Hinge):
        return (lambda x: F.relu(1.0 - x)), (lambda x: F.relu(1.0 + x))
    if isinstance(loss, LeastSquares):
        return (lambda x: 0.5 * (x - 1.0).square()), (lambda x: 0.5 * x.square())
    raise ValueError(
        f"loss {loss.name!r} cannot take per-pixel real/fake targets (CutMix); use non_saturating (the paper's "
        "BCE), hinge or least_squares"
        + (": a Wasserstein critic scores, it has no targets" if loss.name == "wgan_gp" else "")
    )


def check_pixel_targets(loss: GanLoss) -> None:
    """Raise ValueError unless `loss` can take per-pixel targets, as CutMix needs: non_saturating
    (without label flipping), hinge and least_squares can; wgan_gp cannot. Call it when building
    the method, so the error comes before the first CutMix step, not after the warm-up."""
    _terms(loss)


def pixel_target_loss(loss: GanLoss, logits: Tensor, targets: Tensor) -> Tensor:
    """D's loss against per-element targets t in [0, 1] (1 real, 0 fake): the mean of
    t · real_term + (1 - t) · fake_term. For non_saturating this is BCE with logits against t
    (with label smoothing, against t (1 - s)); for hinge and least squares each element gets the
    real or the fake term. With t all ones (zeros) it is loss.d's real (fake) term."""
    real_term, fake_term = _terms(loss)
    logits = _promote(logits)
    targets = targets.to(logits.dtype)
    return (targets * real_term(logits) + (1.0 - targets) * fake_term(logits)).mean()


# ----- CutMix -----
BoxPlacement = Literal["clipped", "inside"]


def cutmix_mask(
    n: int,
    height: int,
    width: int,
    *,
    placement: BoxPlacement = "clipped",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """n CutMix masks (paper sec. 3.2): `mask` (n, 1, H, W), float32 in {0, 1} with 1 where the
    pixel comes from the real image, and `ratio` (n,), the real fraction each was drawn for
    (`mask.mean((1, 2, 3))` is the realised one).

    Each mask is one axis-aligned box and its complement. `placement` says how the box is drawn:

    - "clipped", the authors' `mixup.py:CutMix` (after CutMix-PyTorch's `rand_bbox`): lam ~
      Beta(1, 1) = U(0, 1); a box of sides int(sqrt(1 - lam) H) x int(sqrt(1 - lam) W) centred
      on a uniformly drawn pixel spans [c - side // 2, c + side // 2) along each axis, clipped to
      the image, and is made fake; then the whole mask is inverted with probability 1/2 (`rand >
      0.5`). The drawn real fraction is lam (1 - lam when inverted); clipped boxes near a border
      fall short of it, and an odd side loses a pixel to `side // 2`.
    - "inside": the same real fraction r ~ U(0, 1) and the same coin for which part the box is,
      but the box is round(sqrt(a) H) x round(sqrt(a) W), a = r or 1 - r, placed uniformly so
      that it lies wholly inside the image: the real area differs from r H W by at most
      (H + W) / 2 + 1/4 pixels.

    Four uniforms per sample are drawn from `generator` (on its device) when given, else from
    torch's global RNG on `device`, then moved to `device`; no host sync, so it runs on `meta`."""
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"cutmix_mask needs n >= 0 and a positive size, got n={n}, {height}x{width}")
    draw_device = generator.device if generator is not None else device
    draws = torch.rand(n, 4, generator=generator, device=draw_device, dtype=torch.float32)
    device = draws.device if device is None else torch.device(device)
    draws = draws.to(device)
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    if placement == "clipped":
        lam, u_row, u_col, coin = draws.unbind(dim=1)
        side = (1.0 - lam).sqrt()
        half_h, half_w = torch.floor(torch.floor(side * height) / 2), torch.floor(torch.floor(side * width) / 2)
        centre_row, centre_col = torch.floor(u_row * height), torch.floor(u_col * width)
        top, bottom = (centre_row - half_h).clamp(0, height), (centre_row + half_h).clamp(0, height)
        left, right = (centre_col - half_w).clamp(0, width), (centre_col + half_w).clamp(0, width)
        invert = coin > 0.5
        box_is_real, ratio = invert, torch.where(invert, 1.0 - lam, lam)
    elif placement == "inside":
        ratio, coin, u_top, u_left = draws.unbind(dim=1)
        box_is_real = coin < 0.5
        box_area = torch.where(box_is_real, ratio, 1.0 - ratio)
        side = box_area.sqrt()
        box_h = torch.round(side * height).clamp(0, height)
        box_w = torch.round(side * width).clamp(0, width)
        # Top-left corner uniform over the height - box_h + 1 (width - box_w + 1) positions.
        top = torch.minimum(torch.floor(u_top * (height - box_h + 1)), height - box_h)
        left = torch.minimum(torch.floor(u_left * (width - box_w + 1)), width - box_w)
        bottom, right = top + box_h, left + box_w
    else:
        raise ValueError(f"placement must be 'clipped' or 'inside', got {placement!r}")
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (n, H)
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])  # (n, W)
    in_box = in_rows[:, :, None] & in_cols[:, None, :]  # (n, H, W)
    real = torch.where(box_is_real[:, None, None], in_box, ~in_box)
    return real.to(torch.float32)[:, None], ratio


def mix(real: Tensor, fake: Tensor, mask: Tensor) -> Tensor:
    """mix(x, G(z), M) = M ⊙ x + (1 - M) ⊙ G(z): `real` where the mask is 1, `fake` where it is 0
    (paper sec. 3.2). The mask broadcasts, e.g. (B, 1, H, W) over channels; it is cast to the
    images' dtype, so bf16 images stay bf16, and a binary mask copies each pixel exactly. Used
    for both the images and, in `consistency_loss`, the decoder's logits."""
    dtype = torch.result_type(real, fake)
    mask = mask.to(dtype)
    return mask * real + (1 - mask) * fake


def cutmix_probability(images_seen: int, *, warmup_images: int, maximum: float = MAX_CUTMIX_PROBABILITY) -> float:
    """The probability of a CutMix step: maximum · min(1, images_seen / warmup_images), a linear
    warm-up from 0 to `maximum` (paper: to 0.5 over the first n epochs; code: 0.5 · min(1,
    epoch / warmup_epochs), per whole batch). Counted in images, as the project counts progress:
    warmup_images = n · dataset size (the scripts' n: 20 for FFHQ, 200 for COCO-Animals).
    warmup_images = 0 means no warm-up."""
    if images_seen < 0 or warmup_images < 0:
        raise ValueError(f"images_seen and warmup_images must be >= 0, got {images_seen}, {warmup_images}")
    if not 0.0 <= maximum <= 1.0:
        raise ValueError(f"maximum must be a probability in [0, 1], got {maximum}")
    if warmup_images == 0:
        return float(maximum)
    return float(maximum) * min(1.0, images_seen / warmup_images)


def cutmix_this_step(probability: float, *, generator: torch.Generator | None = None) -> bool:
    """The per-step coin: True with `probability` (the authors mix the whole batch, not single
    samples). One draw every call, whatever the probability, so the RNG stream does not depend on
    the warm-up. The draw comes from `generator` (give every rank the same seed, so all ranks take
    the same branch), else from torch's global CPU RNG."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    device = generator.device if generator is not None else "cpu"
    return bool(torch.rand((), generator=generator, device=device) < probability)


def cutmix_d_loss(
    loss: GanLoss,
    mixed_out: UnetOutput,
    mask: Tensor,
    *,
    encoder_weight: float = 1.0,
    decoder_weight: float = 1.0,
) -> Tensor:
    """D's loss on CutMix images (paper sec. 3.2): the decoder's per-pixel loss against the mask
    M (`pixel_target_loss`) plus the encoder's loss against the fake target, both weight 1 as in
    the authors' `train_fns.py` (mix_loss). `loss` must take per-pixel targets
    (`check_pixel_targets`), else ValueError. Trains D only: mix detached fakes."""
    mixed_enc, mixed_dec = split_unet_output(mixed_out, "mixed_out")
    if mask.shape[-2:] != mixed_dec.shape[-2:] or mask.shape[0] != mixed_dec.shape[0]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match dec_logits {tuple(mixed_dec.shape)}")
    _, fake_term = _terms(loss)
    total = mixed_enc.new_zeros((), dtype=torch.float32)
    if encoder_weight:
        total = total + encoder_weight * fake_term(_promote(mixed_enc)).mean()
    if decoder_weight:
        total = total + decoder_weight * pixel_target_loss(loss, mixed_dec, mask.expand_as(mixed_dec))
    return total


def consistency_loss(
    mixed_out: UnetOutput | Tensor, real_out: UnetOutput | Tensor, fake_out: UnetOutput | Tensor, mask: Tensor
) -> Tensor:
    """The CutMix consistency regulariser (paper sec. 3.2):
    mean over pixels of (D_dec(mix(x, G(z), M)) - mix(D_dec(x), D_dec(G(z)), M))², on the
    decoder's logits. Each argument is a discriminator output pair or its dec_logits. Zero for a
    decoder that acts on each pixel alone; it penalises what the decoder draws from a pixel's
    neighbours across the box edge. Gradients reach both sides, as in the authors' code; pass
    detached real/fake logits to use the right side as a fixed target. The caller multiplies by
    the weight (`CONSISTENCY_WEIGHT`, 1.0)."""
    mixed_dec = _promote(_dec_logits(mixed_out, "mixed_out"))
    real_dec = _promote(_dec_logits(real_out, "real_out"))
    fake_dec = _promote(_dec_logits(fake_out, "fake_out"))
    if not (mixed_dec.shape == real_dec.shape == fake_dec.shape):
        raise ValueError(
            f"decoder logits differ in shape: mixed {tuple(mixed_dec.shape)}, real {tuple(real_dec.shape)}, "
            f"fake {tuple(fake_dec.shape)}"
        )
    return (mixed_dec - mix(real_dec, fake_dec, mask)).square().mean()
