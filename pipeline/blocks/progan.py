"""ProGAN layers (Karras et al. 2018) at a fixed resolution: pixel-normalised G blocks, D blocks,
the RGB converters, the minibatch standard deviation and D's final 4x4 block.

Layer gains follow the authors' TF code: equalized LR scales every weight by the He constant
sqrt(2 / fan_in), except `to_rgb` and D's last dense layer (gain 1, linear outputs) and G's first
dense layer (gain sqrt(2) / 4, kept from their Theano version).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from pipeline.blocks.basic import check_even, check_in_channels, feature_map, features
from pipeline.blocks.layers import PixelNorm, avgpool2, upsample2
from pipeline.blocks.registry import BlockError, InChannels, Node, Ref, Weighted, register

SLOPE = 0.2  # ProGAN's LeakyReLU slope everywhere


# ----- minibatch standard deviation -----
class MinibatchStddev(nn.Module):
    """Appends `num_features` maps holding the standard deviation of each feature over a group of
    samples, averaged over channels and pixels (ProGAN/StyleGAN). Sample i is in group i mod
    (batch / group); the group is min(group_size, batch) and must divide the batch."""

    batch_statistics = True  # see layers.batch_statistics

    def __init__(self, group_size: int, num_features: int, eps: float = 1e-8):
        super().__init__()
        self.group_size, self.num_features, self.eps = group_size, num_features, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = min(self.group_size, n)
        if n % group:
            raise ValueError(
                f"minibatch_stddev: the batch of {n} does not split into groups of {group}; "
                f"use a batch divisible by group_size {self.group_size}"
            )
        f = self.num_features
        # in float32 whatever the input's precision, as the authors' minibatch_stddev_layer
        y = x.float().reshape(group, -1, f, c // f, h, w)  # (group, num_groups, f, c/f, h, w)
        y = y - y.mean(dim=0)
        y = torch.sqrt(y.square().mean(dim=0) + self.eps)  # population std per feature
        y = y.mean(dim=(2, 3, 4))  # (num_groups, f)
        y = y.reshape(-1, f, 1, 1).repeat(group, 1, h, w).to(x.dtype)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_features={self.num_features}"


@register
class MinibatchStddevNode(Node):
    """ProGAN's minibatch standard deviation: adds `num_features` channels to a feature map."""

    kind: Literal["minibatch_stddev"]
    in_: Ref = Field(alias="in")
    group_size: PositiveInt = Field(4, description="Samples per group; min(group_size, batch) must divide the batch.")
    num_features: PositiveInt = Field(1, description="Channels added; the input's channels are split among them.")

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        if c % self.num_features:
            raise BlockError(f"{c} channels do not split into {self.num_features} groups", "num_features")
        return MinibatchStddev(self.group_size, self.num_features)


# ----- RGB converters -----
@register
class ToRGBNode(Weighted):
    """1x1 conv from features to image channels, no activation (ProGAN's toRGB)."""

    kind: Literal["to_rgb"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt | None = Field(None, description="Default: data.channels.")

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        return ctx.conv(c, self.out_channels or ctx.image_channels, 1, gain=1.0)


class FromRGB(nn.Module):
    def __init__(self, c_in: int, c_out: int, ctx):
        super().__init__()
        self.conv = ctx.conv(c_in, c_out, 1)

    def forward(self, x):
        return F.leaky_relu(self.conv(x), SLOPE)


@register
class FromRGBNode(Weighted):
    """1x1 conv from the image to features, then LeakyReLU 0.2 (ProGAN's fromRGB)."""

    kind: Literal["from_rgb"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        return FromRGB(c, self.out_channels, ctx)


# ----- generator -----
class ConvAct(nn.Module):
    """3x3 conv, LeakyReLU 0.2, and pixel norm when `pixel_norm` (the G convs)."""

    def __init__(self, c_in: int, c_out: int, pixel_norm: bool, ctx):
        super().__init__()
        self.conv = ctx.conv(c_in, c_out, 3)
        self.norm = PixelNorm() if pixel_norm else nn.Identity()

    def forward(self, x):
        return self.norm(F.leaky_relu(self.conv(x), SLOPE))


class ProGANUp(nn.Module):
    """[nearest x2], (3x3 conv, LeakyReLU, pixel norm) x 2."""

    def __init__(self, c_in: int, c_out: int, upsample: bool, ctx):
        super().__init__()
        self.upsample = upsample
        self.conv1 = ConvAct(c_in, c_out, True, ctx)
        self.conv2 = ConvAct(c_out, c_out, True, ctx)

    def forward(self, x):
        return self.conv2(self.conv1(upsample2(x) if self.upsample else x))


@register
class ProGANUpNode(Weighted):
    """ProGAN generator block: [nearest upsample x2], then twice 3x3 conv, LeakyReLU 0.2, pixel norm."""

    kind: Literal["progan_up"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    in_channels: InChannels = None
    upsample: bool = Field(True, description="Double the resolution (nearest neighbour) first.")

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        return ProGANUp(c, self.out_channels, self.upsample, ctx)


class ProGANInput(nn.Module):
    """[pixel norm z], dense z -> C x 4 x 4 with one bias per channel, LeakyReLU, pixel norm,
    then 3x3 conv, LeakyReLU, pixel norm."""

    def __init__(self, z_dim: int, c_out: int, normalize_latent: bool, ctx):
        super().__init__()
        self.c_out = c_out
        self.latent_norm = PixelNorm() if normalize_latent else nn.Identity()
        # Gain sqrt(2)/4 on fan_in z_dim = He's constant for a 4x4 kernel: the authors' Theano G
        # started with a 4x4 transposed conv on a 1x1 map.
        self.dense = ctx.linear(z_dim, c_out * 16, bias=False, gain=math.sqrt(2.0) / 4)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.norm = PixelNorm()
        self.conv = ConvAct(c_out, c_out, True, ctx)

    def forward(self, z):
        h = self.dense(self.latent_norm(z)).view(-1, self.c_out, 4, 4) + self.bias.view(1, -1, 1, 1)
        return self.conv(self.norm(F.leaky_relu(h, SLOPE)))


@register
class ProGANInputNode(Weighted):
    """ProGAN's first generator block: latent z -> out_channels x 4 x 4."""

    kind: Literal["progan_input"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    normalize_latent: bool = Field(True, description="Pixel-normalise z first (ProGAN: true).")

    def build(self, inputs, ctx):
        return ProGANInput(features(inputs["in"], "latent"), self.out_channels, self.normalize_latent, ctx)


# ----- discriminator -----
class ProGANDown(nn.Module):
    """3x3 conv in -> hidden, LeakyReLU, 3x3 conv hidden -> out, then the 2x2 average pool before
    the second LeakyReLU (`act_after_pool`) or after it."""

    def __init__(self, c_in: int, hidden: int, c_out: int, downsample: bool, act_after_pool: bool, ctx):
        super().__init__()
        self.downsample, self.act_after_pool = downsample, act_after_pool
        self.conv1 = ConvAct(c_in, hidden, False, ctx)
        self.conv2 = ConvAct(hidden, c_out, False, ctx)

    def forward(self, x):
        h = self.conv1(x)
        if not self.downsample:
            return self.conv2(h)
        if self.act_after_pool:  # the pool of a per-channel bias is that bias: lrelu(pool(conv(h)) + b)
            return F.leaky_relu(avgpool2(self.conv2.conv(h)), SLOPE)
        return avgpool2(self.conv2(h))


@register
class ProGANDownNode(Weighted):
    """ProGAN discriminator block: two 3x3 convs with LeakyReLU 0.2, then 2x2 average pooling."""

    kind: Literal["progan_down"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    in_channels: InChannels = None
    hidden_channels: PositiveInt | None = Field(
        None, description=("Output channels of the first conv; default: the input's channels.")
    )
    downsample: bool = Field(True, description="Halve the resolution (2x2 average pooling).")
    act_after_pool: bool = Field(
        True,
        description="Pool the second conv's output before its LeakyReLU: the authors' default D (networks.py "
        "D_paper, fused_scale=True: conv2d_downscale2d, then bias and activation); false pools after it (their "
        "fused_scale=False).",
    )

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        if self.downsample:
            check_even(inputs["in"], "downsampling")
        return ProGANDown(c, self.hidden_channels or c, self.out_channels, self.downsample, self.act_after_pool, ctx)


class ProGANOutput(nn.Module):
    """3x3 conv, LeakyReLU, 4x4 conv without padding (a dense layer on the 4x4 map), LeakyReLU,
    linear to one logit."""

    def __init__(self, c_in: int, channels: int, ctx):
        super().__init__()
        self.conv = ConvAct(c_in, channels, False, ctx)
        self.dense = ctx.conv(channels, channels, 4, padding=0)
        self.logit = ctx.linear(channels, 1, gain=1.0)

    def forward(self, x):
        h = F.leaky_relu(self.dense(self.conv(x)), SLOPE)
        return self.logit(h.flatten(1))


@register
class ProGANOutputNode(Weighted):
    """ProGAN's last discriminator block on the 4x4 map (put minibatch_stddev before it) -> one logit."""

    kind: Literal["progan_output"]
    in_: Ref = Field(alias="in")
    channels: PositiveInt = Field(description="Channels of the 3x3 conv and of the 4x4 dense layer (ProGAN: 512).")

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        if (h, w) != (4, 4):
            raise BlockError(
                f"expects the 4x4 feature map, got {h}x{w}",
                "in",
                "downsample to 4x4 first (one progan_down per halving)",
            )
        return ProGANOutput(c, self.channels, ctx)
