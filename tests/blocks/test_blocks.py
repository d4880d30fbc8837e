"""Core block kinds: forward shapes on real tensors, the formulas behind them, and the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.blocks import REGISTRY, BlockError
from pipeline.blocks.layers import BuildContext, SpectralNorm
from pipeline.blocks.registry import Node, register


def build(params: dict, inputs: dict, **ctx_changes):
    node = REGISTRY[params["kind"]].model_validate(params)
    ctx = BuildContext(num_classes=10, image_channels=3, meta=False, **ctx_changes)
    return node.build(inputs, ctx.for_node(node))


X = (4, 16, 8, 8)  # a feature map with its batch
Z = (4, 32)  # a feature vector
Y = ()  # labels
# kind -> (params, inputs as {key: per-sample shape or list of them}, expected output shape with batch 4)
CASES = [
    ({"kind": "linear", "in": "z", "out_features": 7}, {"in": (32,)}, (4, 7)),
    ({"kind": "conv", "in": "x", "out_channels": 8}, {"in": X[1:]}, (4, 8, 8, 8)),
    (
        {"kind": "conv", "in": "x", "out_channels": 8, "kernel_size": 4, "stride": 2, "padding": 1},
        {"in": X[1:]},
        (4, 8, 4, 4),
    ),
    ({"kind": "conv_transpose", "in": "x", "out_channels": 8}, {"in": X[1:]}, (4, 8, 16, 16)),
    ({"kind": "embedding", "in": "y", "embedding_dim": 5}, {"in": Y}, (4, 5)),
    ({"kind": "concat", "in": ["a", "b"]}, {"in": [X[1:], (4, 8, 8)]}, (4, 20, 8, 8)),
    ({"kind": "add", "in": ["a", "b"]}, {"in": [X[1:], X[1:]]}, X),
    ({"kind": "reshape", "in": "z", "shape": [2, 4, 4]}, {"in": (32,)}, (4, 2, 4, 4)),
    ({"kind": "reshape", "in": "x", "shape": [-1]}, {"in": X[1:]}, (4, 1024)),
    ({"kind": "batch_norm", "in": "x"}, {"in": X[1:]}, X),
    ({"kind": "batch_norm", "in": "z"}, {"in": (32,)}, Z),
    ({"kind": "cond_batch_norm", "in": "x", "cond": "c"}, {"in": X[1:], "cond": (6,)}, X),
    ({"kind": "pixel_norm", "in": "x"}, {"in": X[1:]}, X),
    ({"kind": "relu", "in": "x"}, {"in": X[1:]}, X),
    ({"kind": "leaky_relu", "in": "x"}, {"in": X[1:]}, X),
    ({"kind": "tanh", "in": "x"}, {"in": X[1:]}, X),
    ({"kind": "upsample", "in": "x"}, {"in": X[1:]}, (4, 16, 16, 16)),
    ({"kind": "avg_pool", "in": "x"}, {"in": X[1:]}, (4, 16, 4, 4)),
    ({"kind": "sum_pool", "in": "x"}, {"in": X[1:]}, (4, 16)),
    ({"kind": "attention", "in": "x", "resolution": 8}, {"in": X[1:]}, X),
    ({"kind": "biggan_up", "in": "x", "cond": "c", "out_channels": 8}, {"in": X[1:], "cond": (6,)}, (4, 8, 16, 16)),
    (
        {"kind": "biggan_up", "in": "x", "out_channels": 8, "norm": "none", "upsample": False},
        {"in": X[1:]},
        (4, 8, 8, 8),
    ),
    (
        {"kind": "biggan_deep_up", "in": "x", "cond": "c", "out_channels": 8},
        {"in": X[1:], "cond": (6,)},
        (4, 8, 16, 16),
    ),
    (
        {"kind": "biggan_deep_up", "in": "x", "cond": "c", "out_channels": 16, "upsample": False},
        {"in": X[1:], "cond": (6,)},
        X,
    ),
    ({"kind": "biggan_down", "in": "x", "out_channels": 32}, {"in": X[1:]}, (4, 32, 4, 4)),
    (
        {"kind": "biggan_down", "in": "x", "out_channels": 16, "downsample": False, "preactivation": False},
        {"in": X[1:]},
        X,
    ),
    ({"kind": "biggan_deep_down", "in": "x", "out_channels": 32}, {"in": X[1:]}, (4, 32, 4, 4)),
    ({"kind": "g_output", "in": "x"}, {"in": X[1:]}, (4, 3, 8, 8)),
    ({"kind": "d_head", "in": "x", "y": "y"}, {"in": X[1:], "y": Y}, (4, 1)),
    ({"kind": "d_head", "in": "x"}, {"in": X[1:]}, (4, 1)),
    # the ganhacks kinds (their behaviour: test_ganhacks.py)
    ({"kind": "layer_norm", "in": "x"}, {"in": X[1:]}, X),
    ({"kind": "layer_norm", "in": "z"}, {"in": (32,)}, Z),
    ({"kind": "pixel_shuffle", "in": "x", "out_channels": 8}, {"in": X[1:]}, (4, 8, 16, 16)),
    ({"kind": "gaussian_noise", "in": "x"}, {"in": X[1:]}, X),
    ({"kind": "dropout", "in": "z", "always_on": True}, {"in": (32,)}, Z),
    ({"kind": "minibatch_discrimination", "in": "z", "kernels": 10}, {"in": (32,)}, (4, 42)),
]


def make_args(node_params: dict, inputs: dict):
    node = REGISTRY[node_params["kind"]].model_validate(node_params)
    args = []
    for _, key, mode in node.ref_fields():
        shape = inputs.get(key)
        if shape is None:
            args.append(None)
        elif mode == "many":
            args.append([torch.randn((4,) + s) for s in shape])
        elif shape == ():
            args.append(torch.randint(0, 10, (4,)))
        else:
            args.append(torch.randn((4,) + shape))
    return args


@pytest.mark.parametrize("params, inputs, out_shape", CASES, ids=[f"{c[0]['kind']}-{i}" for i, c in enumerate(CASES)])
def test_forward_shape(params, inputs, out_shape):
    module = build(params, inputs, sn=True)
    out = module(*make_args(params, inputs))
    assert tuple(out.shape) == out_shape
    assert torch.isfinite(out).all()


def test_every_registered_kind_has_a_forward_test(family_block_kinds):
    covered = {c[0]["kind"] for c in CASES} | {"split"}  # the families' kinds: test_family_blocks.py
    assert set(REGISTRY) - family_block_kinds - covered == set()


def test_split_outputs_chunks():
    module = build({"kind": "split", "in": "z", "num_chunks": 4}, {"in": (32,)})
    z = torch.randn(4, 32)
    chunks = module(z)
    assert len(chunks) == 4 and all(c.shape == (4, 8) for c in chunks)
    assert torch.equal(torch.cat(chunks, 1), z)


def test_registry_rejects_duplicates():
    from typing import Literal

    with pytest.raises(KeyError, match="registered twice"):

        @register
        class Again(Node):
            kind: Literal["conv"]


def test_cond_batch_norm_formula():
    module = build({"kind": "cond_batch_norm", "in": "x", "cond": "c"}, {"in": X[1:], "cond": (6,)})
    x, c = torch.randn(X), torch.randn(4, 6)
    normed = F.batch_norm(x, None, None, training=True, eps=1e-5)
    expected = normed * (1 + module.gain(c))[:, :, None, None] + module.bias(c)[:, :, None, None]
    assert torch.allclose(module(x, c), expected, atol=1e-5)


def test_attention_starts_as_identity_then_mixes():
    module = build({"kind": "attention", "in": "x"}, {"in": X[1:]})
    x = torch.randn(X)
    assert torch.equal(module(x), x)  # gamma starts at 0
    with torch.no_grad():
        module.gamma.fill_(1.0)
    # moving one pixel changes the output at other pixels: attention is non-local
    x2 = x.clone()
    x2[:, :, 0, 0] += 5
    diff = (module(x2) - module(x)).abs().sum(1)
    assert diff[:, 7, 7].min() > 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_attention_is_sagans_formula_through_the_fused_kernel(channels_last):
    """softmax(theta(x)ᵀ phi(x)) g(x), unscaled, over 2x2-pooled keys and values: the padded
    scaled_dot_product_attention path gives the explicit map's outputs and gradients."""
    torch.manual_seed(0)
    module = build({"kind": "attention", "in": "x"}, {"in": (32, 8, 8)})
    with torch.no_grad():
        module.gamma.fill_(0.7)
    x = torch.randn(4, 32, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def explicit(x):
        q = module.theta(x).flatten(2).transpose(1, 2)  # (b, 64, 4)
        k = F.max_pool2d(module.phi(x), 2).flatten(2)  # (b, 4, 16)
        v = F.max_pool2d(module.g(x), 2).flatten(2).transpose(1, 2)  # (b, 16, 16)
        attn = torch.softmax(q @ k, dim=-1)
        return x + module.gamma * module.o((attn @ v).transpose(1, 2).reshape(4, 16, 8, 8))

    module.eval()  # the SN power iteration of the first call must not change the second's weights
    out, expected = module(x), explicit(x)
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, module.gamma), grad)
    want = torch.autograd.grad(expected, (x, module.gamma), grad)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_parametrized_layers_of_one_kind_share_a_class_so_compiled_blocks_are_shared():
    import copy

    ctx = BuildContext(num_classes=10, image_channels=3, sn=True, meta=False)
    a, b = ctx.conv(8, 8), ctx.conv(8, 16, 1)
    assert type(a) is type(b) and type(ctx.linear(4, 4)) is not type(a)
    assert isinstance(a, nn.Conv2d) and type(copy.deepcopy(a)) is type(a)
    assert list(a.state_dict()) == ["bias", "parametrizations.weight.original", "parametrizations.weight.0._u",
                                    "parametrizations.weight.0._v"]  # fmt: skip


def test_biggan_deep_up_skip_drops_channels():
    module = build({"kind": "biggan_deep_up", "in": "x", "cond": "c", "out_channels": 8}, {"in": X[1:], "cond": (6,)})
    with torch.no_grad():
        module.conv4.weight.zero_()
        module.conv4.bias.zero_()
    x = torch.randn(X)
    assert torch.equal(module(x, torch.randn(4, 6)), F.interpolate(x[:, :8], scale_factor=2))


def test_biggan_deep_down_skip_concatenates():
    module = build({"kind": "biggan_deep_down", "in": "x", "out_channels": 32}, {"in": X[1:]})
    with torch.no_grad():
        module.conv4.weight.zero_()
        module.conv4.bias.zero_()
    x = torch.randn(X)
    pooled = F.avg_pool2d(x, 2)
    assert torch.allclose(module(x), torch.cat([pooled, module.conv_sc(pooled)], 1), atol=1e-6)


def test_g_output_conv_channels_keeps_the_first_image_channels():
    """TF-Hub's BigGAN-deep: the conv maps to more channels (spectral norm over all of them), the
    image is the first 3."""
    module = build({"kind": "g_output", "in": "x", "conv_channels": 16, "sn": True}, {"in": X[1:]})
    x = torch.randn(X)
    with torch.no_grad():
        module.bn.running_mean.normal_()
        module.eval()
        h = F.relu(module.bn(x))
        weight = module.conv.weight  # the whole 16-channel weight over its spectral norm
        assert weight.shape == (16, 16, 3, 3)
        expected = torch.tanh(F.conv2d(h, weight, module.conv.bias, padding=1)[:, :3])
        assert torch.allclose(module(x), expected, atol=1e-6)
    with pytest.raises(BlockError, match="below the image's 3 channels"):
        build({"kind": "g_output", "in": "x", "conv_channels": 2}, {"in": X[1:]})


def test_d_head_projection_formula():
    module = build({"kind": "d_head", "in": "x", "y": "y"}, {"in": X[1:], "y": Y})
    x, y = torch.randn(X), torch.randint(0, 10, (4,))
    h = F.relu(x).sum((2, 3))
    expected = module.linear(h) + (module.embed(y) * h).sum(1, keepdim=True)
    assert torch.allclose(module(x, y), expected, atol=1e-5)


def test_spectral_norm_converges_to_unit_sigma():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    w = layer.weight.detach().clone()
    sn = SpectralNorm(w, eps=1e-6)
    for _ in range(50):
        effective = sn(w)
    assert abs(torch.linalg.matrix_norm(effective, ord=2).item() - 1) < 1e-3
    sn.eval()
    u = sn._u.clone()
    sn(w)
    assert torch.equal(u, sn._u)  # no power iteration in eval mode


def test_spectral_norm_one_training_iteration_formula():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    sn = SpectralNorm(w, eps=1e-12)
    u0 = sn._u.clone()
    mat = w.flatten(1)
    v = F.normalize(mat.T @ u0, dim=0)  # BigGAN-PyTorch's order: v from the stored u, then u from v
    u = F.normalize(mat @ v, dim=0)
    assert torch.allclose(sn(w), w / (u @ mat @ v), atol=1e-6)
    assert torch.allclose(sn._u, u, atol=1e-6)


def test_block_errors_name_the_field():
    with pytest.raises(BlockError) as info:
        build({"kind": "attention", "in": "x"}, {"in": (12, 8, 8)})
    assert "divisible by 8" in info.value.message
    with pytest.raises(BlockError) as info:
        build({"kind": "avg_pool", "in": "x", "size": 3}, {"in": X[1:]})
    assert info.value.field == "size"
    with pytest.raises(BlockError) as info:
        build({"kind": "reshape", "in": "z", "shape": [3, 3]}, {"in": (32,)})
    assert "cannot reshape" in info.value.message


def test_spectral_norm_of_bf16_weights_keeps_fp32_state():
    w = torch.randn(16, 8)
    sn = SpectralNorm(w, eps=1e-6)
    out = sn(w.to(torch.bfloat16))  # DeepSpeed's bf16 casts parameters, not the u/v buffers
    assert out.dtype == torch.bfloat16 and sn._u.dtype == torch.float32
    assert torch.allclose(out.float(), sn(w), atol=2e-2)


def test_baked_parametrizations_give_the_same_outputs_as_plain_weights():
    from torch.nn.utils import parametrize

    from pipeline.blocks.layers import bake_parametrizations

    torch.manual_seed(0)
    ctx = BuildContext(num_classes=10, image_channels=3, meta=False, sn=True, init="equalized_lr")
    # two layers of each class: their parametrized class is shared (_share_parametrized_class),
    # so unparametrizing one must leave the other's weight alone
    net = nn.Sequential(ctx.conv(3, 8), ctx.conv(8, 8), nn.Flatten(), ctx.linear(8 * 4 * 4, 5), ctx.linear(5, 5)).eval()
    x = torch.randn(2, 3, 4, 4)
    want = net(x)
    expected = [layer.weight.detach().clone() for layer in (net[0], net[1], net[3], net[4])]
    # equalized LR then spectral norm: the baked weight is both, as the parametrized one is
    first = net[0].parametrizations.weight
    sigma_free = first.original * first[0].scale
    torch.testing.assert_close(expected[0], first[1](sigma_free))
    bake_parametrizations(net)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert [type(m) for m in net] == [nn.Conv2d, nn.Conv2d, nn.Flatten, nn.Linear, nn.Linear]
    for layer, weight in zip((net[0], net[1], net[3], net[4]), expected, strict=True):
        assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight, weight)
    assert not any(name.endswith(("_u", "_v", "original")) for name in net.state_dict())
    torch.testing.assert_close(net(x), want, rtol=0, atol=1e-6)
