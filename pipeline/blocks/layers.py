"""Layer factories and the norm layers shared by every block family.

Blocks never construct a conv, linear or embedding directly: they ask the `BuildContext`,
which applies the network's (or node's) weight init, spectral norm and equalized learning rate
in one place, and skips init on the `meta` device, where weights have no storage.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


class EqualizedLR(nn.Module):
    """ProGAN's equalized learning rate: weights stored ~ N(0, 1), scaled at run time by the
    He constant sqrt(2 / fan_in), so every layer learns at the same speed under Adam."""

    def __init__(self, fan_in: int, gain: float = math.sqrt(2.0)):
        super().__init__()
        self.scale = gain / math.sqrt(fan_in)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale


class SpectralNorm(nn.Module):
    """Spectral normalization (Miyato et al. 2018) as a parametrization: weight / sigma, with sigma
    estimated by one power iteration per training forward (u, v are buffers, not parameters).

    As in BigGAN-PyTorch, u is the state: each iteration derives v from u, then u from v. Unlike
    torch.nn.utils.parametrizations.spectral_norm, this skips the 15 warm-up iterations on the
    meta device, where they cost 0.1 s a layer and mean nothing."""

    _u: torch.Tensor  # buffers, registered in __init__
    _v: torch.Tensor

    def __init__(self, weight: torch.Tensor, *, eps: float, dim: int = 0, init_iterations: int = 15):
        super().__init__()
        self.eps, self.dim = eps, dim
        mat = self._matrix(weight)
        self.register_buffer("_u", mat.new_empty(mat.shape[0]))
        self.register_buffer("_v", mat.new_empty(mat.shape[1]))
        if weight.device.type != "meta":
            with torch.no_grad():
                self._u.copy_(F.normalize(self._u.normal_(), dim=0, eps=eps))
                self._v.copy_(F.normalize(self._v.normal_(), dim=0, eps=eps))
            self._power_iteration(mat, init_iterations)

    @property
    def flops_per_forward(self) -> int:
        """One training forward runs three matrix-vector products with the weight (W^T u, W v and
        sigma = u^T W v): 2 FLOPs per multiply-add, whatever the batch size."""
        return 6 * self._u.numel() * self._v.numel()

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight if self.dim == 0 else weight.movedim(self.dim, 0)).flatten(1)

    @torch.no_grad()
    def _power_iteration(self, mat: torch.Tensor, iterations: int) -> None:
        for _ in range(iterations):
            self._v.copy_(F.normalize(torch.mv(mat.t(), self._u), dim=0, eps=self.eps))
            self._u.copy_(F.normalize(torch.mv(mat, self._v), dim=0, eps=self.eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # sigma in the buffers' precision (fp32) also when the weights are bf16 (DeepSpeed's bf16
        # casts parameters, not buffers)
        mat = self._matrix(weight).to(self._u.dtype)
        if self.training:
            self._power_iteration(mat.detach(), 1)
        u, v = self._u.clone(), self._v.clone()  # autograd must not see the in-place updates
        return weight / torch.dot(u, torch.mv(mat, v)).to(weight.dtype)


_PARAMETRIZED_CLASSES: dict[tuple, type] = {}


def _share_parametrized_class(layer: nn.Module) -> nn.Module:
    """torch.nn.utils.parametrize gives every parametrized layer a class of its own (a subclass of
    Conv2d, say, holding the `weight` property). torch.compile guards on a submodule's class, so
    otherwise identical blocks would never share a compiled graph (regional compilation compiles
    once per block structure). The class holds nothing specific to the layer (the property reads the
    layer's own `parametrizations`), so layers of one base class and parametrized names share one."""
    if parametrize.is_parametrized(layer):
        key = (type(layer).__bases__[0], tuple(cast(nn.ModuleDict, layer.parametrizations)))
        layer.__class__ = _PARAMETRIZED_CLASSES.setdefault(key, type(layer))
    return layer


@torch.no_grad()
def bake_parametrizations(module: nn.Module) -> nn.Module:
    """Replace every parametrized weight of `module` (spectral norm, equalized LR) in place by its
    current value as a plain parameter: the network computes the same outputs in eval mode, where
    spectral norm's u and v stay fixed, without recomputing weight / sigma in each forward (an
    exported graph then holds the weights it uses and no power-iteration buffers).

    torch's remove_parametrizations deletes the weight property from the layer's class, which
    layers share here (see _share_parametrized_class), so it would strip the other layers of theirs:
    all values are read first, then each layer is given back its base class."""
    baked = [
        (layer, name, getattr(layer, name).detach().clone())
        for layer in module.modules()
        if parametrize.is_parametrized(layer)
        for name in cast(nn.ModuleDict, layer.parametrizations)
    ]
    for layer, name, value in baked:
        if parametrize.is_parametrized(layer):  # the layer's first baked name: unparametrize it
            del layer._modules["parametrizations"]
            layer.__class__ = type(layer).__bases__[0]
        layer.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return module


# the layers that `BuildContext._finish` initialises and parametrizes
_Weighted = nn.Linear | nn.Conv2d | nn.ConvTranspose2d | nn.Embedding


@dataclass(frozen=True)
class BuildContext:
    """What a block needs to know beyond its own parameters."""

    num_classes: int
    image_channels: int
    init: str = "orthogonal"
    sn: bool = False
    sn_eps: float = 1e-6
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    cross_replica_bn: bool = False
    meta: bool = True  # building on the meta device: no weight init

    def for_node(self, node) -> BuildContext:
        changes = {k: getattr(node, k) for k in ("sn", "init") if getattr(node, k, None) is not None}
        return replace(self, **changes) if changes else self

    # ----- weighted layers -----
    def _finish(self, layer: _Weighted, fan_in: int, sn: bool | None, gain: float | None = None) -> nn.Module:
        """Init, then equalized LR, then spectral norm. `gain` is the activation gain of equalized LR
        (default: the He constant sqrt(2)) and of `msr` (default 1), which N(0, gain² / fan_in) draws
        once, as R3GAN's MSRInitializer (brownvc/R3GAN at 19a7ddf, R3GAN/Networks.py); the other inits
        ignore it."""
        sn = self.sn if sn is None else sn
        if not self.meta:
            w = layer.weight
            if self.init == "orthogonal":
                nn.init.orthogonal_(w)
            elif self.init == "normal":
                nn.init.normal_(w, 0.0, 0.02)
            elif self.init == "xavier":
                nn.init.xavier_uniform_(w)
            elif self.init == "equalized_lr":
                nn.init.normal_(w, 0.0, 1.0)
            elif self.init == "msr":
                nn.init.normal_(w, 0.0, (1.0 if gain is None else gain) / math.sqrt(fan_in))
            bias = getattr(layer, "bias", None)  # an embedding has none
            if self.init in ("normal", "xavier", "equalized_lr", "msr") and bias is not None:
                nn.init.zeros_(bias)
        if self.init == "equalized_lr":
            he = math.sqrt(2.0) if gain is None else gain
            parametrize.register_parametrization(layer, "weight", EqualizedLR(fan_in, he), unsafe=True)
        if sn:
            dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
            parametrize.register_parametrization(
                layer, "weight", SpectralNorm(layer.weight, eps=self.sn_eps, dim=dim), unsafe=True
            )
        return _share_parametrized_class(layer)

    def linear(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        sn: bool | None = None,
        gain: float | None = None,
    ) -> nn.Module:
        return self._finish(nn.Linear(in_features, out_features, bias=bias), in_features, sn, gain)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        bias: bool = True,
        sn: bool | None = None,
        gain: float | None = None,
    ) -> nn.Module:
        padding = kernel_size // 2 if padding is None else padding
        layer = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        return self._finish(layer, in_channels // groups * kernel_size * kernel_size, sn, gain)

    def conv_transpose(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int,
        padding: int,
        output_padding: int = 0,
        bias: bool = True,
        sn: bool | None = None,
    ) -> nn.Module:
        # output_padding picks the output size where stride > 1 makes it ambiguous (k3 s2 p1 op1 doubles H, W)
        layer = nn.ConvTranspose2d(
            in_channels, out_channels, kernel_size, stride, padding, output_padding=output_padding, bias=bias
        )
        return self._finish(layer, in_channels * kernel_size * kernel_size, sn)

    def embedding(
        self, num_embeddings: int, dim: int, *, sn: bool | None = None, gain: float | None = None
    ) -> nn.Module:
        # On meta, an uninitialised weight: nn.Embedding's own normal_ init would be torch's
        # Python reference kernel there, whose first call imports torch._dynamo (over 1 s).
        # Its fan-in is the number of classes: the embedding is a linear layer on one-hot labels.
        weight = torch.empty(num_embeddings, dim) if self.meta else None
        return self._finish(nn.Embedding(num_embeddings, dim, _weight=weight), num_embeddings, sn, gain)

    # ----- norms -----
    def batch_norm(self, channels: int, *, affine: bool = True) -> BatchNorm:
        return BatchNorm(
            channels, eps=self.bn_eps, momentum=self.bn_momentum, affine=affine, cross_replica=self.cross_replica_bn
        )

    def cond_batch_norm(self, channels: int, cond_features: int) -> ConditionalBatchNorm:
        return ConditionalBatchNorm(channels, cond_features, self)

    def class_batch_norm(self, channels: int) -> ClassBatchNorm:
        return ClassBatchNorm(channels, self)


_meta_replicas = 1  # see meta_replicas


@contextlib.contextmanager
def meta_replicas(world_size: int) -> Iterator[None]:
    """While open, cross-replica BatchNorm on the meta device runs the synchronized path, as it
    would on `world_size` ranks (the all-reduce skipped: a meta tensor has no values), so that
    memory estimates see what that path saves for the backward."""
    global _meta_replicas
    before, _meta_replicas = _meta_replicas, world_size
    try:
        yield
    finally:
        _meta_replicas = before


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C) or (N, C, H, W) with a cross-replica switch.

    With `cross_replica`, training-mode statistics are those of the global batch of all
    data-parallel ranks: the mean and variance over the concatenation of every rank's local batch,
    gathered by one differentiable all-reduce (`pipeline.blocks.sync_bn.sync_batch_norm`, which
    works on gloo and NCCL and compiles). The running statistics are updated from the global
    statistics, identically on every rank. This applies only while training, under an
    initialised process group of more than one rank; otherwise (a single process, eval mode,
    shape inference on the meta device) it is plain BatchNorm, since there the local batch is the
    global batch; on the meta device inside `meta_replicas(N > 1)` it takes the synchronized path
    (memory estimates). `process_group` (None: the default group) restricts synchronisation to a group.

    Every rank of the group must run the forward together: a train-mode forward on one rank only
    (sampling, standing statistics) waits forever for the others; use eval mode there, or set
    `cross_replica = False` for the duration.
    """

    def __init__(self, channels: int, *, eps: float, momentum: float, affine: bool, cross_replica: bool):
        super().__init__(channels, eps=eps, momentum=momentum, affine=affine)
        self.cross_replica = cross_replica
        self.process_group = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"BatchNorm expects (N, C) or (N, C, H, W) input, got {tuple(x.shape)}")

    def _synchronized(self, x: torch.Tensor) -> bool:
        dist = torch.distributed
        if x.device.type == "meta":
            return self.training and self.cross_replica and _meta_replicas > 1
        return (
            self.training
            and self.cross_replica
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._synchronized(x):
            return super().forward(x)
        from pipeline.blocks.sync_bn import sync_batch_norm  # torch.distributed only, no DeepSpeed

        self._check_input_dim(x)
        momentum: float | torch.Tensor | None = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as in _BatchNorm (a tensor: no recompiles)
                momentum = 1.0 / self.num_batches_tracked
        tracked = self.track_running_stats
        return sync_batch_norm(
            x,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            momentum if momentum is not None else 0.0,
            self.eps,
            self.process_group,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cross_replica={self.cross_replica}"


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then gain = 1 + Linear(cond) and bias = Linear(cond)
    (BigGAN's class-conditional BN; both linears without bias, spectrally normalised per the network)."""

    def __init__(self, channels: int, cond_features: int, ctx: BuildContext):
        super().__init__()
        self.bn = ctx.batch_norm(channels, affine=False)
        self.gain = ctx.linear(cond_features, channels, bias=False)
        self.bias = ctx.linear(cond_features, channels, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        gain = 1 + self.gain(cond).view(shape)
        return self.bn(x) * gain + self.bias(cond).view(shape)


class ClassBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a gain and a bias looked up per class: SAGAN's
    conditional BN (brain-research/self-attention-gan `ops.py:ConditionalBatchNorm`: gamma and
    beta tables of num_classes x channels, initialised to 1 and 0, no spectral norm). The gain is
    stored as 1 + a table initialised to 0: the same function, and the same Adam steps."""

    def __init__(self, channels: int, ctx: BuildContext):
        super().__init__()
        self.bn = ctx.batch_norm(channels, affine=False)
        # on meta, uninitialised tables (nn.Embedding's own init there imports torch._dynamo)
        make = torch.empty if ctx.meta else torch.zeros
        self.gain = nn.Embedding(ctx.num_classes, channels, _weight=make(ctx.num_classes, channels))
        self.bias = nn.Embedding(ctx.num_classes, channels, _weight=make(ctx.num_classes, channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        return self.bn(x) * (1 + self.gain(y).view(shape)) + self.bias(y).view(shape)


def batch_statistics(module: nn.Module) -> list[str]:
    """Names of the submodules whose training-mode output depends on the other samples of the
    batch: BatchNorm (plain, conditional, cross-replica) and any module that says so with a
    `batch_statistics = True` class attribute (minibatch standard deviation)."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(type(m), "batch_statistics", False)
    ]


class PixelNorm(nn.Module):
    """ProGAN's pixel-wise feature normalisation: x / sqrt(mean over channels of x^2 + eps)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def avgpool2(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)
