"""R3GAN's block kinds and specs: shapes, the fix-up initialisation, the resampling filter by hand,
and the parameter counts of the authors' networks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.blocks import REGISTRY, BlockError
from pipeline.blocks.layers import BuildContext
from pipeline.blocks.r3gan import LRELU_GAIN, branch_gain, lowpass_kernel
from pipeline.graph import analyze_spec, build_network
from pipeline.spec import load_spec


def build(params: dict, inputs: dict, init: str = "msr"):
    node = REGISTRY[params["kind"]].model_validate(params)
    ctx = BuildContext(num_classes=10, image_channels=3, meta=False, init=init)
    return node.build(inputs, ctx.for_node(node))


# ----- shapes -----
@pytest.mark.parametrize(
    "params, inputs, x_shape, out_shape",
    [
        ({"kind": "r3gan_input", "in": "z", "out_channels": 8}, {"in": (6,)}, (2, 6), (2, 8, 4, 4)),
        (
            {"kind": "r3gan_input", "in": "z", "y": "y", "out_channels": 8, "embedding_dim": 4},
            {"in": (6,), "y": ()},
            (2, 6),
            (2, 8, 4, 4),
        ),
        ({"kind": "r3gan_block", "in": "x", "cardinality": 4, "num_blocks": 3}, {"in": (8, 5, 5)}, (2, 8, 5, 5), None),
        ({"kind": "r3gan_up", "in": "x"}, {"in": (8, 4, 4)}, (2, 8, 4, 4), (2, 8, 8, 8)),
        ({"kind": "r3gan_up", "in": "x", "out_channels": 4}, {"in": (8, 4, 4)}, (2, 8, 4, 4), (2, 4, 8, 8)),
        ({"kind": "r3gan_down", "in": "x", "out_channels": 16}, {"in": (8, 8, 8)}, (2, 8, 8, 8), (2, 16, 4, 4)),
        ({"kind": "r3gan_output", "in": "x"}, {"in": (8, 4, 4)}, (2, 8, 4, 4), (2, 1)),
        (
            {"kind": "r3gan_output", "in": "x", "y": "y", "embedding_dim": 6},
            {"in": (8, 4, 4), "y": ()},
            (2, 8, 4, 4),
            (2, 1),
        ),
    ],
)
def test_shapes(params, inputs, x_shape, out_shape):
    module = build(params, inputs)
    args = [torch.randn(x_shape)] + ([torch.tensor([3, 7])] if "y" in params else [])
    out = module(*args)
    assert out.shape == (out_shape or x_shape) and torch.isfinite(out).all()


def test_errors_name_the_field():
    with pytest.raises(BlockError) as err:
        build({"kind": "r3gan_block", "in": "x", "cardinality": 3, "num_blocks": 1}, {"in": (8, 4, 4)})
    assert err.value.field == "cardinality" and "16 channels" in err.value.message
    with pytest.raises(BlockError) as err:
        build({"kind": "r3gan_output", "in": "x"}, {"in": (8, 8, 8)})
    assert "4x4" in err.value.message
    with pytest.raises(BlockError) as err:  # conditional without an embedding
        build({"kind": "r3gan_input", "in": "z", "y": "y", "out_channels": 8}, {"in": (6,), "y": ()})
    assert err.value.field == "embedding_dim"
    with pytest.raises(BlockError, match="equalized_lr"):
        build({"kind": "r3gan_block", "in": "x", "cardinality": 1, "num_blocks": 1}, {"in": (8, 4, 4)}, "equalized_lr")
    with pytest.raises(ValueError, match="symmetric"):
        REGISTRY["r3gan_up"].model_validate({"kind": "r3gan_up", "in": "x", "filter": [1, 3, 3, 1]})


# ----- initialisation -----
def test_fixup_initialisation():
    # Networks.py, ResidualBlock: gains sqrt(2 / (1 + 0.2²)) L^(-1/4) on the first two convs, 0 on the last
    assert math.isclose(LRELU_GAIN, math.sqrt(2 / 1.04))
    assert math.isclose(branch_gain(16), LRELU_GAIN / 2)
    torch.manual_seed(0)
    block = build({"kind": "r3gan_block", "in": "x", "cardinality": 8, "num_blocks": 16}, {"in": (128, 4, 4)})
    assert torch.count_nonzero(block.project.weight) == 0  # the branch starts at zero: the block is the identity
    x = torch.randn(2, 128, 4, 4)
    assert torch.equal(block(x), x)
    # MSR: std = gain / sqrt(fan_in), fan_in of the grouped conv = (256 / 8) * 3 * 3
    for conv, fan_in in ((block.expand, 128), (block.grouped, 32 * 9)):
        assert conv.weight.std().item() == pytest.approx(branch_gain(16) / math.sqrt(fan_in), rel=0.03)
    assert block.grouped.groups == 8 and block.expand.bias is None
    assert torch.count_nonzero(block.act1.bias) == 0 and block.act1.bias.shape == (256,)
    # nonzero once the last conv learns: the branch's nonlinearity is a LeakyReLU 0.2 of x + bias
    with torch.no_grad():
        block.project.weight.normal_()
    h = F.leaky_relu(block.grouped(F.leaky_relu(block.expand(x), 0.2)), 0.2)
    assert torch.allclose(block(x), x + block.project(h), atol=1e-5)


def test_embeddings_and_bases_initialise_as_the_authors():
    torch.manual_seed(0)
    g = build(
        {"kind": "r3gan_input", "in": "z", "y": "y", "out_channels": 512, "embedding_dim": 64},
        {"in": (64,), "y": ()},
    )
    assert g.basis.std().item() == pytest.approx(1.0, rel=0.05)  # GenerativeBasis: N(0, 1)
    assert g.linear.weight.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.03)  # z and embedding
    assert g.embed.weight.std().item() == pytest.approx(1 / math.sqrt(10), rel=0.1)  # fan-in: 10 classes
    d = build({"kind": "r3gan_output", "in": "x", "y": "y", "embedding_dim": 256}, {"in": (256, 4, 4), "y": ()})
    assert d.basis.groups == 256 and d.basis.weight.shape == (256, 1, 4, 4)
    assert d.basis.weight.std().item() == pytest.approx(1 / 4, rel=0.05)  # depthwise 4x4: fan-in 16
    # Discriminator's EmbeddingLayer: gain 1 / sqrt(embedding_dim) over fan-in 10
    assert d.embed.weight.std().item() == pytest.approx(1 / math.sqrt(256) / math.sqrt(10), rel=0.05)
    # the logit is <linear(basis(x)), embed(y)>
    x, y = torch.randn(3, 256, 4, 4), torch.tensor([0, 4, 9])
    h = d.linear((x * d.basis.weight.squeeze(1)).sum((2, 3)))
    assert torch.allclose(d(x, y), (h * d.embed(y)).sum(1, keepdim=True), atol=1e-5)


# ----- resampling -----
def test_lowpass_kernel_by_hand():
    # [1, 2, 1] * [1, 1] = [1, 3, 3, 1]; outer product / 64
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.equal(lowpass_kernel([1, 2, 1]), torch.outer(taps, taps) / 64)
    assert torch.equal(lowpass_kernel([1]), torch.full((2, 2), 0.25))  # box filter: 2x2 average


def test_resampling_against_a_hand_computed_case():
    # Per axis the kernel is [1, 3, 3, 1] / 8 (its outer product is the 2-D kernel).
    # Up-sampling: a transposed conv of stride 2, padding 1, the kernel times 4 ([1, 3, 3, 1] / 4 per
    # axis): [a, b] -> [3a, 3a + b, a + 3b, 3b] / 4; with a = 4, b = 8: [3, 5, 7, 6]
    up = build({"kind": "r3gan_up", "in": "x"}, {"in": (1, 2, 2)})
    x = torch.tensor([[4.0, 8.0], [4.0, 8.0]]).view(1, 1, 2, 2)
    row = torch.tensor([3.0, 5.0, 7.0, 6.0])
    col = torch.tensor([3.0, 4.0, 4.0, 3.0]) / 4  # the constant column [1, 1]
    assert torch.allclose(up(x)[0, 0], col[:, None] * row[None, :])
    # Down-sampling: stride 2, padding 1: the ramp [0, 1, 2, 3], padded [0, 0, 1, 2, 3, 0], gives
    # (0 + 0 + 3 + 2) / 8 and (1 + 6 + 9 + 0) / 8; a constant column (3 + 3 + 1) / 8 twice
    down = build({"kind": "r3gan_down", "in": "x"}, {"in": (1, 4, 4)})
    image = torch.arange(4.0).expand(4, 4).reshape(1, 1, 4, 4)
    expected = torch.tensor([7.0, 7.0])[:, None] / 8 * torch.tensor([5.0, 16.0])[None, :] / 8
    assert torch.allclose(down(image)[0, 0], expected)
    # a constant image stays constant away from the border (kernel sum 1; the up-sampler's gain 4)
    ones = build({"kind": "r3gan_up", "in": "x"}, {"in": (2, 6, 6)})(torch.ones(1, 2, 6, 6))
    assert torch.allclose(ones[..., 1:-1, 1:-1], torch.ones(1, 2, 10, 10))


# ----- specs: parameter counts of the authors' networks -----
# Built from brownvc/R3GAN at 19a7ddf (R3GAN/Networks.py, Generator and Discriminator) with train.py's
# preset CIFAR10 and --cond=1: WidthPerStage [768] * 4, BlocksPerStage [2] * 4, CardinalityPerStage
# [96] * 4, ExpansionFactor 2, NoiseDimension 64, ConditionDimension 10, ConditionEmbeddingDimension 64
# (G) and 768 (D); sum(p.numel() for p in net.parameters()).
AUTHORS_CIFAR10 = {"generator": 20_781_952, "discriminator": 21_280_512}


def test_cifar10_has_the_authors_parameter_counts():
    plans = analyze_spec(load_spec("r3gan_cifar10"))
    assert {which: plans[which].params for which in AUTHORS_CIFAR10} == AUTHORS_CIFAR10


@pytest.mark.parametrize("name", ["r3gan_cifar10", "r3gan_demo"])
def test_spec_builds_and_runs(name):
    torch.manual_seed(0)
    widths = {"r3gan_cifar10": ["out_channels=64", "cardinality=8", "embedding_dim=64"], "r3gan_demo": []}[name]
    overrides = []
    if widths:  # CIFAR-10 at width 64 (cardinality 8: 16 channels per group, as the authors')
        full = load_spec(name, check_graphs=False).spec
        for which in ("generator", "discriminator"):
            for node_name, node in getattr(full, which).nodes.items():
                for key in ("out_channels", "cardinality"):
                    if getattr(node, key, None) is not None:
                        value = 8 if key == "cardinality" else 64
                        if not (node_name == "rgb" and key == "out_channels"):
                            overrides.append(f"{which}.nodes.{node_name}.{key}={value}")
                if node.kind == "r3gan_output":
                    overrides.append(f"{which}.nodes.{node_name}.embedding_dim=64")
    loaded = load_spec(name, overrides)
    G = build_network(loaded, "generator", "cpu")
    D = build_network(loaded, "discriminator", "cpu")
    z, y = torch.randn(2, 64), torch.tensor([1, 8])
    img = G(z, y)
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    logits = D(img, y)
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_a_generator_built_on_meta_and_given_weights_runs():
    """As sampling loads one: built on the meta device, then given the weights (the resampling
    kernel is a constant, not a buffer left without data)."""
    from pipeline.graph import analyze_network, build_network, instantiate
    from pipeline.spec import load_spec

    loaded = load_spec("r3gan_demo")
    trained = build_network(loaded, "generator", "cpu", compile=False).eval()
    module = instantiate(loaded, analyze_network(loaded, "generator"), "meta")
    module.load_state_dict(trained.state_dict(), assign=True)
    z, y = torch.randn(2, loaded.spec.latent.z_dim), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(module.eval()(z, y), trained(z, y))
