"""An exponential moving average of the generator, for sampling and evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A separate copy of G whose parameters are an exponential moving average of G's.

    Follows BigGAN-PyTorch (`utils.ema`): before `start_images` images have been seen the copy
    just takes G's parameters (decay 0); after, each update does

        ema = decay * ema + (1 - decay) * param

    for the parameters only. Buffers (BatchNorm running statistics, spectral norm's u and v) are
    copied from G at every update, not averaged: they are estimates tied to G's current weights,
    and standing statistics (shared/REFERENCE.md) recompute BN's for the averaged weights before
    sampling anyway.
    Spectral-norm weights are averaged in their raw form (`parametrizations.weight.original`).

    The copy is in eval mode with requires_grad False. `dtype` keeps it in another precision than
    G (e.g. float32 for a bf16 G: at decay 0.9999 a bf16 average could not move, since one update
    changes it by less than bf16's resolution).
    """

    def __init__(self, model: nn.Module, decay: float, start_images: int = 0, *, dtype: torch.dtype | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start_images = decay, start_images
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        if dtype is not None:
            self.module.to(dtype=dtype)  # floating tensors only; integer buffers keep their type
        self._params: list[torch.Tensor] = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    def _sources(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params: list[torch.Tensor] = list(model.parameters())
        buffers = list(model.buffers())
        if len(params) != len(self._params) or len(buffers) != len(self._buffers):
            raise ValueError(
                f"EMA holds {len(self._params)} parameters and {len(self._buffers)} buffers, "
                f"the model has {len(params)} and {len(buffers)}: not the same network"
            )
        return params, buffers

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int) -> None:
        """Moves the average towards `model` (the same network, compiled or not)."""
        params, buffers = self._sources(model)
        params = [p.detach() for p in params]
        if images_seen < self.start_images:
            torch._foreach_copy_(self._params, params)
        else:
            # lerp(ema, p, 1 - decay) = ema + (1 - decay)(p - ema) = decay * ema + (1 - decay) p
            if any(e.dtype != p.dtype for e, p in zip(self._params, params, strict=True)):
                params = [p.to(e.dtype) for e, p in zip(self._params, params, strict=True)]
            torch._foreach_lerp_(self._params, params, 1.0 - self.decay)
        if self._buffers:
            torch._foreach_copy_(self._buffers, buffers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
