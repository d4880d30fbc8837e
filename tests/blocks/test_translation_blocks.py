"""Image-to-image translation block kinds (CycleGAN / CSGAN's ResNet generator and PatchGAN
discriminator): shapes, formulas, errors, and the published parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipeline.blocks import REGISTRY, BlockError
from pipeline.blocks.layers import BuildContext

KINDS = ("instance_norm", "reflect_conv", "resnet_block", "conv_up", "patch_conv", "patch_head")


def ctx(meta: bool = False, **changes) -> BuildContext:
    return BuildContext(num_classes=0, image_channels=3, meta=meta, **changes)


def build(params: dict, in_shape: tuple[int, ...], **ctx_changes):
    """Validate a node's params as YAML would give them and build its module with real weights."""
    node = REGISTRY[params["kind"]].model_validate({"in": "x", **params})
    return node.build({"in": in_shape}, ctx(**ctx_changes).for_node(node))


def run_chain(nodes: list[dict], in_shape: tuple[int, ...], *, meta: bool, batch: int = 2):
    """Build the nodes one after another, each fed the previous output (repeats unrolled), and run
    them: on `meta` for full-size networks. Returns the output and the parameter count."""
    build_ctx = ctx(meta=meta, init="normal")
    num_params = 0
    with torch.device("meta" if meta else "cpu"):
        x = torch.randn((batch,) + in_shape)
        for params in nodes:
            node = REGISTRY[params["kind"]].model_validate({"in": "x", **params})
            for i in range(node.repeat):
                inst = node.instance(i)
                module = inst.build({"in": tuple(x.shape[1:])}, build_ctx.for_node(inst))
                num_params += sum(p.numel() for p in module.parameters())
                x = module(x)
    return x, num_params


def resnet_generator(ngf: int, num_blocks: int) -> list[dict]:
    """CycleGAN's c7s1-ngf, d2ngf, d4ngf, R4ngf x num_blocks, u2ngf, ungf, c7s1-3 with tanh; the
    stride-2 convs zero-padded as in its code."""
    return [
        {"kind": "reflect_conv", "out_channels": ngf, "kernel_size": 7},
        {"kind": "reflect_conv", "out_channels": 2 * ngf, "stride": 2, "padding_mode": "zeros"},
        {"kind": "reflect_conv", "out_channels": 4 * ngf, "stride": 2, "padding_mode": "zeros"},
        {"kind": "resnet_block", "repeat": num_blocks},
        {"kind": "conv_up", "out_channels": 2 * ngf},
        {"kind": "conv_up", "out_channels": ngf},
        {"kind": "reflect_conv", "out_channels": 3, "kernel_size": 7, "norm": "none", "activation": "tanh"},
    ]


def patch_discriminator(channels: tuple[int, int, int, int]) -> list[dict]:
    """The 70x70 PatchGAN: C64 (no norm), C128, C256 at stride 2, C512 at stride 1, head."""
    return [
        {"kind": "patch_conv", "out_channels": channels[0], "norm": "none"},
        {"kind": "patch_conv", "out_channels": channels[1]},
        {"kind": "patch_conv", "out_channels": channels[2]},
        {"kind": "patch_conv", "out_channels": channels[3], "stride": 1},
        {"kind": "patch_head"},
    ]


# ----- output shapes of every kind -----
CASES = [
    # (params, input shape with batch, output shape with batch)
    ({"kind": "instance_norm"}, (2, 8, 5, 5), (2, 8, 5, 5)),
    ({"kind": "instance_norm", "affine": True}, (2, 8, 1, 2), (2, 8, 1, 2)),
    ({"kind": "reflect_conv", "out_channels": 16, "kernel_size": 7}, (2, 3, 16, 16), (2, 16, 16, 16)),
    ({"kind": "reflect_conv", "out_channels": 16, "stride": 2}, (2, 8, 16, 16), (2, 16, 8, 8)),
    ({"kind": "reflect_conv", "out_channels": 16, "stride": 2, "padding_mode": "zeros"}, (2, 8, 9, 9), (2, 16, 5, 5)),
    (
        {"kind": "reflect_conv", "out_channels": 3, "kernel_size": 7, "norm": "none", "activation": "tanh"},
        (2, 16, 16, 16),
        (2, 3, 16, 16),
    ),
    ({"kind": "reflect_conv", "out_channels": 4, "padding": 0, "activation": "leaky_relu"}, (2, 8, 6, 6), (2, 4, 4, 4)),
    ({"kind": "resnet_block"}, (2, 16, 8, 8), (2, 16, 8, 8)),
    ({"kind": "resnet_block", "norm": "none", "in_channels": 16}, (2, 16, 2, 3), (2, 16, 2, 3)),
    ({"kind": "conv_up", "out_channels": 8}, (2, 16, 8, 8), (2, 8, 16, 16)),
    ({"kind": "conv_up", "out_channels": 8, "norm": "none"}, (2, 16, 5, 7), (2, 8, 10, 14)),
    ({"kind": "patch_conv", "out_channels": 16, "norm": "none"}, (2, 3, 32, 32), (2, 16, 16, 16)),
    ({"kind": "patch_conv", "out_channels": 16}, (2, 8, 35, 35), (2, 16, 17, 17)),
    ({"kind": "patch_conv", "out_channels": 16, "stride": 1}, (2, 8, 8, 8), (2, 16, 7, 7)),
    ({"kind": "patch_head"}, (2, 16, 7, 7), (2, 1, 6, 6)),
]


@pytest.mark.parametrize("params, in_shape, out_shape", CASES, ids=[f"{c[0]['kind']}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("sn", [False, True])
def test_forward_shape(params, in_shape, out_shape, sn):
    module = build(params, in_shape[1:], init="normal", sn=sn)
    out = module(torch.randn(in_shape))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()


def test_every_translation_kind_has_a_forward_test():
    module_kinds = {k for k, cls in REGISTRY.items() if cls.__module__ == "pipeline.blocks.translation"}
    assert module_kinds == set(KINDS)
    assert module_kinds - {c[0]["kind"] for c in CASES} == set()


# ----- whole networks and their parameter counts -----
def test_resnet_generator_32_runs():
    torch.manual_seed(0)
    img, num_params = run_chain(resnet_generator(16, 3), (3, 32, 32), meta=False)
    assert img.shape == (2, 3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1
    assert num_params == 272_515


@pytest.mark.parametrize(
    "resolution, num_blocks, expected",
    [
        (256, 9, 11_378_179),  # CycleGAN's resnet_9blocks: "11.378 M"
        (128, 6, 7_837_699),  # resnet_6blocks: "7.838 M"
    ],
)
def test_resnet_generator_paper_size(resolution, num_blocks, expected):
    img, num_params = run_chain(resnet_generator(64, num_blocks), (3, resolution, resolution), meta=True)
    assert img.shape == (2, 3, resolution, resolution)
    assert num_params == expected


@pytest.mark.parametrize("resolution, patches", [(256, 30), (128, 14), (70, 6)])
def test_patch_discriminator_paper_size(resolution, patches):
    # 70x70 PatchGAN "basic" D: 2.765 M parameters whatever the input size
    logits, num_params = run_chain(patch_discriminator((64, 128, 256, 512)), (3, resolution, resolution), meta=True)
    assert logits.shape == (2, 1, patches, patches)
    assert num_params == 2_764_737


def test_patch_discriminator_32_runs():
    torch.manual_seed(0)
    logits, num_params = run_chain(patch_discriminator((16, 32, 64, 128)), (3, 32, 32), meta=False)
    assert logits.shape == (2, 1, 2, 2)
    assert torch.isfinite(logits).all()
    assert num_params == 175_089


# ----- formulas -----
def test_resnet_block_is_identity_plus_residual():
    torch.manual_seed(0)
    block = build({"kind": "resnet_block"}, (8, 6, 6), init="normal")
    x = torch.randn(2, 8, 6, 6)
    residual = block.conv2(block.conv1(x))
    torch.testing.assert_close(block(x), x + residual)
    with torch.no_grad():
        block.conv2.conv.weight.zero_()
        block.conv2.conv.bias.zero_()
    assert torch.equal(block(x), x)


def test_instance_norm_normalizes_each_sample_and_channel():
    torch.manual_seed(0)
    norm = build({"kind": "instance_norm"}, (4, 8, 8))
    x = torch.randn(3, 4, 8, 8) * torch.arange(1.0, 5.0).view(1, 4, 1, 1) + torch.randn(3, 4, 1, 1) * 10
    out = norm(x)
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(2, 3), unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)
    norm.eval()  # no running statistics: evaluation normalises like training
    torch.testing.assert_close(norm(x), out)
    assert list(norm.parameters()) == [] and list(norm.buffers()) == []
    affine = build({"kind": "instance_norm", "affine": True}, (4, 8, 8))
    assert sum(p.numel() for p in affine.parameters()) == 8


def test_reflect_conv_pads_by_reflection():
    torch.manual_seed(0)
    params = {"kind": "reflect_conv", "out_channels": 4, "kernel_size": 7, "norm": "none", "activation": "none"}
    layer = build(params, (3, 8, 8), init="normal")
    x = torch.randn(2, 3, 8, 8)
    conv = layer.conv
    torch.testing.assert_close(layer(x), F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), conv.weight, conv.bias))
    zeros = build({**params, "padding_mode": "zeros"}, (3, 8, 8), init="normal")
    torch.testing.assert_close(zeros(x), F.conv2d(x, zeros.conv.weight, zeros.conv.bias, padding=3))


def test_layers_end_with_their_norm_and_activation():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    stem = build({"kind": "reflect_conv", "out_channels": 4}, (8, 8, 8), init="normal")
    h = stem.conv(stem.pad(x))
    torch.testing.assert_close(stem(x), F.relu(F.instance_norm(h)))
    patch = build({"kind": "patch_conv", "out_channels": 4, "negative_slope": 0.1}, (8, 8, 8), init="normal")
    h = F.conv2d(x, patch.conv.weight, patch.conv.bias, stride=2, padding=1)
    torch.testing.assert_close(patch(x), F.leaky_relu(F.instance_norm(h), 0.1))
    up = build({"kind": "conv_up", "out_channels": 4}, (8, 8, 8), init="normal")
    h = F.conv_transpose2d(x, up.conv.weight, up.conv.bias, stride=2, padding=1, output_padding=1)
    torch.testing.assert_close(up(x), F.relu(F.instance_norm(h)))


def test_convs_keep_their_bias_as_cycle_gan_does():
    # CycleGAN keeps the bias before instance norm; without it the counts would not be the published ones
    assert build({"kind": "reflect_conv", "out_channels": 4}, (8, 8, 8)).conv.bias is not None
    assert build({"kind": "conv_up", "out_channels": 4}, (8, 8, 8)).conv.bias is not None
    assert build({"kind": "patch_conv", "out_channels": 4}, (8, 8, 8)).conv.bias is not None


# ----- errors -----
@pytest.mark.parametrize("kind", KINDS)
def test_a_feature_vector_input_is_a_block_error(kind):
    params = {"kind": kind, **({"out_channels": 4} if "out_channels" in REGISTRY[kind].model_fields else {})}
    with pytest.raises(BlockError, match=r"feature map \(C, H, W\)") as exc:
        build(params, (16,))
    assert exc.value.field == "in"


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "instance_norm"])
def test_in_channels_mismatch_is_reported(kind):
    params = {
        "kind": kind,
        "in_channels": 32,
        **({"out_channels": 4} if "out_channels" in REGISTRY[kind].model_fields else {}),
    }
    with pytest.raises(BlockError) as exc:
        build(params, (16, 8, 8))
    assert exc.value.field == "in_channels"


@pytest.mark.parametrize(
    "params, in_shape, field, message",
    [
        ({"kind": "instance_norm"}, (4, 1, 1), "in", "more than one pixel"),
        ({"kind": "reflect_conv", "out_channels": 4, "kernel_size": 7}, (3, 3, 3), "padding", "reflection padding 3"),
        ({"kind": "reflect_conv", "out_channels": 4, "padding": 0, "norm": "none"}, (3, 2, 2), "in", "no output"),
        ({"kind": "reflect_conv", "out_channels": 4, "stride": 2}, (3, 2, 2), "norm", "1x1 map"),
        ({"kind": "resnet_block"}, (4, 1, 4), "in", "reflection padding 1"),
        ({"kind": "patch_conv", "out_channels": 4}, (4, 3, 3), "norm", "instance norm"),
        ({"kind": "patch_conv", "out_channels": 4, "norm": "none"}, (4, 1, 1), "in", "no output"),
        ({"kind": "patch_head"}, (4, 1, 5), "in", "no output"),
    ],
)
def test_inputs_too_small_are_block_errors(params, in_shape, field, message):
    with pytest.raises(BlockError, match=message) as exc:
        build(params, in_shape)
    assert exc.value.field == field


def test_patch_discriminator_on_a_16x16_image_leaves_too_few_pixels():
    with pytest.raises(BlockError, match="1x1 map"):
        run_chain(patch_discriminator((4, 8, 16, 32)), (3, 16, 16), meta=True)


@pytest.mark.parametrize(
    "params",
    [
        {"kind": "resnet_block", "channels": 64},  # channels come from the input
        {"kind": "reflect_conv", "out_channels": 4, "kernel": 7},
        {"kind": "reflect_conv", "out_channels": 4, "norm": "batch"},
        {"kind": "reflect_conv", "out_channels": 4, "activation": "gelu"},
        {"kind": "reflect_conv", "out_channels": 4, "padding_mode": "circular"},
        {"kind": "reflect_conv"},  # out_channels is required
        {"kind": "conv_up", "out_channels": 4, "stride": 2},
        {"kind": "patch_conv", "out_channels": 4, "kernel_size": 3},
        {"kind": "patch_conv", "out_channels": 4, "negative_slope": -0.2},
        {"kind": "patch_head", "out_channels": 1},
        {"kind": "instance_norm", "eps": 0},
        {"kind": "instance_norm", "momentum": 0.1},
    ],
)
def test_bad_params_are_validation_errors(params):
    with pytest.raises(ValidationError):
        REGISTRY[params["kind"]].model_validate({"in": "x", **params})


def test_every_field_is_described():
    for kind in KINDS:
        for name, info in REGISTRY[kind].model_fields.items():
            if name != "kind":
                assert info.description, f"{kind}.{name} has no description"
