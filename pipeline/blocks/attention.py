"""SAGAN self-attention, as used by SAGAN and BigGAN."""

from __future__ import annotations

import contextlib
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
        # (b, 1 head, positions, channels): free views of channels-last feature maps
        query = rearrange(self.theta(x), "b c h w -> b 1 (h w) c")
        key = rearrange(F.max_pool2d(self.phi(x), 2), "b c h w -> b 1 (h w) c")
        value = rearrange(F.max_pool2d(self.g(x), 2), "b c h w -> b 1 (h w) c")
        out = rearrange(attend(query, key, value), "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.gamma * self.o(out)


_explicit = False  # see explicit_attention
_fused_on_meta = False  # see fused_attention_on_meta


@contextlib.contextmanager
def explicit_attention(on: bool = True):
    """While open (and `on`), attention runs by its explicit formula, softmax(q kᵀ) v with the map in
    memory, instead of the fused kernels: those have no second derivative, which a loss that
    differentiates D's gradient needs (R1, WGAN-GP's penalty, LOGAN's second-order step)."""
    global _explicit
    before, _explicit = _explicit, _explicit or on
    try:
        yield
    finally:
        _explicit = before


@contextlib.contextmanager
def fused_attention_on_meta():
    """While open, attention on the meta device runs the fused kernel's meta function (queries and
    keys zero-padded as on a real device) instead of the explicit formula, so that what autograd
    saves for the backward is what the fused kernels save (queries, keys, values, the output and
    one log-sum-exp per query), not the (queries x keys) map: memory estimates use it."""
    global _fused_on_meta
    before, _fused_on_meta = _fused_on_meta, True
    try:
        yield
    finally:
        _fused_on_meta = before


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(query keyᵀ) value, unscaled as in SAGAN, through scaled_dot_product_attention's fused
    kernels, which never hold the (queries x keys) map in memory: 4096 x 1024 per image at 64x64.
    Those kernels (flash, on CPU and GPU) need queries and keys as wide as the values (C/8 against
    C/2 here), so queries and keys are zero-padded, which changes no product. On the meta device
    (shape inference, FLOP counts: they count the model, not the padding; memory estimates open
    `fused_attention_on_meta`) and under `explicit_attention`, the explicit formula."""
    meta = query.device.type == "meta"
    if _explicit or (meta and not _fused_on_meta):
        return torch.softmax(query @ key.transpose(-2, -1), dim=-1) @ value
    pad = value.shape[-1] - query.shape[-1]
    if pad > 0:
        query, key = F.pad(query, (0, pad)), F.pad(key, (0, pad))
    # the fused kernels also need the channels contiguous (free for channels-last feature maps)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    if meta:  # fused_attention_on_meta: the flash kernel's meta function saves what the GPU kernels save
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=1.0)[0]
    return F.scaled_dot_product_attention(query, key, value, scale=1.0)


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
