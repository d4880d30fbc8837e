"""DCGAN blocks (Radford et al. 2016): strided (transposed) convolutions with BatchNorm."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from pipeline.blocks.basic import check_in_channels, check_kernel_fits, feature_map
from pipeline.blocks.registry import BlockError, InChannels, Ref, Weighted, register

BIAS = (
    "A bias on the conv. false: the DCGAN code's (pytorch/examples dcgan/main.py, bias=False on every conv; "
    "BatchNorm's shift takes its place)."
)


def dcgan_batch_norm(channels: int, ctx) -> nn.Module:
    """BatchNorm; under `init: normal` its gain starts at N(1, 0.02), as in the DCGAN code."""
    bn = ctx.batch_norm(channels)
    if ctx.init == "normal" and not ctx.meta:
        nn.init.normal_(bn.weight, 1.0, 0.02)
        nn.init.zeros_(bn.bias)
    return bn


class DCGANUp(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride, padding, norm, bias, ctx):
        super().__init__()
        self.conv = ctx.conv_transpose(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=bias)
        self.bn = dcgan_batch_norm(c_out, ctx) if norm else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@register
class DCGANUpNode(Weighted):
    """DCGAN generator layer: transposed conv (k4 s2 p1 doubles H and W), BatchNorm, ReLU. With
    kernel_size 4, stride 1, padding 0 on z reshaped to (z_dim, 1, 1) it is the first layer (-> 4x4)."""

    kind: Literal["dcgan_up"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    in_channels: InChannels = None
    kernel_size: PositiveInt = 4
    stride: PositiveInt = 2
    padding: int = Field(1, ge=0)
    norm: bool = Field(True, description="BatchNorm after the transposed conv.")
    bias: bool = Field(False, description=BIAS)

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        check_in_channels(self, c)
        out = (min(h, w) - 1) * self.stride - 2 * self.padding + self.kernel_size
        if out < 1:
            raise BlockError(
                f"kernel {self.kernel_size}, stride {self.stride}, padding {self.padding} leave "
                f"no output on the {h}x{w} input",
                "padding",
            )
        return DCGANUp(c, self.out_channels, self.kernel_size, self.stride, self.padding, self.norm, self.bias, ctx)


class DCGANDown(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride, padding, norm, bias, negative_slope, ctx):
        super().__init__()
        self.negative_slope = negative_slope
        self.conv = ctx.conv(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=bias)
        self.bn = dcgan_batch_norm(c_out, ctx) if norm else nn.Identity()

    def forward(self, x):
        return F.leaky_relu(self.bn(self.conv(x)), self.negative_slope)


@register
class DCGANDownNode(Weighted):
    """DCGAN discriminator layer: strided conv (k4 s2 p1 halves H and W), BatchNorm, LeakyReLU 0.2."""

    kind: Literal["dcgan_down"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    in_channels: InChannels = None
    kernel_size: PositiveInt = 4
    stride: PositiveInt = 2
    padding: int = Field(1, ge=0)
    norm: bool = Field(True, description="BatchNorm after the conv; false for the layer on the image.")
    bias: bool = Field(False, description=BIAS)
    negative_slope: float = Field(0.2, ge=0)

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        check_kernel_fits(inputs["in"], self.kernel_size, self.padding)
        return DCGANDown(
            c,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.norm,
            self.bias,
            self.negative_slope,
            ctx,
        )
