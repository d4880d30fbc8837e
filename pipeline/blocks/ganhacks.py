"""Blocks for the "How to train a GAN" tips (Chintala et al., ganhacks): layer norm, PixelShuffle
upsampling, Gaussian noise and dropout in G, and minibatch discrimination in D.

Instance norm is `instance_norm` (translation.py), pixel norm `pixel_norm`, minibatch standard
deviation `minibatch_stddev` (progan.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from pipeline.blocks.basic import check_in_channels, feature_map, features
from pipeline.blocks.registry import BlockError, InChannels, Node, Ref, Weighted, register


# ----- normalisation -----
@register
class LayerNormNode(Node):
    """Layer norm (Ba et al. 2016): each sample normalised over all its features (C, H, W together),
    with a learned gain and bias per channel. No batch statistics."""

    kind: Literal["layer_norm"]
    in_: Ref = Field(alias="in", description="A feature vector (C,) or a feature map (C, H, W).")
    eps: float = Field(1e-5, gt=0, description="Added to the variance before the square root.")

    def build(self, inputs, ctx):
        shape = inputs["in"]
        return nn.GroupNorm(1, shape[0], eps=self.eps) if len(shape) == 3 else nn.LayerNorm(shape[0], eps=self.eps)


# ----- upsampling -----
class PixelShuffleUp(nn.Module):
    def __init__(self, conv: nn.Module, factor: int):
        super().__init__()
        self.conv, self.shuffle = conv, nn.PixelShuffle(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


@register
class PixelShuffleNode(Weighted):
    """Sub-pixel upsampling (Shi et al. 2016): a conv to out_channels x factor^2 channels, rearranged
    into a factor-times larger map. Every output pixel gets its own weights, without the
    checkerboard of a strided transposed conv (ganhacks: avoid sparse gradients)."""

    kind: Literal["pixel_shuffle"]
    in_: Ref = Field(alias="in", description="A feature map (C, H, W).")
    out_channels: PositiveInt = Field(description="Channels after the shuffle.")
    in_channels: InChannels = None
    factor: PositiveInt = Field(2, description="Upsampling factor of H and W.")
    kernel_size: PositiveInt = Field(3, description="Kernel of the conv before the shuffle ('same' padding).")

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        if self.kernel_size % 2 == 0:
            raise BlockError("kernel_size must be odd for 'same' padding", "kernel_size")
        conv = ctx.conv(c, self.out_channels * self.factor**2, self.kernel_size, padding=self.kernel_size // 2)
        return PixelShuffleUp(conv, self.factor)


# ----- stochastic layers of G -----
class GaussianNoise(nn.Module):
    def __init__(self, std: float, always_on: bool):
        super().__init__()
        self.std, self.always_on = std, always_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.always_on):
            return x
        return x + self.std * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"std={self.std}, always_on={self.always_on}"


@register
class GaussianNoiseNode(Node):
    """Adds N(0, std^2) noise to its input (ganhacks: noise in G's layers, as in EBGAN's generator).
    In training only, unless `always_on`."""

    kind: Literal["gaussian_noise"]
    in_: Ref = Field(alias="in")
    std: float = Field(0.1, gt=0, description="Standard deviation of the noise.")
    always_on: bool = Field(False, description="Also in evaluation mode (sampling and eval keep it).")

    def build(self, inputs, ctx):
        return GaussianNoise(self.std, self.always_on)


class Dropout(nn.Module):
    def __init__(self, p: float, always_on: bool):
        super().__init__()
        self.p, self.always_on = p, always_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=self.training or self.always_on)

    def extra_repr(self) -> str:
        return f"p={self.p}, always_on={self.always_on}"


@register
class DropoutNode(Node):
    """Dropout. ganhacks (after pix2pix): dropout in several layers of G as its noise, at train and
    at test time: `always_on: true` keeps it in evaluation mode, so `sample` and `eval` drop too."""

    kind: Literal["dropout"]
    in_: Ref = Field(alias="in")
    p: float = Field(0.5, ge=0, lt=1, description="Probability of zeroing each value (survivors scaled 1/(1-p)).")
    always_on: bool = Field(False, description="Also in evaluation mode (ganhacks: true).")

    def build(self, inputs, ctx):
        return Dropout(self.p, self.always_on)


# ----- minibatch discrimination -----
class MinibatchDiscrimination(nn.Module):
    """Salimans et al. 2016, section 3.2: M_i = f(x_i) T, a B x C matrix per sample; for each of the
    B kernels, o(x_i)_b = sum_j exp(-||M_i,b - M_j,b||_1) over the batch (j = i included, as in the
    paper's formula); the output is f(x_i) with o(x_i) appended."""

    batch_statistics = True  # see layers.batch_statistics

    def __init__(self, in_features: int, kernels: int, kernel_dim: int):
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        self.T = nn.Parameter(torch.randn(in_features, kernels * kernel_dim) * 0.1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        m = (f @ self.T).view(-1, self.kernels, self.kernel_dim)  # (N, B, C)
        l1 = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(-1)  # (N, N, B)
        return torch.cat([f, torch.exp(-l1).sum(1)], dim=1)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}, kernel_dim={self.kernel_dim}"


@register
class MinibatchDiscriminationNode(Node):
    """Minibatch discrimination (Salimans et al. 2016): appends `kernels` features telling how
    close each sample is to the others of its batch, so D can see a collapsed batch."""

    kind: Literal["minibatch_discrimination"]
    in_: Ref = Field(alias="in", description="A feature vector (A,); reshape a feature map first.")
    kernels: PositiveInt = Field(100, description="B, the features appended (the paper's CIFAR-10 model: 100).")
    kernel_dim: PositiveInt = Field(5, description="C, the rows of each kernel's matrix (the paper: 5).")

    def build(self, inputs, ctx):
        a = features(inputs["in"])
        return MinibatchDiscrimination(a, self.kernels, self.kernel_dim)
