"""SAGAN self-attention, as used by SAGAN and BigGAN."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn

from pipeline.blocks.basic import check_even, feature_map
from pipeline.blocks.registry import BlockError, Ref, Weighted, register


class SelfAttention(nn.Module):
    """theta, phi: 1x1 conv C -> C/8; g: C -> C/2; o: C/2 -> C; no biases. Keys and values are
    2x2 max-pooled (HW/4 of them); out = x + gamma * o(attention), gamma starting at 0."""

    def __init__(self, channels: int, ctx):
        super().__init__()
        self.theta = ctx.conv(channels, channels // 8, 1, bias=False)
        self.phi = ctx.conv(channels, channels // 8, 1, bias=False)
        self.g = ctx.conv(channels, channels // 2, 1, bias=False)
        self.o = ctx.conv(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))  # not 0-d: DeepSpeed cannot broadcast 0-d parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        query = rearrange(self.theta(x), "b c h w -> b (h w) c")
        key = rearrange(F.max_pool2d(self.phi(x), 2), "b c h w -> b c (h w)")
        value = rearrange(F.max_pool2d(self.g(x), 2), "b c h w -> b (h w) c")
        attn = torch.softmax(torch.bmm(query, key), dim=-1)  # (b, queries, keys)
        out = rearrange(torch.bmm(attn, value), "b (h w) c -> b c h w", h=h, w=w)
        return x + self.gamma * self.o(out)


@register
class AttentionNode(Weighted):
    """SAGAN self-attention block on a feature map."""

    kind: Literal["attention"]
    in_: Ref = Field(alias="in")
    resolution: int | None = Field(
        None,
        description=(
            "The feature-map resolution this attention is meant for (BigGAN's G_attn/D_attn); "
            "checked against the input."
        ),
    )

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        if self.resolution is not None and (h, w) != (self.resolution, self.resolution):
            raise BlockError(
                f"attention is placed at resolution {self.resolution}, but its input is {h}x{w}",
                "resolution",
                f"connect it to the node whose output is {self.resolution}x{self.resolution}, or set resolution: {h}",
            )
        if c % 8:
            raise BlockError(f"needs channels divisible by 8 (queries have C/8), got {c}", "in")
        check_even(inputs["in"], "attention's 2x2 pooling of keys")
        return SelfAttention(c, ctx)
