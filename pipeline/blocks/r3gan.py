"""R3GAN's blocks (Huang, Gokaslan, Kuleshov, Tompkin 2024, "The GAN is dead; long live the GAN! A
Modern Baseline GAN"): a ResNet of grouped-convolution inverted bottlenecks without normalisation,
initialised fix-up style, with low-pass filtered resampling.

Read from the authors' code, brownvc/R3GAN at 19a7ddf (R3GAN/Networks.py, R3GAN/Resamplers.py,
R3GAN/FusedOperators.py); written here, not copied. The layers take their weights from the
`BuildContext`, and under `init: msr` (the specs' choice) they draw them as the authors'
MSRInitializer does: N(0, gain² / fan_in), each layer with the gain below.

- `r3gan_input`: G's first stage transition (GenerativeBasis): a learnt 4x4 basis per channel,
  scaled channel by channel by a linear map of z (and of the class embedding, concatenated).
- `r3gan_block`: the residual block x + conv1x1(act(gconv(act(conv1x1(x))))), act a biased
  LeakyReLU 0.2; the last conv starts at zero, the others at the LeakyReLU gain times
  L^(-1/4) for L residual blocks in the network (fix-up's scaling for 3 layers per branch).
- `r3gan_up` / `r3gan_down`: the interpolative resamplers (a [1, 2, 1] filter becomes the 4-tap
  [1, 3, 3, 1] low-pass, a transposed or strided depthwise conv), with a 1x1 conv when the
  channels change (before the up-sampling, after the down-sampling).
- `r3gan_output`: D's last transition (DiscriminativeBasis): a depthwise 4x4 valid conv, a linear
  map, and the projection on a class embedding when conditional.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, field_validator
from torch import nn

from pipeline.blocks.basic import check_in_channels, feature_map, features
from pipeline.blocks.registry import BlockError, InChannels, Ref, Weighted, register

SLOPE = 0.2  # the LeakyReLU of every block (FusedOperators.py, BiasedActivation)
LRELU_GAIN = math.sqrt(2 / (1 + SLOPE**2))  # BiasedActivation.Gain: keeps the activations' variance
LINEAR_LAYERS_PER_BRANCH = 3  # ResidualBlock's NumberOfLinearLayers


def branch_gain(num_blocks: int) -> float:
    """The init gain of a residual branch's first two convs: LeakyReLU's gain times L^(-1/(2m-2))
    for m = 3 linear layers per branch and L residual blocks in the network (Networks.py,
    ResidualBlock; fix-up initialisation, Zhang et al. 2019)."""
    return LRELU_GAIN * num_blocks ** (-1 / (2 * LINEAR_LAYERS_PER_BRANCH - 2))


def _check_msr(ctx, node: str) -> None:
    # equalized LR rescales every forward by the gain: the residual branch's zero gain would stay zero
    if ctx.init == "equalized_lr":
        raise BlockError(
            f"{node} initialises its layers with per-layer gains (its last conv at zero), which equalized_lr would "
            "apply at every forward",
            "init",
            "use init: msr (R3GAN's)",
        )


def _check_labels(node, inputs) -> bool:
    """Whether the node is conditional; its `y` must be the class labels."""
    if node.y is None:
        return False
    if inputs["y"] != ():
        raise BlockError(f"`y` must be the class labels (graph input y), got shape {inputs['y']}", "y")
    return True


class BiasedLeakyReLU(nn.Module):
    """LeakyReLU 0.2 of x plus a per-channel bias that starts at zero (BiasedActivation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), SLOPE)


# ----- generator input -----
class R3GANInput(nn.Module):
    def __init__(self, in_features: int, channels: int, embedding_dim: int, ctx):
        super().__init__()
        # the embedding is a linear map of one-hot labels (the authors' nn.Linear(c_dim, dim)), gain 1
        self.embed = ctx.embedding(ctx.num_classes, embedding_dim, gain=1.0) if embedding_dim else None
        self.linear = ctx.linear(in_features + embedding_dim, channels, bias=False, gain=1.0)
        self.basis = nn.Parameter(torch.empty(channels, 4, 4))
        if not ctx.meta:
            nn.init.normal_(self.basis)

    def forward(self, z, y=None):
        if self.embed is not None:
            z = torch.cat([z, self.embed(y).to(z.dtype)], dim=1)
        return self.basis.unsqueeze(0) * self.linear(z)[:, :, None, None]


@register
class R3GANInputNode(Weighted):
    """R3GAN's generator input (Networks.py, GenerativeBasis and Generator.forward): z, concatenated
    with the class embedding when `y` is given, mapped linearly to one scale per channel of a learnt
    4x4 basis (drawn N(0, 1)); the output is their product, a (C, 4, 4) map."""

    kind: Literal["r3gan_input"]
    in_: Ref = Field(alias="in")
    y: Ref | None = Field(None, description="Class labels; leave out for an unconditional G.")
    out_channels: PositiveInt
    embedding_dim: int = Field(
        0, ge=0, description="Width of the class embedding concatenated to z (R3GAN: z_dim, 64); needs `y`."
    )

    def build(self, inputs, ctx):
        z_dim = features(inputs["in"])
        conditional = _check_labels(self, inputs)
        if conditional != bool(self.embedding_dim):
            raise BlockError(
                "a conditional input needs `y` and embedding_dim > 0; an unconditional one neither",
                "embedding_dim" if conditional else "y",
            )
        _check_msr(ctx, self.kind)
        return R3GANInput(z_dim, self.out_channels, self.embedding_dim, ctx)


# ----- the residual block -----
class R3GANBlock(nn.Module):
    def __init__(self, channels: int, expansion: int, cardinality: int, kernel_size: int, num_blocks: int, ctx):
        super().__init__()
        wide, gain = channels * expansion, branch_gain(num_blocks)
        self.expand = ctx.conv(channels, wide, 1, bias=False, gain=gain)
        self.act1 = BiasedLeakyReLU(wide)
        self.grouped = ctx.conv(wide, wide, kernel_size, groups=cardinality, bias=False, gain=gain)
        self.act2 = BiasedLeakyReLU(wide)
        self.project = ctx.conv(wide, channels, 1, bias=False, gain=0.0)  # the branch starts at zero

    def forward(self, x):
        return x + self.project(self.act2(self.grouped(self.act1(self.expand(x)))))


@register
class R3GANBlockNode(Weighted):
    """R3GAN's residual block (Networks.py, ResidualBlock): x + conv1x1(act(gconv(act(conv1x1(x)))))
    with an inverted bottleneck (`expansion` times wider inside), a grouped k x k conv with
    `cardinality` groups, biased LeakyReLU 0.2 and no normalisation. Channels and size unchanged."""

    kind: Literal["r3gan_block"]
    in_: Ref = Field(alias="in")
    in_channels: InChannels = None
    cardinality: PositiveInt = Field(description="Groups of the k x k conv (R3GAN's CIFAR-10: 96).")
    expansion: PositiveInt = Field(2, description="Width of the bottleneck over the block's channels (R3GAN: 2).")
    kernel_size: PositiveInt = Field(3, description="Kernel of the grouped conv (odd).")
    num_blocks: PositiveInt = Field(
        description="Residual blocks in the whole network, L: the first two convs start at gain L^(-1/4) "
        "(R3GAN's VarianceScalingParameter, sum(BlocksPerStage))."
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {k}")
        return k

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        if (c * self.expansion) % self.cardinality:
            raise BlockError(
                f"the bottleneck's {c} x {self.expansion} = {c * self.expansion} channels do not split into "
                f"{self.cardinality} groups",
                "cardinality",
            )
        _check_msr(ctx, self.kind)
        return R3GANBlock(c, self.expansion, self.cardinality, self.kernel_size, self.num_blocks, ctx)


# ----- resampling -----
def lowpass_kernel(taps: list[int]) -> torch.Tensor:
    """The 2-D resampling kernel of a filter: `taps` convolved with [1, 1] (the box of a 2x
    resampling), its outer product with itself, normalised to sum 1 (Resamplers.py,
    CreateLowpassKernel, not in place). [1, 2, 1] gives [1, 3, 3, 1] ⊗ [1, 3, 3, 1] / 64."""
    t = torch.tensor(taps, dtype=torch.float64)
    box = torch.cat([t, t.new_zeros(1)]) + torch.cat([t.new_zeros(1), t])  # t * [1, 1]
    kernel = torch.outer(box, box)
    return (kernel / kernel.sum()).float()


class Resample(nn.Module):
    """2x up- or down-sampling of each channel by the low-pass kernel: a transposed conv of stride 2
    (the kernel times 4, so a constant stays constant) or a strided one, on the channels folded into
    the batch (as the authors' reference resamplers: a grouped conv's double backward, which R1 and
    R2 take, runs group by group on the CPU)."""

    def __init__(self, taps: list[int], up: bool):
        super().__init__()
        self.up, self.padding = up, len(taps) // 2
        # a constant, not a buffer: a module built on the meta device (and then given its weights, as
        # sampling loads one) must not be left with a kernel that has no data
        with torch.device("cpu"):
            kernel = lowpass_kernel(taps) * (4 if up else 1)
        self.kernel = kernel.view(1, 1, *kernel.shape)
        self._on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def forward(self, x):
        b, c, h, w = x.shape
        kernel = self._on.get((x.device, x.dtype))
        if kernel is None:
            kernel = self._on[(x.device, x.dtype)] = self.kernel.to(x.device, x.dtype)
        folded = x.reshape(b * c, 1, h, w)
        if self.up:
            y = F.conv_transpose2d(folded, kernel, stride=2, padding=self.padding)
        else:
            y = F.conv2d(folded, kernel, stride=2, padding=self.padding)
        return y.view(b, c, *y.shape[-2:])

    def extra_repr(self) -> str:
        return f"{'up' if self.up else 'down'}, kernel {tuple(self.kernel.shape[-2:])}"


class R3GANResample(nn.Module):
    def __init__(self, c_in: int, c_out: int, taps: list[int], up: bool, ctx):
        super().__init__()
        self.up = up
        # the 1x1 conv runs at the lower resolution: before up-sampling, after down-sampling
        self.resample = Resample(taps, up)
        self.conv = ctx.conv(c_in, c_out, 1, bias=False, gain=1.0) if c_in != c_out else None

    def forward(self, x):
        if self.up:
            return self.resample(x if self.conv is None else self.conv(x))
        x = self.resample(x)
        return x if self.conv is None else self.conv(x)


class _ResampleNode(Weighted):
    in_: Ref = Field(alias="in")
    in_channels: InChannels = None
    out_channels: PositiveInt | None = Field(None, description="Default: the input's channels (no 1x1 conv).")
    filter: list[PositiveInt] = Field(
        [1, 2, 1],
        description="Low-pass taps, convolved with [1, 1] (R3GAN: [1, 2, 1], i.e. [1, 3, 3, 1]); odd length, "
        "symmetric.",
    )

    @field_validator("filter")
    @classmethod
    def _odd_symmetric(cls, taps: list[int]) -> list[int]:
        if len(taps) % 2 == 0 or taps != taps[::-1]:
            raise ValueError(f"the filter must be symmetric with an odd number of taps, like [1, 2, 1]; got {taps}")
        return taps

    def _build(self, inputs, ctx, up: bool):
        c, h, w = feature_map(inputs["in"])
        check_in_channels(self, c)
        if not up and (h % 2 or w % 2):
            raise BlockError(f"down-sampling needs an even resolution, got {h}x{w}", "in")
        return R3GANResample(c, self.out_channels or c, list(self.filter), up, ctx)


@register
class R3GANUpNode(_ResampleNode):
    """R3GAN's up-sampling transition (Networks.py, UpsampleLayer; Resamplers.py, the interpolative
    up-sampler): a 1x1 conv when the channels change, then 2x up-sampling by the low-pass filter."""

    kind: Literal["r3gan_up"]

    def build(self, inputs, ctx):
        return self._build(inputs, ctx, up=True)


@register
class R3GANDownNode(_ResampleNode):
    """R3GAN's down-sampling transition (Networks.py, DownsampleLayer): 2x down-sampling by the
    low-pass filter, then a 1x1 conv when the channels change."""

    kind: Literal["r3gan_down"]

    def build(self, inputs, ctx):
        return self._build(inputs, ctx, up=False)


# ----- discriminator output -----
class R3GANOutput(nn.Module):
    def __init__(self, channels: int, embedding_dim: int, ctx):
        super().__init__()
        self.basis = ctx.conv(channels, channels, 4, padding=0, groups=channels, bias=False, gain=1.0)
        self.linear = ctx.linear(channels, embedding_dim or 1, bias=False, gain=1.0)
        gain = 1 / math.sqrt(embedding_dim) if embedding_dim else None  # Discriminator's EmbeddingLayer
        self.embed = ctx.embedding(ctx.num_classes, embedding_dim, gain=gain) if embedding_dim else None

    def forward(self, x, y=None):
        h = self.linear(self.basis(x).flatten(1))
        if self.embed is None:
            return h
        return (h * self.embed(y).to(h.dtype)).sum(dim=1, keepdim=True)


@register
class R3GANOutputNode(Weighted):
    """R3GAN's discriminator output (Networks.py, DiscriminativeBasis and Discriminator.forward): a
    depthwise 4x4 conv without padding (4x4 -> 1x1), a linear map to one logit, or, when `y` is
    given, to `embedding_dim` features whose dot product with the class embedding is the logit."""

    kind: Literal["r3gan_output"]
    in_: Ref = Field(alias="in")
    y: Ref | None = Field(None, description="Class labels; leave out for an unconditional D.")
    embedding_dim: int = Field(
        0, ge=0, description="Width of the class projection (R3GAN: G's first width, 768 on CIFAR-10); needs `y`."
    )

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        if (h, w) != (4, 4):
            raise BlockError(f"expects a 4x4 feature map, got {h}x{w}", "in", "down-sample to 4x4 before the output")
        conditional = _check_labels(self, inputs)
        if conditional != bool(self.embedding_dim):
            raise BlockError(
                "a conditional output needs `y` and embedding_dim > 0; an unconditional one neither",
                "embedding_dim" if conditional else "y",
            )
        _check_msr(ctx, self.kind)
        return R3GANOutput(c, self.embedding_dim, ctx)
