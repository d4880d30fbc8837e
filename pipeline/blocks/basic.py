"""Basic layers: linear, conv, embedding, wiring (concat, split, add, reshape), norms,
activations and resampling."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from pipeline.blocks.layers import PixelNorm
from pipeline.blocks.registry import BlockError, InChannels, Joined, Node, Ref, Refs, Shape, Weighted, register


# ----- shape helpers shared by the block families -----
def feature_map(shape: Shape, what: str = "input", key: str = "in") -> tuple[int, int, int]:
    if len(shape) != 3:
        raise BlockError(f"expects a feature map (C, H, W) as {what}, got shape {shape}", key)
    return shape


def features(shape: Shape, what: str = "input", key: str = "in") -> int:
    if len(shape) != 1:
        raise BlockError(
            f"expects a feature vector (D,) as {what}, got shape {shape}",
            key,
            "add a reshape node, or feed a linear/embedding output",
        )
    return shape[0]


def check_in_channels(node, got: int) -> None:
    expected = getattr(node, "in_channels", None)
    if expected is not None and expected != got:
        raise BlockError(
            f"{expected} does not match the input's {got} channels",
            "in_channels",
            "fix in_channels or the out_channels of the node feeding this one",
        )


def check_kernel_fits(shape: Shape, kernel_size: int, padding: int) -> None:
    _, h, w = shape
    if min(h, w) + 2 * padding < kernel_size:
        raise BlockError(f"kernel {kernel_size} does not fit the {h}x{w} input with padding {padding}", "kernel_size")


def check_even(shape: Shape, why: str) -> None:
    _, h, w = shape
    if h % 2 or w % 2:
        raise BlockError(f"{why} needs an even resolution, got {h}x{w}", "in")


class Apply(nn.Module):
    """A stateless function as a module (torch.compile traces through it)."""

    def __init__(self, fn, name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, *args):
        return self.fn(*args)

    def extra_repr(self) -> str:
        return self.name


# ----- weighted layers -----
@register
class LinearNode(Weighted):
    """Fully connected layer on a feature vector."""

    kind: Literal["linear"]
    in_: Ref = Field(alias="in")
    out_features: PositiveInt
    bias: bool = True

    def build(self, inputs, ctx):
        return ctx.linear(features(inputs["in"]), self.out_features, bias=self.bias)


@register
class ConvNode(Weighted):
    """2-D convolution."""

    kind: Literal["conv"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    in_channels: InChannels = None
    kernel_size: PositiveInt = 3
    stride: PositiveInt = 1
    padding: int | None = Field(None, ge=0, description="Default: kernel_size // 2 ('same' at stride 1).")
    bias: bool = True

    def build(self, inputs, ctx):
        c, h, w = feature_map(inputs["in"])
        check_in_channels(self, c)
        pad = self.kernel_size // 2 if self.padding is None else self.padding
        check_kernel_fits(inputs["in"], self.kernel_size, pad)
        return ctx.conv(c, self.out_channels, self.kernel_size, stride=self.stride, padding=pad, bias=self.bias)


@register
class ConvTransposeNode(Weighted):
    """Transposed convolution (DCGAN's learned upsampling); kernel 4, stride 2, padding 1 doubles H and W."""

    kind: Literal["conv_transpose"]
    in_: Ref = Field(alias="in")
    out_channels: PositiveInt
    in_channels: InChannels = None
    kernel_size: PositiveInt = 4
    stride: PositiveInt = 2
    padding: int = Field(1, ge=0)
    bias: bool = True

    def build(self, inputs, ctx):
        c, _, _ = feature_map(inputs["in"])
        check_in_channels(self, c)
        return ctx.conv_transpose(
            c, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding, bias=self.bias
        )


@register
class EmbeddingNode(Weighted):
    """Class embedding: integer labels -> vectors (BigGAN's shared embedding)."""

    kind: Literal["embedding"]
    in_: Ref = Field(alias="in")
    embedding_dim: PositiveInt
    num_embeddings: PositiveInt | None = Field(None, description="Default: data.num_classes.")

    def build(self, inputs, ctx):
        if inputs["in"] != ():
            raise BlockError(f"expects integer class labels (the graph input `y`), got shape {inputs['in']}", "in")
        n = self.num_embeddings or ctx.num_classes
        if n != ctx.num_classes:
            raise BlockError(
                f"{n} does not match data.num_classes {ctx.num_classes}",
                "num_embeddings",
                "leave num_embeddings out to use data.num_classes",
            )
        return ctx.embedding(n, self.embedding_dim)


# ----- wiring -----
@register
class ConcatNode(Node):
    """Concatenate along features/channels; feature maps must share their resolution."""

    kind: Literal["concat"]
    in_: Refs = Field(alias="in")

    def build(self, inputs, ctx):
        shapes = inputs["in"]
        if len({len(s) for s in shapes}) != 1 or any(s[1:] != shapes[0][1:] for s in shapes):
            raise BlockError(
                "inputs must have the same rank and resolution to be concatenated, got "
                + ", ".join(str(s) for s in shapes),
                "in",
                "a skip connection must come from the feature map at the same resolution",
            )
        if shapes[0] == ():
            raise BlockError("cannot concatenate class labels; embed them first", "in")
        return Apply(lambda xs: torch.cat(xs, 1), "cat(dim=1)")


@register
class AddNode(Node):
    """Elementwise sum of inputs of identical shape (residual connections)."""

    kind: Literal["add"]
    in_: Refs = Field(alias="in", min_length=2)

    def build(self, inputs, ctx):
        shapes = inputs["in"]
        if any(s != shapes[0] for s in shapes):
            raise BlockError("inputs must have identical shapes to be added, got " + ", ".join(map(str, shapes)), "in")
        return Apply(lambda xs: sum(xs[1:], xs[0]), "sum")


@register
class SplitNode(Node):
    """Split a feature vector into equal chunks (BigGAN's hierarchical z); refer to chunk i as NAME.i."""

    kind: Literal["split"]
    in_: Ref = Field(alias="in")
    num_chunks: int = Field(ge=2)

    def build(self, inputs, ctx):
        d = features(inputs["in"])
        if d % self.num_chunks:
            raise BlockError(f"{d} features do not split into {self.num_chunks} equal chunks", "num_chunks")
        size = d // self.num_chunks
        return Apply(lambda x: tuple(torch.split(x, size, 1)), f"split({size})")


@register
class ReshapeNode(Node):
    """Reshape each sample, e.g. a linear's output to (C, 4, 4); one entry may be -1."""

    kind: Literal["reshape"]
    in_: Ref = Field(alias="in")
    shape: list[int] = Field(min_length=1)

    def build(self, inputs, ctx):
        numel = math.prod(inputs["in"])
        known = math.prod(s for s in self.shape if s != -1)
        if (
            any(s == 0 or s < -1 for s in self.shape)
            or self.shape.count(-1) > 1
            or known == 0
            or (numel % known if -1 in self.shape else numel != known)
        ):
            raise BlockError(f"cannot reshape {inputs['in']} ({numel} values) to {self.shape}", "shape")
        shape = tuple(self.shape)
        return Apply(lambda x: x.reshape(x.shape[0], *shape), f"reshape{shape}")


# ----- norms -----
@register
class BatchNormNode(Node):
    """BatchNorm with affine gain and bias, over a feature vector or a feature map."""

    kind: Literal["batch_norm"]
    in_: Ref = Field(alias="in")
    cross_replica: bool | None = Field(
        None, description="Statistics over all ranks; default: the network's cross_replica_bn."
    )

    def build(self, inputs, ctx):
        if len(inputs["in"]) not in (1, 3):
            raise BlockError(f"expects (C,) or (C, H, W), got {inputs['in']}", "in")
        bn = ctx.batch_norm(inputs["in"][0])
        if self.cross_replica is not None:
            bn.cross_replica = self.cross_replica
        return bn


@register
class CondBatchNormNode(Weighted):
    """Conditional BatchNorm: gain 1 + Linear(cond) and bias Linear(cond)."""

    kind: Literal["cond_batch_norm"]
    in_: Ref = Field(alias="in")
    cond: Joined = Field(description="Conditioning vector(s), concatenated along features.")

    def build(self, inputs, ctx):
        if len(inputs["in"]) not in (1, 3):
            raise BlockError(f"expects (C,) or (C, H, W), got {inputs['in']}", "in")
        return ctx.cond_batch_norm(inputs["in"][0], features(inputs["cond"], "condition", "cond"))


@register
class PixelNormNode(Node):
    """ProGAN's pixel-wise feature normalisation over channels."""

    kind: Literal["pixel_norm"]
    in_: Ref = Field(alias="in")
    eps: float = Field(1e-8, gt=0)

    def build(self, inputs, ctx):
        return PixelNorm(self.eps)


# ----- activations and resampling -----
@register
class ReluNode(Node):
    kind: Literal["relu"]
    in_: Ref = Field(alias="in")

    def build(self, inputs, ctx):
        return nn.ReLU()


@register
class LeakyReluNode(Node):
    kind: Literal["leaky_relu"]
    in_: Ref = Field(alias="in")
    negative_slope: float = Field(0.2, ge=0)

    def build(self, inputs, ctx):
        return nn.LeakyReLU(self.negative_slope)


@register
class TanhNode(Node):
    kind: Literal["tanh"]
    in_: Ref = Field(alias="in")

    def bounded_output(self) -> bool:
        return True

    def build(self, inputs, ctx):
        return nn.Tanh()


@register
class UpsampleNode(Node):
    """Nearest-neighbour upsampling by an integer factor."""

    kind: Literal["upsample"]
    in_: Ref = Field(alias="in")
    scale: int = Field(2, ge=2)

    def build(self, inputs, ctx):
        feature_map(inputs["in"])
        scale = self.scale
        return Apply(lambda x: F.interpolate(x, scale_factor=scale, mode="nearest"), f"nearest x{scale}")


@register
class AvgPoolNode(Node):
    """Average pooling with kernel = stride = `size`."""

    kind: Literal["avg_pool"]
    in_: Ref = Field(alias="in")
    size: int = Field(2, ge=2)

    def build(self, inputs, ctx):
        _, h, w = feature_map(inputs["in"])
        if h % self.size or w % self.size:
            raise BlockError(f"a {h}x{w} input does not pool evenly by {self.size}", "size")
        size = self.size
        return Apply(lambda x: F.avg_pool2d(x, size), f"avg_pool {size}")


@register
class SumPoolNode(Node):
    """Global sum pooling over H and W: (C, H, W) -> (C,)."""

    kind: Literal["sum_pool"]
    in_: Ref = Field(alias="in")

    def build(self, inputs, ctx):
        feature_map(inputs["in"])
        return Apply(lambda x: x.sum(dim=(2, 3)), "sum over H, W")
