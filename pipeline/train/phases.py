"""Running a method's phases: what their objectives see of the run (`StepInputs`), and the
networks a phase's loss backpropagates through without updating them (`frozen`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch

from pipeline.distributed import engines as dist
from pipeline.precision import autocast

if TYPE_CHECKING:
    from pipeline.train.loop import Trainer


@contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, ...]]:
    """No gradient reaches these modules' parameters inside (D during the G step). With DeepSpeed,
    D's next backward fails ("gradient computed twice") unless D is frozen here."""
    for module in modules:
        module.requires_grad_(False)
    try:
        yield modules
    finally:
        for module in modules:
            module.requires_grad_(True)


class StepInputs:
    """What the method's objectives see: the networks' raw modules, the data streams (each read
    counted as real images seen, all ranks together) and latents drawn for the global batch."""

    def __init__(self, trainer: Trainer):
        self.tr = trainer
        self.nets = trainer.nets

    @property
    def micro(self) -> int:
        """Samples per micro-batch on this rank (a method's schedule may change it between steps)."""
        return self.tr.micro

    def next(self, stream: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tr.read(stream)

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tr.latents(n)

    def mixed(self) -> AbstractContextManager[None]:
        return autocast(self.tr.world.device.type, self.tr.t.precision)

    @property
    def images_seen(self) -> int:
        """Real images read so far, all ranks together (schedules follow it)."""
        return self.tr.images_seen

    @property
    def step(self) -> int:
        """Steps completed before this one: the same in every phase, repeat and micro-batch of a step."""
        return self.tr.step

    @property
    def rank(self) -> int:
        return self.tr.world.rank

    @property
    def world_size(self) -> int:
        return self.tr.world.size

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """A small tensor summed over ranks (one collective: every rank must call it at the same point)."""
        return dist.all_sum(values, self.tr.world.device)

    counting_flops = False  # the meta-device stand-in used to count FLOPs says True
