"""Compare this project's R3GAN with the authors' code (github.com/brownvc/R3GAN) in float64, weights
mapped layer by layer: G's images, D's logits and D's gradient at its input, then a whole D step
(the relativistic pairing loss with R1 and R2: the loss and every D weight gradient) and the G
step's loss and G weight gradients. Nothing of the reference is copied here: the checkout given on
the command line is imported (`R3GAN.Networks`, `R3GAN.Trainer.AdversarialTraining`), with its
reference CPU operators (`BiasedActivationReference`, `InterpolativeUpsampler/DownsamplerReference`)
in place of the CUDA ones. The networks are r3gan_demo's (or r3gan_cifar10's at a given width); the
zero-initialised last conv of each residual block and the activation biases get random values,
so that the comparison covers them.

Usage: python benchmarks/fidelity_r3gan.py --checkout DIR  (results in docs/fidelity.md)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types

import torch
import torch.nn.functional as F

from pipeline.graph import build_network
from pipeline.methods.gan import GanMethod
from pipeline.spec import load_spec

NUM_CLASSES, BATCH, GAMMA = 10, 6, 0.05


def reference(checkout: str):
    sys.path.insert(0, checkout)
    if "pkg_resources" not in sys.modules:  # torch_utils imports parse_version from it
        from packaging.version import parse

        sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)  # type: ignore[assignment]
    import R3GAN.FusedOperators as fused  # noqa: PLC0415 (the reference, from the checkout)
    import R3GAN.Resamplers as resamplers  # noqa: PLC0415

    fused.BiasedActivation = fused.BiasedActivationReference  # type: ignore[misc]
    resamplers.InterpolativeUpsampler = resamplers.InterpolativeUpsamplerReference  # type: ignore[misc]
    resamplers.InterpolativeDownsampler = resamplers.InterpolativeDownsamplerReference  # type: ignore[misc]
    import R3GAN.Networks as networks  # noqa: PLC0415
    import R3GAN.Trainer as trainer  # noqa: PLC0415

    return networks, trainer


def stage_nodes(nodes: dict, kind: str) -> list[str]:
    return [name for name, node in nodes.items() if node.kind == kind]


def weight_map(spec) -> tuple[dict[str, str], dict[str, str]]:
    """Our parameter names -> the authors' (Networks.py), for a spec of one block per stage."""

    def block(ours: str, theirs: str) -> dict[str, str]:
        return {
            f"{ours}.expand.weight": f"{theirs}.LinearLayer1.Layer.weight",
            f"{ours}.grouped.weight": f"{theirs}.LinearLayer2.Layer.weight",
            f"{ours}.project.weight": f"{theirs}.LinearLayer3.Layer.weight",
            f"{ours}.act1.bias": f"{theirs}.NonLinearity1.Bias",
            f"{ours}.act2.bias": f"{theirs}.NonLinearity2.Bias",
        }

    g_nodes, d_nodes = spec.generator.nodes, spec.discriminator.nodes
    g = {
        "input.basis": "MainLayers.0.Layers.0.Basis",
        "input.linear.weight": "MainLayers.0.Layers.0.LinearLayer.weight",
        "input.embed.weight": "EmbeddingLayer.weight",
        "rgb.weight": "AggregationLayer.Layer.weight",
    }
    for i, name in enumerate(stage_nodes(g_nodes, "r3gan_block")):
        g |= block(name, f"MainLayers.{i}.Layers.1")
    for i, name in enumerate(stage_nodes(g_nodes, "r3gan_up"), start=1):
        g[f"{name}.conv.weight"] = f"MainLayers.{i}.Layers.0.LinearLayer.Layer.weight"
    d = {
        "extract.weight": "ExtractionLayer.Layer.weight",
        "head.embed.weight": "EmbeddingLayer.weight",
    }
    blocks = stage_nodes(d_nodes, "r3gan_block")
    for i, name in enumerate(blocks):
        d |= block(name, f"MainLayers.{i}.Layers.0")
    for i, name in enumerate(stage_nodes(d_nodes, "r3gan_down")):
        d[f"{name}.conv.weight"] = f"MainLayers.{i}.Layers.1.LinearLayer.Layer.weight"
    last = len(blocks) - 1
    d |= {"head.basis.weight": f"MainLayers.{last}.Layers.1.Basis.weight"}
    d |= {"head.linear.weight": f"MainLayers.{last}.Layers.1.LinearLayer.weight"}
    return g, d


def copy_weights(ours, theirs, mapping: dict[str, str]) -> None:
    """The authors' weights into ours; the zero-started ones (last convs, biases) drawn first."""
    their_params, our_names = dict(theirs.named_parameters()), {n for n, _ in ours.named_parameters()}
    mapping = {n: t for n, t in mapping.items() if n in our_names}  # 1x1 convs only where channels change
    unmapped = (set(their_params) - set(mapping.values())) | (our_names - set(mapping))
    if unmapped:
        raise SystemExit(f"the weight maps do not cover the networks: {sorted(unmapped)}")
    with torch.no_grad():
        for name, param in ours.named_parameters():
            source = their_params[mapping[name]]
            if "project" in name or name.endswith("bias"):
                source.normal_(0.0, 0.1)
            param.copy_(as_ours(name, source, param.shape))


def as_ours(name: str, tensor: torch.Tensor, shape) -> torch.Tensor:
    """An authors' tensor in our layout: nn.Linear(classes, dim)'s weight is our nn.Embedding's
    transposed; GenerativeBasis's (C, 4, 4) basis is ours."""
    return tensor.t() if name.endswith("embed.weight") else tensor.view(shape)


def worst_gradient(ours, theirs, mapping: dict[str, str]) -> str:
    their_params = dict(theirs.named_parameters())
    worst = max(
        ((p.grad - as_ours(n, their_params[mapping[n]].grad, p.shape)).abs().max().item(), n)
        for n, p in ours.named_parameters()
    )
    return f"max |diff| {worst[0]:.3g} ({worst[1]})"


def biggest(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max |diff| {(a - b).abs().max().item():.3g} (of values up to {b.abs().max().item():.3g})"


class Step:
    """What the gan method's objectives read, with the batch and latents given."""

    def __init__(self, G, D, real, labels, z):
        self.nets, self.micro, self.images_seen, self.step, self.counting_flops = (
            {"generator": G, "discriminator": D},
            real.shape[0],
            0,
            0,
            False,
        )
        self.real, self.labels, self.z = real, labels, z

    def next(self, stream):
        return self.real.clone(), self.labels.clone()

    def latents(self, n):
        return self.z.clone(), self.labels.clone()

    def mixed(self):
        return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="a checkout of brownvc/R3GAN (19a7ddf)")
    args = parser.parse_args()
    networks, trainer = reference(args.checkout)
    torch.manual_seed(0)
    loaded = load_spec("r3gan_demo", ["compile.channels_last=false"])
    spec = loaded.spec
    G = build_network(loaded, "generator").double()
    D = build_network(loaded, "discriminator").double()
    g_nodes, d_nodes = spec.generator.nodes, spec.discriminator.nodes
    widths = [g_nodes["input"].out_channels] + [g_nodes[n].out_channels or 0 for n in stage_nodes(g_nodes, "r3gan_up")]
    for i in range(1, len(widths)):
        widths[i] = widths[i] or widths[i - 1]
    cards = [g_nodes[n].cardinality for n in stage_nodes(g_nodes, "r3gan_block")]
    ones = [1] * len(widths)
    z_dim, g_embed = spec.latent.z_dim, g_nodes["input"].embedding_dim
    their_G = networks.Generator(z_dim, widths, cards, ones, 2, NUM_CLASSES, g_embed).double()
    their_D = networks.Discriminator(
        widths[::-1], cards[::-1], ones, 2, NUM_CLASSES, d_nodes["head"].embedding_dim
    ).double()
    for stage in list(their_G.MainLayers) + list(their_D.MainLayers):
        stage.DataType = torch.float64
    g_map, d_map = weight_map(spec)
    copy_weights(G, their_G, g_map)
    copy_weights(D, their_D, d_map)

    z = torch.randn(BATCH, z_dim, dtype=torch.float64)
    labels = torch.arange(BATCH) % NUM_CLASSES
    onehot = F.one_hot(labels, NUM_CLASSES).double()
    ours_img, their_img = G(z, labels), their_G(z, onehot)
    print("G images:", biggest(ours_img, their_img))
    x_ours, x_theirs = (their_img.detach().clone().requires_grad_(True) for _ in range(2))
    ours_logit, their_logit = D(x_ours, labels).view(-1), their_D(x_theirs, onehot)
    print("D logits:", biggest(ours_logit, their_logit))
    (grad_ours,) = torch.autograd.grad(ours_logit.sum(), x_ours)
    (grad_theirs,) = torch.autograd.grad(their_logit.sum(), x_theirs)
    print("D input gradients:", biggest(grad_ours, grad_theirs))

    # a D step and a G step: the authors' AdversarialTraining against the gan method's objectives
    real = torch.rand(BATCH, 3, 32, 32, dtype=torch.float64) * 2 - 1
    run = GanMethod(loss="relativistic_pairing", r1_gamma=GAMMA, r2_gamma=GAMMA).build(spec)
    step = Step(G, D, real, labels, z)
    reference_steps = trainer.AdversarialTraining(their_G, their_D)
    their_loss = reference_steps.AccumulateDiscriminatorGradients(z, real, onehot, GAMMA)
    losses, _ = run.d_objective(step)
    losses["D"].backward()
    their_total = (their_loss[0] + GAMMA / 2 * (their_loss[2] + their_loss[3])).mean()
    print("D loss:", biggest(losses["D"].detach(), their_total))
    print("D weight gradients:", worst_gradient(D, their_D, d_map))
    for module in (G, D, their_G, their_D):
        module.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    their_D.requires_grad_(False)
    their_g = reference_steps.AccumulateGeneratorGradients(z, real, onehot)
    losses, _ = run.g_objective(step)
    losses["G"].backward()
    print("G loss:", biggest(losses["G"].detach(), their_g[0].mean()))
    print("G weight gradients:", worst_gradient(G, their_G, g_map))


if __name__ == "__main__":
    main()
