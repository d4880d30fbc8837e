"""U-Net GAN's losses, CutMix masks and the consistency regulariser (pipeline/methods/unet_gan.py)
against their formulas, on tiny hand-made tensors (CPU and meta, fast)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.losses import get_loss
from pipeline.methods.unet_gan import (
    check_pixel_targets,
    consistency_loss,
    cutmix_d_loss,
    cutmix_mask,
    cutmix_probability,
    cutmix_this_step,
    mix,
    pixel_target_loss,
    split_unet_output,
    unet_d_loss,
    unet_g_loss,
)

PIXEL_LOSSES = [
    get_loss("non_saturating"),
    get_loss("non_saturating", label_smoothing=0.1),
    get_loss("hinge"),
    get_loss("least_squares"),
]


def close(a, b, tol=1e-6):
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)


def d_out(batch=2, size=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 1, generator=gen).to(dtype),
        torch.randn(batch, 1, size, size, generator=gen).to(dtype),
    )


# ----- the plain losses on both heads -----
@pytest.mark.parametrize("name", ["hinge", "non_saturating", "least_squares", "wgan_gp"])
def test_losses_reduce_to_the_plain_loss_without_the_decoder(name):
    loss = get_loss(name)
    real, fake = d_out(seed=1), d_out(seed=2)
    nan_dec = (fake[0], torch.full_like(fake[1], float("nan")))  # a skipped head is never read
    assert close(unet_d_loss(loss, real, nan_dec, encoder_weight=1, decoder_weight=0), loss.d(real[0], fake[0]))
    assert close(unet_g_loss(loss, nan_dec, encoder_weight=1, decoder_weight=0), loss.g(fake[0]))
    both = 0.5 * loss.d(real[0], fake[0]) + 0.5 * loss.d(real[1], fake[1])
    assert close(unet_d_loss(loss, real, fake), both)
    assert close(unet_g_loss(loss, fake), 0.5 * loss.g(fake[0]) + 0.5 * loss.g(fake[1]))


def test_hinge_by_hand():
    real = (torch.tensor([[2.0]]), torch.tensor([[[[0.5, -1.0]]]]))
    fake = (torch.tensor([[-0.5]]), torch.tensor([[[[0.0, -3.0]]]]))
    # enc: relu(1 - 2) + relu(1 - 0.5) = 0.5; dec: mean(0.5, 2) + mean(1, 0) = 1.75
    assert close(unet_d_loss(get_loss("hinge"), real, fake), 0.5 * 0.5 + 0.5 * 1.75)
    # G: -(-0.5) = 0.5 and -mean(0, -3) = 1.5
    assert close(unet_g_loss(get_loss("hinge"), fake), 0.5 * 0.5 + 0.5 * 1.5)


def test_output_pairs_are_checked():
    enc, dec = d_out()
    with pytest.raises(ValueError, match=r"real_out: a U-Net discriminator returns \(enc_logits, dec_logits\)"):
        unet_d_loss(get_loss("hinge"), enc, (enc, dec))
    with pytest.raises(ValueError, match=r"dec_logits must be \(B, 1, H, W\)"):
        split_unet_output((enc, dec[:, 0]))
    with pytest.raises(ValueError, match="enc_logits has batch 1 but dec_logits has batch 2"):
        split_unet_output((enc[:1], dec))


# ----- per-pixel targets -----
@pytest.mark.parametrize("loss", PIXEL_LOSSES, ids=lambda loss: f"{loss.name}")
def test_pixel_targets_split_loss_d_into_its_real_and_fake_terms(loss):
    real, fake = torch.tensor([2.0, -0.5, 0.3]), torch.tensor([-1.0, 0.7, 4.0])
    split = pixel_target_loss(loss, real, torch.ones(3)) + pixel_target_loss(loss, fake, torch.zeros(3))
    assert close(split, loss.d(real, fake))
    # A mixed target gives each element its own term.
    logits, mask = torch.cat([real, fake]), torch.tensor([1.0, 1, 1, 0, 0, 0])
    assert close(pixel_target_loss(loss, logits, mask), split / 2)


def test_non_saturating_pixel_targets_are_bce():
    logits, mask = torch.tensor([1.5, -0.2, 0.0, 3.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    plain = get_loss("non_saturating")
    assert close(pixel_target_loss(plain, logits, mask), F.binary_cross_entropy_with_logits(logits, mask))
    smooth = get_loss("non_saturating", label_smoothing=0.2)
    assert close(pixel_target_loss(smooth, logits, mask), F.binary_cross_entropy_with_logits(logits, 0.8 * mask))


def test_losses_without_pixel_targets_are_rejected():
    with pytest.raises(ValueError, match="loss 'wgan_gp' cannot take per-pixel real/fake targets"):
        check_pixel_targets(get_loss("wgan_gp"))
    with pytest.raises(ValueError, match="flip_prob=0.1 cannot take per-pixel targets"):
        cutmix_d_loss(get_loss("non_saturating", flip_prob=0.1), d_out(), torch.ones(2, 1, 4, 4))
    for loss in PIXEL_LOSSES:
        check_pixel_targets(loss)


def test_cutmix_d_loss_by_hand():
    mixed = (torch.tensor([[0.5]]), torch.tensor([[[[0.5, -2.0]]]]))
    mask = torch.tensor([[[[1.0, 0.0]]]])
    # hinge: decoder mean(relu(1 - 0.5), relu(1 - 2)) = 0.25; encoder fake target relu(1 + 0.5) = 1.5
    assert close(cutmix_d_loss(get_loss("hinge"), mixed, mask), 1.75)
    assert close(cutmix_d_loss(get_loss("hinge"), mixed, mask, encoder_weight=0), 0.25)
    # non-saturating at logit 0: log 2 per pixel, whatever the target, and log 2 for the encoder
    zeros = (torch.zeros(1, 1), torch.zeros(1, 1, 1, 2))
    assert close(cutmix_d_loss(get_loss("non_saturating"), zeros, mask), 2 * math.log(2))


# ----- the mask, mix and the warm-up -----
def test_inside_mask_area_follows_the_ratio_and_the_box_is_one_rectangle():
    n, height, width = 256, 13, 20
    mask, ratio = cutmix_mask(n, height, width, placement="inside", generator=torch.Generator().manual_seed(0))
    assert mask.shape == (n, 1, height, width) and ratio.shape == (n,) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    real_area = mask.sum(dim=(1, 2, 3))
    assert ((real_area - ratio * height * width).abs() <= (height + width) / 2 + 0.25).all()
    assert 0.4 < ratio.mean() < 0.6 and ratio.min() < 0.1 and ratio.max() > 0.9  # U(0, 1)
    boxes_real = 0
    for m in mask[:, 0].bool():
        # Either the real or the fake part is one axis-aligned box: its bounding box is full.
        for part in (m, ~m):
            rows, cols = part.any(dim=1).nonzero(), part.any(dim=0).nonzero()
            if part.any() and part[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all():
                break
        else:
            pytest.fail("neither part of the mask is a rectangle")
        boxes_real += part is m
    assert 64 < boxes_real < 192  # the box is the real part about half the time


def test_mask_randomness_is_reproducible():
    def masks(seed):
        return cutmix_mask(8, 16, 16, generator=torch.Generator().manual_seed(seed))

    assert all(torch.equal(a, b) for a, b in zip(masks(3), masks(3), strict=True))
    assert not torch.equal(masks(3)[0], masks(4)[0])
    torch.manual_seed(5)
    first = cutmix_mask(8, 16, 16)
    torch.manual_seed(5)
    assert torch.equal(first[0], cutmix_mask(8, 16, 16)[0])


def test_mix_takes_real_where_the_mask_is_one():
    real, fake = torch.full((2, 3, 4, 4), 1.0), torch.full((2, 3, 4, 4), -1.0)
    mask, _ = cutmix_mask(2, 4, 4, generator=torch.Generator().manual_seed(1))
    mixed = mix(real, fake, mask)
    assert torch.equal(mixed, torch.where(mask.bool().expand_as(real), real, fake))
    bf16 = mix(real.bfloat16(), fake.bfloat16(), mask)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), mixed)


def test_warmup_is_linear_up_to_the_maximum():
    assert cutmix_probability(0, warmup_images=1000) == 0.0
    assert close(cutmix_probability(250, warmup_images=1000), 0.125)
    assert close(cutmix_probability(500, warmup_images=1000), 0.25)
    assert cutmix_probability(1000, warmup_images=1000) == 0.5
    assert cutmix_probability(10**9, warmup_images=1000) == 0.5
    assert cutmix_probability(10, warmup_images=0) == 0.5  # no warm-up
    assert cutmix_probability(500, warmup_images=1000, maximum=1.0) == 0.5
    with pytest.raises(ValueError, match="maximum must be a probability"):
        cutmix_probability(0, warmup_images=10, maximum=1.5)


def test_the_step_coin_follows_the_probability():
    gen = torch.Generator().manual_seed(0)
    heads = sum(cutmix_this_step(0.25, generator=gen) for _ in range(2000))
    assert 400 < heads < 600
    assert not any(cutmix_this_step(0.0, generator=gen) for _ in range(100))
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [cutmix_this_step(0.5, generator=a) for _ in range(20)] == [
        cutmix_this_step(0.5, generator=b) for _ in range(20)
    ]


# ----- the consistency regulariser -----
def consistency_of(decoder, seed=0):
    gen = torch.Generator().manual_seed(seed)
    real, fake = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    mask, _ = cutmix_mask(4, 8, 8, generator=gen)
    with torch.no_grad():
        return consistency_loss(decoder(mix(real, fake, mask)), decoder(real), decoder(fake), mask)


def test_consistency_is_zero_for_a_per_pixel_decoder():
    torch.manual_seed(0)
    assert consistency_of(nn.Conv2d(3, 1, 1)) == 0.0


def test_consistency_is_positive_for_a_decoder_with_spatial_context():
    torch.manual_seed(0)
    assert consistency_of(nn.Conv2d(3, 1, 3, padding=1)) > 1e-3


def test_consistency_by_hand_and_on_output_pairs():
    mask = torch.tensor([[[[1.0, 0.0]]]])
    real, fake, mixed = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[3.0, 4.0]]]]), torch.tensor([[[[0.0, 0.0]]]])
    # target mix(real, fake) = (1, 4): mean(1², 4²) = 8.5
    assert close(consistency_loss(mixed, real, fake, mask), 8.5)
    enc = torch.zeros(1, 1)
    assert close(consistency_loss((enc, mixed), (enc, real), (enc, fake), mask), 8.5)
    with pytest.raises(ValueError, match="decoder logits differ in shape"):
        consistency_loss(mixed, real, fake[..., :1], mask)


def test_consistency_gradients_reach_both_sides_unless_detached():
    mask = torch.tensor([[[[1.0, 0.0]]]])
    mixed, real, fake = (torch.randn(1, 1, 1, 2, requires_grad=True) for _ in range(3))
    consistency_loss(mixed, real, fake, mask).backward()
    assert mixed.grad.abs().sum() > 0
    assert real.grad[..., 0] != 0 and real.grad[..., 1] == 0  # each side only where the mask takes it
    assert fake.grad[..., 0] == 0 and fake.grad[..., 1] != 0
    real.grad = None
    consistency_loss(mixed, real.detach(), fake.detach(), mask).backward()
    assert real.grad is None


# ----- meta device and bf16 -----
def test_everything_runs_on_meta():
    device = torch.device("meta")
    mask, ratio = cutmix_mask(2, 8, 8, device=device)
    assert mask.device == device and mask.shape == (2, 1, 8, 8) and ratio.device == device
    mask, _ = cutmix_mask(2, 8, 8, device=device, generator=torch.Generator().manual_seed(0))
    assert mask.device == device
    out = (torch.empty(2, 1, device=device), torch.empty(2, 1, 8, 8, device=device))
    images = torch.empty(2, 3, 8, 8, device=device)
    assert mix(images, images, mask).shape == images.shape
    loss = get_loss("non_saturating")
    for value in (
        unet_d_loss(loss, out, out),
        unet_g_loss(loss, out),
        cutmix_d_loss(loss, out, mask),
        consistency_loss(out, out, out, mask),
    ):
        assert value.device == device and value.shape == ()


@pytest.mark.parametrize("loss", PIXEL_LOSSES[::2], ids=lambda loss: loss.name)
def test_bf16_logits_reduce_in_float32(loss):
    real, fake, mixed = d_out(seed=1), d_out(seed=2), d_out(seed=3)
    mask, _ = cutmix_mask(2, 4, 4, generator=torch.Generator().manual_seed(0))

    def all_losses(real, fake, mixed):
        return [
            unet_d_loss(loss, real, fake),
            unet_g_loss(loss, fake),
            cutmix_d_loss(loss, mixed, mask),
            consistency_loss(mixed, real, fake, mask),
        ]

    def bf16(out):
        return tuple(t.bfloat16() for t in out)

    reference = all_losses(*(tuple(t.bfloat16().float() for t in out) for out in (real, fake, mixed)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = all_losses(bf16(real), bf16(fake), bf16(mixed))
    for got, want in zip(results, reference, strict=True):
        assert got.dtype == torch.float32
        assert close(got, want, tol=1e-5)
