"""Compare this project's U-Net GAN with the authors' code (github.com/boschresearch/unetgan) in
float64, weights mapped layer by layer: the U-Net D's two outputs, a whole CutMix D step (loss and
every weight gradient), a plain D step and the G step's loss. Nothing of the reference is copied
here: the checkout given on the command line is imported (its `BigGAN.Unet_Discriminator`), and
the step's loss composition is written from `train_fns.py:GAN_training_function` with
`--full_batch_mixup --consistency_loss_and_augmentation` (the FFHQ and COCO-Animals scripts):
on a mixed round D_loss = mean(per-sample BCE(D_mixed, target_map) + BCE(D_middle_mixed, 0)) +
mse(D_mixed, D_real M + D_fake (1 - M)); otherwise 0.5 (real terms) + 0.5 (fake terms); G_loss =
0.5 BCE(middle, 1) + 0.5 BCE(2d, 1). D runs once on cat(fake, real[, mixed]) (`G_D.forward`),
the fakes of a mixed round made with the real labels. The generator is a fixed stand-in (the
same function of z and y on both sides): the comparison is of D and the step.

Usage: python benchmarks/fidelity_unetgan.py --checkout DIR [--ch 16]  (results in docs/fidelity.md)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types

import torch
import torch.nn.functional as F

from pipeline.graph import build_network
from pipeline.spec import load_spec

NUM_CLASSES, SIDE, BATCH = 10, 128, 4
ENCODER = ("enc_64", "enc_32", "enc_16", "enc_8", "enc_4")
DECODER = ("dec_8", "dec_16", "dec_32", "dec_64", "dec_128")


def ours_and_theirs(checkout: str, ch: int):
    sys.path.insert(0, checkout)
    sys.modules.setdefault("utils", types.ModuleType("utils"))  # data and logging helpers, unused here
    import BigGAN  # noqa: PLC0415 (the reference, from the checkout)

    theirs = BigGAN.Unet_Discriminator(
        D_ch=ch, resolution=SIDE, D_attn="0", n_classes=NUM_CLASSES, unconditional=False, SN_eps=1e-6
    ).double()
    overrides = [f"data.num_classes={NUM_CLASSES}", "data.synthetic=true", "method.loss=non_saturating"]
    overrides += ["method.cutmix={warmup_images: 0, max_probability: 1.0}"]
    overrides += [
        f"discriminator.nodes.{n}.out_channels={m * ch}" for n, m in zip(ENCODER, (1, 2, 4, 8, 16), strict=True)
    ]
    overrides += [
        f"discriminator.nodes.{n}.out_channels={m * ch}" for n, m in zip(DECODER, (8, 4, 2, 1, 1), strict=True)
    ]
    loaded = load_spec("unet_gan_128", overrides, check_graphs=False)
    ours = build_network(loaded, "discriminator", "cpu").double()

    pairs = {
        f"{n}.{c}": f"blocks.{i}.0.{c}" for i, n in enumerate(ENCODER + DECODER) for c in ("conv1", "conv2", "conv_sc")
    }
    pairs |= {"head.linear": "linear_middle", "head.embed": "embed_middle", "pixel.embed": "embed"}
    state = theirs.state_dict()
    with torch.no_grad():
        for mine, their in pairs.items():
            module = ours.get_submodule(mine)
            module.parametrizations.weight.original.copy_(state[f"{their}.weight"])
            module.parametrizations.weight[0]._u.copy_(state[f"{their}.u0"][0])  # the power iteration's u
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(state[f"{their}.bias"])
        ours.pixel.conv.weight.copy_(state["blocks.10.weight"])  # last_layer: a plain conv
        ours.pixel.conv.bias.copy_(state["blocks.10.bias"])
    pairs["pixel.conv"] = "blocks.10"
    return loaded, ours, theirs, pairs


def largest_gradient_difference(ours, theirs, pairs) -> float:
    worst = 0.0
    for mine, their in pairs.items():
        module = ours.get_submodule(mine)
        weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        reference = theirs.get_parameter(f"{their}.weight").grad
        worst = max(worst, ((weight.grad - reference).abs().max() / reference.abs().max()).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True, help="a checkout of boschresearch/unetgan")
    parser.add_argument("--ch", type=int, default=16, help="D width (the authors' 64 takes minutes on a CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded, ours, theirs, pairs = ours_and_theirs(args.checkout, args.ch)
    torch.set_default_dtype(torch.float64)
    bce = F.binary_cross_entropy_with_logits

    x, y = torch.randn(BATCH, 3, SIDE, SIDE), torch.randint(0, NUM_CLASSES, (BATCH,))
    their_dec, their_enc = theirs(x, y)
    our_enc, our_dec = ours(x, y)
    enc, dec = (their_enc - our_enc).abs().max(), (their_dec - our_dec).abs().max()
    print(f"forward: encoder logit {enc:.3g}, per-pixel {dec:.3g}")

    real, y_real = torch.randn(BATCH, 3, SIDE, SIDE).clamp(-1, 1), torch.randint(0, NUM_CLASSES, (BATCH,))
    z, y_drawn = torch.randn(BATCH, 8), torch.randint(0, NUM_CLASSES, (BATCH,))
    weights = torch.randn(8 + NUM_CLASSES, 3 * SIDE * SIDE) * 0.05

    def G(z, y):  # the same stand-in generator on both sides
        return torch.tanh(torch.cat([z, F.one_hot(y, NUM_CLASSES).double()], 1) @ weights).view(-1, 3, SIDE, SIDE)

    run = loaded.spec.method.build(loaded.spec)
    step = types.SimpleNamespace(
        nets={"generator": G, "discriminator": ours},
        micro=BATCH,
        step=0,
        images_seen=10**9,
        counting_flops=False,
        next=lambda stream: (real, y_real),
        latents=lambda n: (z, y_drawn),
        mixed=contextlib.nullcontext,
    )

    # a CutMix round
    mask = run._cutmix_round(step, real)
    losses, _ = run.d_objective(step)
    ours.zero_grad()
    losses["D"].backward()
    fake = G(z, y_real)  # G_D.forward: gy = dy on a mixed round
    mixed = mask * real + (1 - mask) * fake
    out, middle = theirs(torch.cat([fake, real, mixed]), torch.cat([y_real, y_real, y_real]))
    d_fake, d_real, d_mixed = out.split(BATCH)
    middle_mixed = middle.split(BATCH)[2]
    per_sample = torch.stack([bce(d_mixed[i].view(-1), mask[i].view(-1)) for i in range(BATCH)])
    encoder = bce(middle_mixed, torch.zeros_like(middle_mixed), reduction="none")
    reference = (per_sample + encoder).mean() + F.mse_loss(d_mixed, d_real * mask + d_fake * (1 - mask))
    theirs.zero_grad()
    reference.backward()
    print(
        f"CutMix D step: loss {losses['D'].item():.15g} against {reference.item():.15g} "
        f"(difference {abs(losses['D'].item() - reference.item()):.3g}); largest relative weight-gradient "
        f"difference {largest_gradient_difference(ours, theirs, pairs):.3g}"
    )

    # a plain round, and the G step
    run.cutmix_step, run.cutmix_mask = 0, None
    losses, _ = run.d_objective(step)
    out, middle = theirs(torch.cat([G(z, y_drawn), real]), torch.cat([y_drawn, y_real]))
    (d_fake, d_real), (m_fake, m_real) = out.split(BATCH), middle.split(BATCH)
    reference = 0.5 * (bce(d_real.view(-1), torch.ones(d_real.numel())) + bce(m_real, torch.ones_like(m_real)))
    reference = reference + 0.5 * (
        bce(d_fake.view(-1), torch.zeros(d_fake.numel())) + bce(m_fake, torch.zeros_like(m_fake))
    )
    print(f"plain D step: loss difference {abs(losses['D'].item() - reference.item()):.3g}")
    losses, _ = run.g_objective(step)
    out, middle = theirs(G(z, y_drawn), y_drawn)
    reference = 0.5 * bce(middle, torch.ones_like(middle)) + 0.5 * bce(out, torch.ones_like(out))
    print(f"G step: loss difference {abs(losses['G'].item() - reference.item()):.3g}")


if __name__ == "__main__":
    main()
