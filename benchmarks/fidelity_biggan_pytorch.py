"""Check `import-weights biggan-pytorch` against the authors' code (github.com/ajbrock/BigGAN-PyTorch,
commit 9845943) in float64: their G and D (BigGAN.py, or BigGANdeep.py with --deep) built at a small
width, every tensor of their state dicts randomised (weights, biases, spectral norm's u0, BatchNorm
statistics, attention's gamma), converted by `pipeline.weights.biggan_pytorch` into the matching
spec (biggan_128 / biggan_deep_128 with the width overridden) and compared:

- eval mode (sampling, evaluation): G's images for the same z and y, D's logits for the same
  images and y;
- train mode: our first training forward against their second (ours holds the u their first
  training forward stores; see the module's docstring), batch statistics in G's BatchNorms.

Nothing of the reference is copied: the checkout given on the command line is imported. With
--fixture PATH it also writes their key names and shapes at this configuration as JSON (the test
tests/weights/test_biggan_pytorch.py converts random tensors of exactly those).

Usage: python benchmarks/fidelity_biggan_pytorch.py --checkout DIR [--deep] [--ch 8] [--fixture PATH]
(results in docs/fidelity.md)
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from pipeline.graph import build_network
from pipeline.spec import load_spec
from pipeline.weights.biggan_pytorch import convert

NUM_CLASSES, SIDE, BATCH, SHARED = 5, 128, 4, 16


def overrides(deep: bool, ch: int) -> list[str]:
    """The spec at width `ch` (theirs: G_ch = D_ch = ch), NUM_CLASSES classes, a shared embedding of SHARED."""
    out = [f"data.num_classes={NUM_CLASSES}", f"generator.nodes.shared.embedding_dim={SHARED}"]
    out += [f"generator.nodes.fc.out_features={16 * ch * 16}", f"generator.nodes.h.shape=[{16 * ch},4,4]"]
    if deep:
        ups = {"up_to_attn": [16, 16, 16, 8, 8, 4, 4, 2], "up_from_attn": [2, 1]}
        downs = {"down_to_attn": [2, 2], "down_from_attn": [4, 4, 8, 8, 16, 16, 16, 16]}
        out += [f"generator.nodes.{n}.each.out_channels=[{','.join(str(m * ch) for m in ms)}]" for n, ms in ups.items()]
        out.append(f"discriminator.nodes.stem.out_channels={ch}")
        out += [
            f"discriminator.nodes.{n}.each.out_channels=[{','.join(str(m * ch) for m in ms)}]"
            for n, ms in downs.items()
        ]
    else:
        for name, m in zip(("up_8", "up_16", "up_32", "up_64", "up_128"), (16, 8, 4, 2, 1), strict=True):
            out.append(f"generator.nodes.{name}.out_channels={m * ch}")
        downs = ("down_64", "down_32", "down_16", "down_8", "down_4", "final")
        for name, m in zip(downs, (1, 2, 4, 8, 16, 16), strict=True):
            out.append(f"discriminator.nodes.{name}.out_channels={m * ch}")
    return out


def theirs(checkout: str, deep: bool, ch: int):
    sys.path.insert(0, checkout)
    import BigGAN  # noqa: PLC0415 (the reference, from the checkout)
    import BigGANdeep  # noqa: PLC0415

    model = BigGANdeep if deep else BigGAN
    common = {"resolution": SIDE, "n_classes": NUM_CLASSES, "SN_eps": 1e-6}
    # the launch scripts' settings: shared embedding, hierarchical z (120 in 6 chunks; deep: concatenated 128)
    G = model.Generator(
        G_ch=ch, dim_z=128 if deep else 120, G_attn="64", shared_dim=SHARED, hier=True, G_shared=True,
        BN_eps=1e-5, no_optim=True, **common,
    )  # fmt: skip
    D = model.Discriminator(D_ch=ch, D_attn="64", **common)
    return G, D


@torch.no_grad()
def randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every floating tensor of the state to random values of a plausible range: nothing left at an
    initial value that would hide a mapping (gamma 0, biases 0, statistics 0 and 1, and orthogonal
    weights, whose singular values are all 1: spectral norm's sigma would be 1 for any u)."""
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith("stored_var"):
            t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
        elif name.endswith("gamma") or name.endswith("bias") or name.endswith("stored_mean"):
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.3)
        elif name.endswith("u0"):
            t.copy_(torch.nn.functional.normalize(torch.randn(t.shape, generator=gen, dtype=t.dtype), dim=1))
        elif name.endswith(".weight") or name.endswith("gain"):
            fan_in = t[0].numel() if t.dim() > 1 else 1
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) / fan_in**0.5 + (t.dim() == 1))


def _one_line(m: re.Match) -> str:
    shape = ", ".join(part.strip() for part in m.group(2).split(",") if part.strip())
    return f"[{m.group(1)}, [{shape}]]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True, help="a checkout of ajbrock/BigGAN-PyTorch")
    parser.add_argument("--deep", action="store_true", help="BigGAN-deep (BigGANdeep.py, biggan_deep_128)")
    parser.add_argument("--ch", type=int, default=8, help="G_ch = D_ch (the released 96 or 128 take minutes)")
    parser.add_argument("--fixture", help="write their key names and shapes here (JSON)")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    G_t, D_t = theirs(args.checkout, args.deep, args.ch)
    gen = torch.Generator().manual_seed(1)
    randomise(G_t, gen)
    randomise(D_t, gen)
    spec_name = "biggan_deep_128" if args.deep else "biggan_128"
    torch.set_default_dtype(torch.float32)  # the spec's checks and our networks are built in float32
    loaded = load_spec(spec_name, overrides(args.deep, args.ch))
    converted = convert({"G": G_t.state_dict(), "D": D_t.state_dict()}, loaded, dtype=torch.float64)
    G_o = build_network(loaded, "generator", compile=False).double()
    D_o = build_network(loaded, "discriminator", compile=False).double()
    torch.set_default_dtype(torch.float64)
    G_o.load_state_dict(converted["G"], strict=True)
    D_o.load_state_dict(converted["D"], strict=True)

    z_dim = loaded.spec.latent.z_dim
    z = torch.randn(BATCH, z_dim, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    x = torch.rand(BATCH, 3, SIDE, SIDE, generator=gen) * 2 - 1
    with torch.no_grad():
        for net in (G_t, D_t, G_o, D_o):
            net.eval()
        images, logits = G_t(z, G_t.shared(y)), D_t(x, y)
        g_eval = (images - G_o(z, y)).abs().max().item()
        d_eval = (logits - D_o(x, y)).abs().max().item()
        for net in (G_t, D_t, G_o, D_o):
            net.train()
        G_t(z, G_t.shared(y)), D_t(x, y)  # their first training forward stores u1: ours starts there
        g_train = (G_t(z, G_t.shared(y)) - G_o(z, y)).abs().max().item()
        d_train = (D_t(x, y) - D_o(x, y)).abs().max().item()
    print(f"{spec_name} at ch {args.ch}, {NUM_CLASSES} classes, float64, largest differences:")
    print(f"  (their eval outputs: images of std {images.std():.3g}, logits of std {logits.std():.3g})")
    print(f"  eval:  G images {g_eval:.3g}, D logits {d_eval:.3g}")
    print(f"  train: G images {g_train:.3g}, D logits {d_train:.3g}")
    if args.fixture:
        shapes = {
            role: [[k, list(v.shape)] for k, v in net.state_dict().items()] for role, net in (("G", G_t), ("D", D_t))
        }
        fixture = {
            "reference": "ajbrock/BigGAN-PyTorch 98459431a5d618d644d54cd1e9fceb1e5045648d, "
            + ("BigGANdeep.py" if args.deep else "BigGAN.py"),
            "written_by": "benchmarks/fidelity_biggan_pytorch.py" + (" --deep" if args.deep else ""),
            "config": {"G_ch": args.ch, "D_ch": args.ch, "resolution": SIDE, "n_classes": NUM_CLASSES},
            "spec": spec_name,
            "overrides": overrides(args.deep, args.ch),
            **shapes,
        }
        # one key per line: a diff of two versions reads as a diff of the key lists
        text = json.dumps(fixture, indent=1)
        text = re.sub(r"\[\n\s*(\"[^\"]*\"),\n\s*\[([^\]]*)\]\n\s*\]", _one_line, text)
        with open(args.fixture, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
