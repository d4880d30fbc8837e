"""The U-Net discriminator's per-pixel head (Schonfeld et al. 2020). The authors' code
(boschresearch/unetgan `BigGAN.py:Unet_Discriminator`) ends in `last_layer`, a plain 1x1
nn.Conv2d with a bias, plus the projection sum(embed(y) * h) through a spectral-norm embedding,
both on the raw features. The rest of the U-Net D is made of existing kinds: biggan_down
encoder, d_head at the bottleneck, biggan_up (norm: none) decoder with concat skip connections."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.blocks.basic import feature_map
from pipeline.blocks.registry import BlockError, Ref, Weighted, register


class PixelHead(nn.Module):
    """[ReLU], 1x1 conv to one logit per pixel, plus the per-pixel class projection
    sum_c embed(y)_c * h_c when conditional."""

    def __init__(self, channels: int, num_classes: int, relu: bool, conv_sn: bool, ctx):
        super().__init__()
        self.relu = relu
        self.conv = ctx.conv(channels, 1, 1, sn=conv_sn)
        self.embed = ctx.embedding(num_classes, channels) if num_classes else None

    def forward(self, x, y=None):
        h = F.relu(x) if self.relu else x
        out = self.conv(h)
        if self.embed is not None:
            out = out + (self.embed(y)[:, :, None, None] * h).sum(dim=1, keepdim=True)
        return out


@register
class PixelHeadNode(Weighted):
    """U-Net discriminator decoder head: one logit per pixel, (C, H, W) -> (1, H, W), with the
    projection of `y` at every pixel when `y` is given."""

    kind: Literal["pixel_head"]
    in_: Ref = Field(alias="in")
    y: Ref | None = Field(None, description="Class labels for the projection; leave out for an unconditional D.")
    relu: bool = Field(
        False,
        description="ReLU on the features before the convolution and the projection (false: the authors' code, "
        "which feeds the decoder's last block raw; BigGAN's D head takes a ReLU first).",
    )
    conv_sn: bool = Field(
        False,
        description="Spectral norm on the 1x1 convolution (false: the authors' `last_layer` is a plain "
        "nn.Conv2d with a bias). The class embedding follows the node's `sn`, spectral in the authors' code.",
    )

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        if self.y is not None and inputs["y"] != ():
            raise BlockError(f"`y` must be the class labels (graph input y), got shape {inputs['y']}", "y")
        return PixelHead(c, ctx.num_classes if self.y is not None else 0, self.relu, self.conv_sn, ctx)
