"""BigGAN and BigGAN-deep residual blocks, and the G and D heads (Brock et al., 2019)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from pipeline.blocks.basic import check_even, check_in_channels, feature_map, features
from pipeline.blocks.layers import avgpool2, upsample2
from pipeline.blocks.registry import BlockError, InChannels, Joined, Ref, Weighted, register


class _Norm(nn.Module):
    """One norm slot of a block: conditional BN, plain BN or nothing, called as norm(x, cond)."""

    def __init__(self, mode: str, channels: int, cond_features: int | None, ctx):
        super().__init__()
        self.mode = mode
        if mode == "cbn":
            self.bn = ctx.cond_batch_norm(channels, cond_features)
        elif mode == "class_bn":
            self.bn = ctx.class_batch_norm(channels)
        elif mode == "bn":
            self.bn = ctx.batch_norm(channels)

    def forward(self, x, cond):
        if self.mode in ("cbn", "class_bn"):
            return self.bn(x, cond)
        return self.bn(x) if self.mode == "bn" else x


class _UpBlockNode(Weighted):
    """Shared fields of the generator blocks."""

    in_: Ref = Field(alias="in")
    cond: Joined | None = Field(
        None, description="Conditioning vector(s) for conditional BN, concatenated; the labels y for class_bn."
    )
    out_channels: PositiveInt
    in_channels: InChannels = None
    upsample: bool = Field(True, description="Double the resolution (nearest neighbour).")
    norm: Literal["cbn", "class_bn", "bn", "none"] | None = Field(
        None,
        description="cbn: BatchNorm with gain 1 + Linear(cond) and bias Linear(cond) (BigGAN); class_bn: a gain "
        "and a bias per class, looked up by the labels in `cond` (SAGAN's code); bn; none. Default: cbn with "
        "`cond`, else bn.",
    )

    @model_validator(mode="after")
    def _norm_matches_cond(self):
        if self.norm in ("cbn", "class_bn") and self.cond is None:
            raise ValueError(f"norm {self.norm} needs `cond`, the conditioning input")
        if self.cond is not None and self.norm in ("bn", "none"):
            raise ValueError(f"`cond` is given but norm is {self.norm}: use norm cbn or drop cond")
        return self

    def norm_mode(self) -> str:
        return self.norm or ("cbn" if self.cond else "bn")

    def shapes(self, inputs):
        c, h, w = feature_map(inputs["in"])
        check_in_channels(self, c)
        if self.norm_mode() == "class_bn":
            if inputs["cond"] != ():
                raise BlockError(
                    f"class_bn looks its gain and bias up by class: `cond` must be the labels y, got shape "
                    f"{inputs['cond']}",
                    "cond",
                )
            return c, None
        cond = features(inputs["cond"], "condition", "cond") if self.cond else None
        return c, cond


class GBlock(nn.Module):
    """BigGAN G block: norm, ReLU, [up], 3x3 conv, norm, ReLU, 3x3 conv; shortcut [up], 1x1 conv."""

    def __init__(self, c_in, c_out, cond, norm, upsample, ctx):
        super().__init__()
        self.upsample = upsample
        self.bn1 = _Norm(norm, c_in, cond, ctx)
        self.conv1 = ctx.conv(c_in, c_out, 3)
        self.bn2 = _Norm(norm, c_out, cond, ctx)
        self.conv2 = ctx.conv(c_out, c_out, 3)
        self.conv_sc = ctx.conv(c_in, c_out, 1) if (c_in != c_out or upsample) else None

    def forward(self, x, cond=None):
        h = F.relu(self.bn1(x, cond))
        if self.upsample:
            h, x = upsample2(h), upsample2(x)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        if self.conv_sc is not None:
            x = self.conv_sc(x)
        return h + x


@register
class BigGANUpNode(_UpBlockNode):
    """BigGAN generator residual block (also the U-Net D decoder block with norm: none)."""

    kind: Literal["biggan_up"]

    def build(self, inputs, ctx):
        c, cond = self.shapes(inputs)
        return GBlock(c, self.out_channels, cond, self.norm_mode(), self.upsample, ctx)


class DeepGBlock(nn.Module):
    """BigGAN-deep G block, a bottleneck with hidden = in / 4: (norm, ReLU, conv) x 4 with 1x1, 3x3,
    3x3, 1x1 convs, upsampling before the first 3x3. Skip: keep the first `out` channels, [up]."""

    def __init__(self, c_in, c_out, cond, norm, upsample, ctx, channel_ratio=4):
        super().__init__()
        hidden = c_in // channel_ratio
        self.upsample = upsample
        self.bn1 = _Norm(norm, c_in, cond, ctx)
        self.conv1 = ctx.conv(c_in, hidden, 1)
        self.bn2 = _Norm(norm, hidden, cond, ctx)
        self.conv2 = ctx.conv(hidden, hidden, 3)
        self.bn3 = _Norm(norm, hidden, cond, ctx)
        self.conv3 = ctx.conv(hidden, hidden, 3)
        self.bn4 = _Norm(norm, hidden, cond, ctx)
        self.conv4 = ctx.conv(hidden, c_out, 1)

    def forward(self, x, cond=None):
        h = self.conv1(F.relu(self.bn1(x, cond)))
        h = F.relu(self.bn2(h, cond))
        if self.upsample:
            h = upsample2(h)
        h = self.conv2(h)
        h = self.conv3(F.relu(self.bn3(h, cond)))
        h = self.conv4(F.relu(self.bn4(h, cond)))
        # the skip keeps as many channels as the block puts out (read off h: no width to store)
        x = x[:, : h.shape[1]]
        return h + (upsample2(x) if self.upsample else x)


@register
class BigGANDeepUpNode(_UpBlockNode):
    """BigGAN-deep generator bottleneck block (channel-drop skip: out_channels <= input channels)."""

    kind: Literal["biggan_deep_up"]
    channel_ratio: PositiveInt = Field(4, description="hidden channels = input channels / channel_ratio")

    def build(self, inputs, ctx):
        c, cond = self.shapes(inputs)
        if self.out_channels > c:
            raise BlockError(
                f"{self.out_channels} exceeds the input's {c} channels; the skip drops channels and cannot add them",
                "out_channels",
            )
        if c % self.channel_ratio:
            raise BlockError(
                f"input channels {c} are not divisible by channel_ratio {self.channel_ratio}", "channel_ratio"
            )
        return DeepGBlock(c, self.out_channels, cond, self.norm_mode(), self.upsample, ctx, self.channel_ratio)


class _DownBlockNode(Weighted):
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    in_channels: InChannels = None
    downsample: bool = Field(True, description="Halve the resolution (2x2 average pooling).")

    def shapes(self, inputs):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        if self.downsample:
            check_even(inputs["in"], "downsampling")
        return c


class DBlock(nn.Module):
    """BigGAN D block: [ReLU], 3x3 conv, ReLU, 3x3 conv, [pool]; shortcut 1x1 conv and [pool]
    (pool first when not pre-activated, as in the first block)."""

    def __init__(self, c_in, c_out, downsample, preactivation, ctx):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = ctx.conv(c_in, c_out, 3)
        self.conv2 = ctx.conv(c_out, c_out, 3)
        self.conv_sc = ctx.conv(c_in, c_out, 1) if (c_in != c_out or downsample) else None

    def shortcut(self, x):
        if self.preactivation:
            x = self.conv_sc(x) if self.conv_sc is not None else x
            return avgpool2(x) if self.downsample else x
        x = avgpool2(x) if self.downsample else x
        return self.conv_sc(x) if self.conv_sc is not None else x

    def forward(self, x):
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = avgpool2(h)
        return h + self.shortcut(x)


@register
class BigGANDownNode(_DownBlockNode):
    """BigGAN discriminator residual block."""

    kind: Literal["biggan_down"]
    preactivation: bool = Field(True, description="ReLU before the first conv; false for the block on the image.")

    def build(self, inputs, ctx):
        c = self.shapes(inputs)
        return DBlock(c, self.out_channels, self.downsample, self.preactivation, ctx)


class DeepDBlock(nn.Module):
    """BigGAN-deep D block, hidden = out / 4: (ReLU, conv) x 4 with 1x1, 3x3, 3x3, 1x1 convs, pooling
    before the last. Skip: [pool], then concat(x, 1x1 conv(x)) to reach out_channels."""

    def __init__(self, c_in, c_out, downsample, ctx, channel_ratio=4):
        super().__init__()
        hidden = c_out // channel_ratio
        self.downsample = downsample
        self.conv1 = ctx.conv(c_in, hidden, 1)
        self.conv2 = ctx.conv(hidden, hidden, 3)
        self.conv3 = ctx.conv(hidden, hidden, 3)
        self.conv4 = ctx.conv(hidden, c_out, 1)
        self.conv_sc = ctx.conv(c_in, c_out - c_in, 1) if c_out > c_in else None

    def forward(self, x):
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        h = F.relu(self.conv3(F.relu(h)))
        if self.downsample:
            h, x = avgpool2(h), avgpool2(x)
        h = self.conv4(h)
        if self.conv_sc is not None:
            x = torch.cat([x, self.conv_sc(x)], 1)
        return h + x


@register
class BigGANDeepDownNode(_DownBlockNode):
    """BigGAN-deep discriminator bottleneck block (concat skip: out_channels >= input channels)."""

    kind: Literal["biggan_deep_down"]
    channel_ratio: PositiveInt = Field(4, description="hidden channels = out_channels / channel_ratio")

    def build(self, inputs, ctx):
        c = self.shapes(inputs)
        if self.out_channels < c:
            raise BlockError(
                f"{self.out_channels} is below the input's {c} channels; the skip concatenates "
                "and cannot drop channels",
                "out_channels",
            )
        if self.out_channels % self.channel_ratio:
            raise BlockError(
                f"{self.out_channels} is not divisible by channel_ratio {self.channel_ratio}", "out_channels"
            )
        return DeepDBlock(c, self.out_channels, self.downsample, ctx, self.channel_ratio)


class GOutput(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, ctx, conv_channels=None):
        super().__init__()
        self.bn = ctx.batch_norm(c_in)
        self.conv = ctx.conv(c_in, conv_channels or c_out, kernel_size)
        # the image is the conv's first c_out channels; None: the conv has no others
        self.keep = c_out if conv_channels not in (None, c_out) else None

    def forward(self, x):
        h = self.conv(F.relu(self.bn(x)))
        return torch.tanh(h if self.keep is None else h[:, : self.keep])


@register
class GOutputNode(Weighted):
    """Generator output head: BN, ReLU, conv to image channels, tanh."""

    kind: Literal["g_output"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt | None = Field(None, description="Default: data.channels.")
    kernel_size: PositiveInt = 3
    conv_channels: PositiveInt | None = Field(
        None,
        description="Output channels of the conv, of which the first out_channels are the image and the rest are "
        "dropped (TF-Hub's BigGAN-deep convolves to ch channels, so its spectral norm spans all of them); "
        "default: out_channels.",
    )

    def bounded_output(self) -> bool:
        return True

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        out = self.out_channels or ctx.image_channels
        if self.conv_channels is not None and self.conv_channels < out:
            raise BlockError(
                f"{self.conv_channels} is below the image's {out} channels, which are the conv's first ones",
                "conv_channels",
            )
        return GOutput(c, out, self.kernel_size, ctx, self.conv_channels)


class DHead(nn.Module):
    def __init__(self, channels, num_classes, ctx):
        super().__init__()
        self.linear = ctx.linear(channels, 1)
        self.embed = ctx.embedding(num_classes, channels) if num_classes else None

    def forward(self, x, y=None):
        h = F.relu(x).sum(dim=(2, 3))
        out = self.linear(h)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(dim=1, keepdim=True)
        return out


@register
class DHeadNode(Weighted):
    """Discriminator head: ReLU, global sum pooling, linear to 1, plus the class projection
    sum(embed(y) * h) when `y` is given (Miyato & Koyama, 2018)."""

    kind: Literal["d_head"]
    in_: Ref = Field(alias="in")
    y: Ref | None = Field(None, description="Class labels for the projection; leave out for an unconditional D.")

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        if self.y is not None and inputs["y"] != ():
            raise BlockError(f"`y` must be the class labels (graph input y), got shape {inputs['y']}", "y")
        return DHead(c, ctx.num_classes if self.y is not None else 0, ctx)
