"""ProGAN, DCGAN, U-Net and R3GAN block kinds, and the specs that use them, on CPU with real tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.blocks import REGISTRY, BlockError
from pipeline.blocks.layers import BuildContext
from pipeline.graph import analyze_spec, build_network
from pipeline.spec import load_spec

FAMILY_SPECS = ["dcgan_32", "sagan_128", "progan_256", "unet_d_128"]


def ctx(**changes) -> BuildContext:
    return BuildContext(num_classes=10, image_channels=3, meta=False, **changes)


def build(params: dict, inputs: dict, **ctx_changes):
    """Validate a node's params as YAML would give them and build its module with real weights."""
    node = REGISTRY[params["kind"]].model_validate(params)
    return node.build(inputs, ctx(**ctx_changes).for_node(node))


def labels(batch: int) -> torch.Tensor:
    return torch.arange(batch) % 10


# ----- output shapes of every new kind -----
FEATURE_MAP_CASES = [
    # (params, input shape with batch, output shape with batch)
    ({"kind": "minibatch_stddev", "in": "x"}, (4, 8, 4, 4), (4, 9, 4, 4)),
    ({"kind": "minibatch_stddev", "in": "x", "num_features": 2}, (8, 8, 4, 4), (8, 10, 4, 4)),
    ({"kind": "to_rgb", "in": "x"}, (2, 16, 8, 8), (2, 3, 8, 8)),
    ({"kind": "from_rgb", "in": "x", "out_channels": 16}, (2, 3, 8, 8), (2, 16, 8, 8)),
    ({"kind": "progan_up", "in": "x", "out_channels": 8, "in_channels": 16}, (2, 16, 4, 4), (2, 8, 8, 8)),
    ({"kind": "progan_up", "in": "x", "out_channels": 8, "upsample": False}, (2, 16, 4, 4), (2, 8, 4, 4)),
    ({"kind": "progan_input", "in": "z", "out_channels": 16}, (2, 32), (2, 16, 4, 4)),
    ({"kind": "progan_down", "in": "x", "out_channels": 16}, (2, 8, 8, 8), (2, 16, 4, 4)),
    (
        {"kind": "progan_down", "in": "x", "out_channels": 16, "hidden_channels": 4, "downsample": False},
        (2, 8, 8, 8),
        (2, 16, 8, 8),
    ),
    ({"kind": "progan_output", "in": "x", "channels": 16}, (2, 17, 4, 4), (2, 1)),
    ({"kind": "dcgan_up", "in": "x", "out_channels": 8}, (2, 16, 4, 4), (2, 8, 8, 8)),
    ({"kind": "dcgan_up", "in": "x", "out_channels": 8, "stride": 1, "padding": 0}, (2, 100, 1, 1), (2, 8, 4, 4)),
    ({"kind": "dcgan_up", "in": "x", "out_channels": 8, "norm": False}, (2, 16, 4, 4), (2, 8, 8, 8)),
    ({"kind": "dcgan_down", "in": "x", "out_channels": 8, "norm": False}, (2, 3, 8, 8), (2, 8, 4, 4)),
    ({"kind": "dcgan_down", "in": "x", "out_channels": 8}, (2, 4, 8, 8), (2, 8, 4, 4)),
    ({"kind": "pixel_head", "in": "x"}, (2, 8, 8, 8), (2, 1, 8, 8)),
    ({"kind": "instance_norm", "in": "x"}, (2, 8, 4, 4), (2, 8, 4, 4)),
    ({"kind": "reflect_conv", "in": "x", "out_channels": 8, "kernel_size": 7}, (2, 3, 8, 8), (2, 8, 8, 8)),
    ({"kind": "resnet_block", "in": "x"}, (2, 8, 4, 4), (2, 8, 4, 4)),
    ({"kind": "conv_up", "in": "x", "out_channels": 8}, (2, 16, 4, 4), (2, 8, 8, 8)),
    ({"kind": "patch_conv", "in": "x", "out_channels": 8}, (2, 3, 8, 8), (2, 8, 4, 4)),
    ({"kind": "patch_head", "in": "x"}, (2, 8, 4, 4), (2, 1, 3, 3)),
    # R3GAN's (the conditional paths and the init: test_r3gan_blocks.py)
    ({"kind": "r3gan_input", "in": "x", "out_channels": 8}, (2, 16), (2, 8, 4, 4)),
    ({"kind": "r3gan_block", "in": "x", "cardinality": 2, "num_blocks": 4}, (2, 8, 4, 4), (2, 8, 4, 4)),
    ({"kind": "r3gan_up", "in": "x", "out_channels": 4}, (2, 8, 4, 4), (2, 4, 8, 8)),
    ({"kind": "r3gan_down", "in": "x", "out_channels": 16}, (2, 8, 8, 8), (2, 16, 4, 4)),
    ({"kind": "r3gan_output", "in": "x"}, (2, 8, 4, 4), (2, 1)),
]


@pytest.mark.parametrize(
    "params, in_shape, out_shape",
    FEATURE_MAP_CASES,
    ids=[f"{c[0]['kind']}-{i}" for i, c in enumerate(FEATURE_MAP_CASES)],
)
def test_forward_shape(params, in_shape, out_shape):
    module = build(params, {"in": in_shape[1:]}, init="normal")
    out = module(torch.randn(in_shape))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()


def test_every_family_kind_has_a_forward_test(family_block_kinds):
    assert family_block_kinds - {c[0]["kind"] for c in FEATURE_MAP_CASES} == set()


def test_pixel_head_with_labels_shape():
    module = build({"kind": "pixel_head", "in": "x", "y": "y"}, {"in": (8, 6, 6), "y": ()})
    assert module(torch.randn(2, 8, 6, 6), labels(2)).shape == (2, 1, 6, 6)


def test_progan_output_needs_4x4():
    with pytest.raises(BlockError, match="4x4"):
        build({"kind": "progan_output", "in": "x", "channels": 16}, {"in": (17, 8, 8)})


def test_in_channels_mismatch_is_reported():
    for kind in ("progan_up", "progan_down", "dcgan_up", "dcgan_down"):
        with pytest.raises(BlockError) as exc:
            build({"kind": kind, "in": "x", "out_channels": 8, "in_channels": 32}, {"in": (16, 8, 8)})
        assert exc.value.field == "in_channels"


def test_dcgan_batch_norm_gain_starts_near_one():
    module = build({"kind": "dcgan_down", "in": "x", "out_channels": 256}, {"in": (4, 8, 8)}, init="normal")
    assert module.conv.bias is None  # BatchNorm's bias makes the conv's redundant
    assert abs(module.bn.weight.mean().item() - 1) < 0.01
    assert 0.01 < module.bn.weight.std().item() < 0.03


# ----- equalized learning rate -----
def test_equalized_lr_scales_at_run_time():
    torch.manual_seed(0)
    block = build({"kind": "progan_up", "in": "x", "out_channels": 64}, {"in": (64, 4, 4)}, init="equalized_lr")
    conv = block.conv1.conv
    stored = conv.parametrizations.weight.original
    fan_in = 64 * 3 * 3
    assert abs(stored.std().item() - 1) < 0.02  # stored ~ N(0, 1)
    torch.testing.assert_close(conv.weight, stored * math.sqrt(2 / fan_in))
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(conv(x), F.conv2d(x, stored * math.sqrt(2 / fan_in), conv.bias, padding=1))


def test_equalized_lr_gains_of_linear_layers():
    # toRGB and D's last dense layer use gain 1; G's first dense sqrt(2)/4 (the authors' TF code).
    to_rgb = build({"kind": "to_rgb", "in": "x"}, {"in": (16, 4, 4)}, init="equalized_lr")
    torch.testing.assert_close(to_rgb.weight, to_rgb.parametrizations.weight.original / math.sqrt(16))
    first = build({"kind": "progan_input", "in": "z", "out_channels": 8}, {"in": (32,)}, init="equalized_lr")
    torch.testing.assert_close(
        first.dense.weight, first.dense.parametrizations.weight.original * math.sqrt(2) / 4 / math.sqrt(32)
    )


# ----- minibatch standard deviation -----
def test_minibatch_stddev_adds_the_group_std():
    x = torch.tensor([0.0, 1.0, 2.0, 5.0]).view(4, 1, 1, 1) * torch.ones(4, 2, 3, 3)
    x[:, 1] *= 2  # channel 1 has twice the spread
    module = build({"kind": "minibatch_stddev", "in": "x"}, {"in": (2, 3, 3)})
    out = module(x)
    assert out.shape == (4, 3, 3, 3)
    torch.testing.assert_close(out[:, :2], x)
    std0 = math.sqrt(((torch.tensor([0.0, 1, 2, 5]) - 2) ** 2).mean().item())  # population std: sqrt(3.5)
    expected = (std0 + 2 * std0) / 2  # mean over channels and pixels
    torch.testing.assert_close(out[:, 2], torch.full((4, 3, 3), expected), rtol=1e-5, atol=1e-5)


def test_minibatch_stddev_groups_interleave():
    # Batch 4 in groups of 2: sample i is in group i mod 2, as in ProGAN/StyleGAN.
    x = torch.tensor([0.0, 10.0, 2.0, 30.0]).view(4, 1, 1, 1)
    out = build({"kind": "minibatch_stddev", "in": "x", "group_size": 2}, {"in": (1, 1, 1)})(x)
    torch.testing.assert_close(out[:, 1].flatten(), torch.tensor([1.0, 10.0, 1.0, 10.0]))


def test_minibatch_stddev_small_and_uneven_batches():
    module = build({"kind": "minibatch_stddev", "in": "x"}, {"in": (4, 2, 2)})
    assert module(torch.randn(2, 4, 2, 2)).shape == (2, 5, 2, 2)  # group = min(4, batch)
    with pytest.raises(ValueError, match="batch of 6 does not split into groups of 4"):
        module(torch.randn(6, 4, 2, 2))
    with pytest.raises(BlockError):
        build({"kind": "minibatch_stddev", "in": "x", "num_features": 3}, {"in": (4, 2, 2)})


# ----- U-Net pixel head -----
def test_pixel_head_projection_formula():
    head = build({"kind": "pixel_head", "in": "x", "y": "y", "relu": True}, {"in": (2, 1, 2), "y": ()})
    with torch.no_grad():
        head.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
        head.conv.bias.fill_(0.5)
        head.embed.weight.zero_()
        head.embed.weight[3] = torch.tensor([10.0, -1.0])
    x = torch.tensor([[[[1.0, -4.0]], [[3.0, 2.0]]]])  # (1, C=2, H=1, W=2)
    out = head(x, torch.tensor([3]))
    # ReLU first: pixel 0 has h = (1, 3), pixel 1 has h = (0, 2).
    # pixel 0: 1*1 + 2*3 + 0.5 + (10*1 - 1*3) = 14.5; pixel 1: 2*2 + 0.5 + (0 - 2) = 2.5
    torch.testing.assert_close(out, torch.tensor([[[[14.5, 2.5]]]]))


# ----- specs -----
def tiny_overrides(loaded, factor: int = 8) -> list[str]:
    """Overrides dividing every width of at least 64 by `factor` (the linear feeding a reshape and
    the reshape with it), so a real spec builds and runs in a fraction of a second."""
    out = []
    for which in ("generator", "discriminator"):
        nodes = getattr(loaded.spec, which).nodes
        for name, node in nodes.items():
            for key in ("out_channels", "out_features", "channels"):
                value = getattr(node, key, None)
                if isinstance(value, int) and value >= 64:
                    out.append(f"{which}.nodes.{name}.{key}={value // factor}")
            if (
                node.kind == "reshape"
                and len(node.shape) == 3
                and nodes.get(node.in_) is not None
                and nodes[node.in_].kind == "linear"
            ):
                out.append(f"{which}.nodes.{name}.shape={[node.shape[0] // factor] + node.shape[1:]}")
    return out


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_spec_validates(name):
    loaded = load_spec(name)
    plans = analyze_spec(loaded)
    d = loaded.spec.data
    assert plans["generator"].output_shapes[0] == (3, d.resolution, d.resolution)
    assert plans["discriminator"].output_shapes[0] == (1,)
    assert plans["generator"].params > 0 and plans["discriminator"].params > 0


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_spec_builds_and_runs(name):
    torch.manual_seed(0)
    full = load_spec(name, check_graphs=False)
    loaded = full if name == "dcgan_32" else load_spec(name, tiny_overrides(full))
    G = build_network(loaded, "generator", "cpu")
    D = build_network(loaded, "discriminator", "cpu")
    res, batch = loaded.spec.data.resolution, 2
    z, y = torch.randn(batch, loaded.spec.latent.z_dim), labels(batch)
    img = G(z, y)
    assert img.shape == (batch, 3, res, res)
    if name == "progan_256":
        assert torch.isfinite(img).all()  # ProGAN's toRGB is linear: no tanh, images learn the range
    else:
        assert img.min() >= -1 and img.max() <= 1
    out = D(img, y)
    outs = out if isinstance(out, tuple) else (out,)
    assert outs[0].shape == (batch, 1)
    if name == "unet_d_128":
        assert outs[1].shape == (batch, 1, res, res)
    assert all(torch.isfinite(o).all() for o in outs)
