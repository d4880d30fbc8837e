"""Image-to-image translation blocks: the ResNet generator (Johnson et al. 2016) and the 70x70
PatchGAN discriminator (Isola et al. 2017) as CycleGAN (Zhu et al. 2017) and CSGAN (Kancharagunta &
Dubey) use them.

In CycleGAN's notation the generator is c7s1-64, d128, d256, R256 x 9 (x 6 at 128x128 and below),
u128, u64, c7s1-3 with a tanh: `reflect_conv`, `reflect_conv` with stride 2, `resnet_block`
(`repeat: 9`), `conv_up`, `reflect_conv`. The discriminator is C64 (no norm), C128, C256 (stride 2),
C512 (stride 1), then a conv to one channel: `patch_conv` x 4, `patch_head`, giving a map of logits,
one per 70x70 patch (30x30 on a 256x256 image).

Normalisation is CycleGAN's instance norm: per sample and channel, without affine parameters or
running statistics, so training and evaluation normalise alike. Every conv has a bias, as in
CycleGAN's code with instance norm: a bias just before an instance norm is cancelled by its mean
subtraction and learns nothing, but keeping it makes the parameter counts CycleGAN's (G 11,378,179
at ngf 64 with 9 blocks, D 2,764,737).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from pipeline.blocks.basic import check_in_channels, feature_map
from pipeline.blocks.registry import BlockError, InChannels, Node, Ref, Weighted, register

SLOPE = 0.2  # the PatchGAN's LeakyReLU slope, also reflect_conv's for `activation: leaky_relu`

Norm = Literal["instance", "none"]
Activation = Literal["relu", "leaky_relu", "tanh", "none"]
NORM_DOC = "Normalisation after the conv: `instance` (CycleGAN's, no affine parameters) or `none`."


# ----- shape checks -----
def conv_out(size: int, kernel_size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel_size) // stride + 1


def check_output(h: int, w: int, norm: str, what: str) -> None:
    """The map a conv leaves must exist, and have more than one pixel for an instance norm."""
    if min(h, w) < 1:
        raise BlockError(f"{what} leave no output", "in", "feed a larger feature map")
    if norm == "instance" and h * w < 2:
        raise BlockError(
            f"{what} leave a 1x1 map: instance norm needs more than one pixel per channel",
            "norm",
            "use norm: none here, or feed a larger feature map",
        )


def check_reflect_pad(shape: tuple[int, int, int], padding: int, key: str = "padding") -> None:
    _, h, w = shape
    if padding >= min(h, w):
        raise BlockError(
            f"reflection padding {padding} needs an input larger than {padding}x{padding}, got {h}x{w}", key
        )


# ----- modules -----
def make_activation(name: str, negative_slope: float = SLOPE) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if name == "tanh":
        return nn.Tanh()
    return nn.Identity()


def make_norm(name: str, channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels) if name == "instance" else nn.Identity()


class ConvNormAct(nn.Module):
    """[reflection pad], conv, [instance norm], [activation]."""

    def __init__(self, c_in, c_out, kernel_size, stride, padding, padding_mode, norm, activation, ctx, slope=SLOPE):
        super().__init__()
        reflect = padding_mode == "reflect"
        self.pad = nn.ReflectionPad2d(padding) if reflect and padding else nn.Identity()
        self.conv = ctx.conv(c_in, c_out, kernel_size, stride=stride, padding=0 if reflect else padding)
        self.norm = make_norm(norm, c_out)
        self.act = make_activation(activation, slope)

    def forward(self, x):
        return self.act(self.norm(self.conv(self.pad(x))))


class ResnetBlock(nn.Module):
    """x + (reflection pad 1, 3x3 conv, norm, ReLU, reflection pad 1, 3x3 conv, norm)(x)."""

    def __init__(self, channels: int, norm: str, ctx):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, 3, 1, 1, "reflect", norm, "relu", ctx)
        self.conv2 = ConvNormAct(channels, channels, 3, 1, 1, "reflect", norm, "none", ctx)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class ConvUp(nn.Module):
    """3x3 transposed conv with stride 2 (doubles H and W), norm, ReLU."""

    def __init__(self, c_in: int, c_out: int, norm: str, ctx):
        super().__init__()
        self.conv = ctx.conv_transpose(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
        self.norm = make_norm(norm, c_out)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


# ----- kinds -----
@register
class InstanceNormNode(Node):
    """Instance norm (Ulyanov et al. 2016): each channel of each sample normalised over its pixels.
    No running statistics: training and evaluation normalise alike."""

    kind: Literal["instance_norm"]
    in_: Ref = Field(alias="in", description="A feature map (C, H, W) with more than one pixel.")
    affine: bool = Field(False, description="Learn a gain and a bias per channel (CycleGAN: false).")
    eps: float = Field(1e-5, gt=0, description="Added to the variance before the square root.")

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        if h * w < 2:
            raise BlockError("instance norm needs more than one pixel per channel, got a 1x1 map", "in")
        return nn.InstanceNorm2d(c, eps=self.eps, affine=self.affine)


@register
class ReflectConvNode(Weighted):
    """Reflection-padded conv, then norm and activation: CycleGAN's c7s1-k (kernel 7, instance norm,
    ReLU), its dk (kernel 3, stride 2) and its output layer (kernel 7, `norm: none`, `activation: tanh`)."""

    kind: Literal["reflect_conv"]
    in_: Ref = Field(alias="in", description="A feature map (C, H, W).")
    out_channels: PositiveInt = Field(description="Channels of the conv's output.")
    in_channels: InChannels = None
    kernel_size: PositiveInt = Field(3, description="Square kernel size (CycleGAN: 7 first and last, 3 between).")
    stride: PositiveInt = Field(1, description="Conv stride; 2 halves an even H and W.")
    padding: int | None = Field(None, ge=0, description="Pixels padded on each side; default: kernel_size // 2.")
    padding_mode: Literal["reflect", "zeros"] = Field(
        "reflect",
        description=(
            "How the border is padded. CycleGAN's code pads its two stride-2 convs with zeros "
            "(same shapes and parameters as reflect)."
        ),
    )
    norm: Norm = Field("instance", description=NORM_DOC)
    activation: Activation = Field(
        "relu", description="After the norm: relu, leaky_relu (slope 0.2), tanh (the output layer) or none."
    )

    def bounded_output(self) -> bool:
        return self.activation == "tanh"

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        check_in_channels(self, c)
        pad = self.kernel_size // 2 if self.padding is None else self.padding
        if self.padding_mode == "reflect":
            check_reflect_pad(inputs["in"], pad)
        out_h, out_w = (conv_out(s, self.kernel_size, self.stride, pad) for s in (h, w))
        check_output(out_h, out_w, self.norm, f"kernel {self.kernel_size} and padding {pad} on the {h}x{w} input")
        return ConvNormAct(
            c, self.out_channels, self.kernel_size, self.stride, pad, self.padding_mode, self.norm, self.activation, ctx
        )


@register
class ResnetBlockNode(Weighted):
    """Residual block of the ResNet generator (CycleGAN's Rk): x + (reflection pad 1, 3x3 conv, norm,
    ReLU, reflection pad 1, 3x3 conv, norm)(x), keeping the input's channels and resolution. Chain
    several with `repeat`."""

    kind: Literal["resnet_block"]
    in_: Ref = Field(alias="in", description="A feature map (C, H, W), at least 2x2.")
    in_channels: InChannels = None
    norm: Norm = Field("instance", description=NORM_DOC)

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        check_reflect_pad(inputs["in"], 1, "in")
        return ResnetBlock(c, self.norm, ctx)


@register
class ConvUpNode(Weighted):
    """Upsampling layer of the ResNet generator (CycleGAN's uk): 3x3 transposed conv with stride 2,
    padding 1 and output padding 1, which doubles H and W exactly, then norm and ReLU."""

    kind: Literal["conv_up"]
    in_: Ref = Field(alias="in", description="A feature map (C, H, W).")
    out_channels: PositiveInt = Field(description="Channels of the output (CycleGAN: half the input's).")
    in_channels: InChannels = None
    norm: Norm = Field("instance", description=NORM_DOC)

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        return ConvUp(c, self.out_channels, self.norm, ctx)


@register
class PatchConvNode(Weighted):
    """PatchGAN discriminator layer (CycleGAN's Ck): 4x4 conv with zero padding 1, norm, LeakyReLU.
    Stride 2 halves an even H and W; stride 1 (the C512 layer) takes one pixel off each."""

    kind: Literal["patch_conv"]
    in_: Ref = Field(alias="in", description="A feature map (C, H, W), at least 2x2.")
    out_channels: PositiveInt = Field(description="Channels of the output (PatchGAN: 64, 128, 256, 512).")
    in_channels: InChannels = None
    stride: PositiveInt = Field(2, description="Conv stride (PatchGAN: 2, then 1 for the last layer before the head).")
    norm: Norm = Field("instance", description=NORM_DOC + " PatchGAN: none on the image, instance after.")
    negative_slope: float = Field(SLOPE, ge=0, description="Slope of the LeakyReLU for negative inputs.")

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        check_in_channels(self, c)
        out_h, out_w = (conv_out(s, 4, self.stride, 1) for s in (h, w))
        check_output(out_h, out_w, self.norm, f"a 4x4 kernel at stride {self.stride} on the {h}x{w} input")
        return ConvNormAct(
            c, self.out_channels, 4, self.stride, 1, "zeros", self.norm, "leaky_relu", ctx, self.negative_slope
        )


@register
class PatchHeadNode(Weighted):
    """PatchGAN's last layer: 4x4 conv with stride 1 and zero padding 1 to one channel, no activation:
    (C, H, W) -> (1, H - 1, W - 1), one logit per patch."""

    kind: Literal["patch_head"]
    in_: Ref = Field(alias="in", description="A feature map (C, H, W), at least 2x2.")
    in_channels: InChannels = None

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        check_in_channels(self, c)
        check_output(h - 1, w - 1, "none", f"a 4x4 kernel with padding 1 on the {h}x{w} input")
        return ctx.conv(c, 1, 4, stride=1, padding=1)
