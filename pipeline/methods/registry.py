"""The method registry: kind -> strict pydantic options model -> the phases of a training step.

A training method is what a spec's `method:` names: which networks it trains (each a block
graph of the spec, in a role: generator or discriminator), which data streams it reads, and the
phases of one step. A phase is data: its name (profiling regions and log keys follow it), the
engines it steps, the networks its loss backpropagates through without stepping them (frozen),
how often it runs, and an objective: a function of the step's inputs returning one loss per
stepped engine and the values to log. The loop owns backward, optimizer steps, logging,
checkpoints and stops, and never knows which method it runs.

Adding a method is adding one module: a subclass of `Method` with a `kind: Literal[...]` field
and its options, decorated with `@register`, imported in `pipeline/methods/__init__.py`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from pipeline.blocks.registry import no_bool_for_a_number
from pipeline.registry import Registry

if TYPE_CHECKING:
    import torch

    from pipeline.errors import Issue
    from pipeline.graph import NetworkPlan

Role = Literal["generator", "discriminator"]


@dataclass(frozen=True)
class NetworkNeed:
    """A network a method trains: its role (which of `train.g_opt` / `train.d_opt` and whether
    `train.ema` apply to it by default) and, for a network declared under `networks:` without
    `inputs`, the inputs it gets."""

    role: Role
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> "latent" | "labels" | "image:STREAM"


class StepInputs(Protocol):
    """What an objective sees: the raw modules of every network, the data streams and latents
    (read-only: an objective reads them, the loop sets them)."""

    @property
    def nets(self) -> Mapping[str, torch.nn.Module]: ...

    @property
    def micro(self) -> int:
        """Samples per micro-batch on this rank."""

    def next(self, stream: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next micro-batch of a stream: images, and labels for a labelled stream (else None)."""

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z for n samples (this rank's slice of one global draw), and class labels when the spec has classes."""

    def mixed(self) -> AbstractContextManager:
        """The run's autocast (bf16) context; a no-op in fp32."""

    @property
    def images_seen(self) -> int:
        """Real images read so far, all ranks (schedules follow it)."""

    @property
    def step(self) -> int:
        """Steps completed before this one (constant within a step)."""

    @property
    def rank(self) -> int:
        """This process's rank (0 on one process)."""

    @property
    def world_size(self) -> int:
        """The number of ranks."""

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """A small tensor summed over ranks, on the CPU (a collective: every rank calls it at the same point)."""

    @property
    def counting_flops(self) -> bool:
        """True when the phases run on the meta device to count FLOPs."""


# Where a dotted spec path was written: (file, line) of the nearest key the YAML gave, as
# LoadedSpec.where returns it (a fixed pair, so `Issue(message, path, *where(loc), hint)` fits)
Where = Callable[[tuple], tuple[str | None, int | None]]

# losses per stepped engine, and values to log (scalar tensors, averaged over micro-batches)
Objective = Callable[[StepInputs], tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]]


@dataclass(frozen=True)
class Phase:
    name: str
    steps: tuple[str, ...]  # engines updated by this phase, each with its own loss
    objective: Objective
    repeat: int = 1
    frozen: tuple[str, ...] = ()  # networks the losses backpropagate through without updating them


def describe(phases: list[Phase]) -> str:
    """The phases of a step in a few words: 'D x2, G'."""
    return ", ".join(p.name + (f" x{p.repeat}" if p.repeat > 1 else "") for p in phases)


@dataclass(frozen=True)
class Schedule:
    """What a method with a schedule (ProGAN's growth) sets for the coming step, a function of the
    real images seen: the stage of every growing network and its fade-in weight alpha, the side
    of the real images, the global batch, the learning rate by role (None: the spec's), and
    whether the optimizers start afresh at each new stage and phase."""

    stage: int = 0
    fading: bool = False
    alpha: float = 1.0
    resolution: int | None = None  # None: data.resolution, and no growth to record
    batch_size: int | None = None
    lr: dict[str, float] = field(default_factory=dict)  # role -> learning rate
    lr_scale: float = 1.0  # a factor on every learning rate (CycleGAN's linear decay)
    reset_optimizers: bool = False  # clear the optimizers' states when the stage or phase changes

    @property
    def phase(self) -> tuple[int, bool]:
        """(stage, fading): what a change of which resets the optimizers when asked."""
        return self.stage, self.fading

    def record(self) -> dict:
        """The growth as logged and checkpointed (nothing for a schedule of learning rates alone)."""
        if self.resolution is None:
            return {}
        return {
            "stage": self.stage,
            "phase": "fade" if self.fading else "stable",
            "alpha": self.alpha,
            "resolution": self.resolution,
        }


class MethodRun:
    """A method's implementation for one run: its phases, plus any state of its own that must be
    checkpointed for an exact resume (kept per rank)."""

    phases: list[Phase]

    def schedule(self, images_seen: int) -> Schedule | None:
        """The schedule for the step that starts at `images_seen` real images; None: fixed."""
        return None

    def profiled_at(self) -> int:
        """The real images seen at which `profile` measures steps: where the schedule's last phase
        begins (0 without a schedule)."""
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")


class Options(BaseModel):
    """A section of a method's options: strict like every spec section (booleans refused for
    numbers, at the field's own path)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    refuse_bool_for_a_number = field_validator("*", mode="before")(classmethod(no_bool_for_a_number))


class KindOptions(BaseModel):
    """Options told apart by their `kind` (a method, an augmentation): strict like every spec
    section, booleans refused for numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # (a field validator on "*" would also sit on `kind`, which pydantic refuses for a discriminator)
    @model_validator(mode="before")
    @classmethod
    def _refuse_bool_for_a_number(cls, data):
        if isinstance(data, dict):
            for key, value in data.items():
                if key in cls.model_fields and key != "kind":
                    try:
                        no_bool_for_a_number(cls, value, SimpleNamespace(field_name=key))
                    except ValueError as exc:
                        raise ValueError(f"{key}: {exc}") from None
        return data


class Method(KindOptions):
    """Options of a training method. Subclasses add `kind` and their own options, and implement
    the abstract methods (pydantic's model metaclass is an ABCMeta: a method kind missing one
    cannot be instantiated)."""

    # What the trained networks do, for `sample`, `eval` and the evaluation during training:
    # "generate" images from latents (and classes), or "translate" images of one domain into another.
    use: ClassVar[Literal["generate", "translate"]] = "generate"

    if TYPE_CHECKING:  # every registered method declares it, as a Literal field; not a field of the base

        @property
        def kind(self) -> str: ...

    @abc.abstractmethod
    def networks(self, spec) -> dict[str, NetworkNeed]:
        """The networks this method trains, by name (names the spec declares)."""
        ...

    @abc.abstractmethod
    def engines(self, spec) -> dict[str, tuple[str, ...]]:
        """One DeepSpeed engine (optimizer, checkpoint directory) per entry: the networks it holds.
        Networks optimised with one joint loss share an engine (param groups keep their own
        optimizer settings), since DeepSpeed reduces and steps what one backward computed."""
        ...

    @abc.abstractmethod
    def streams(self, spec) -> dict[str, bool]:
        """The data streams this method reads: name -> whether it needs labels."""
        ...

    def read_together(self, spec) -> bool:
        """Whether the streams are read in lockstep (the same seed, so paired shards give pairs)."""
        return False

    @abc.abstractmethod
    def exports(self, spec) -> tuple[str, ...]:
        """Networks written to export/NAME.safetensors at the end of a run (their EMA where declared)."""
        ...

    def batch_sizes(self, spec) -> dict[str, int]:
        """Global batches other than train.batch_size the method's schedule uses, by spec path."""
        return {}

    def check(self, spec, plans: dict[str, NetworkPlan], where: Where) -> list[Issue]:
        """Cross-network checks after every graph is analyzed (shapes that must fit each other)."""
        return []

    @abc.abstractmethod
    def sample_grid(self, spec, device) -> Callable[[dict[str, torch.nn.Module]], dict[str, torch.Tensor]]:
        """The images written to samples/ during training: fixed inputs chosen once, and a function
        of every network (exported ones as their EMA; in eval mode, without gradients) returning
        grids (rows, cols, C, H, W) by file-name suffix: "" for step-N.png, e.g. "-d-pixels" for
        step-N-d-pixels.png."""
        ...

    def d_loss_bounded(self) -> bool:
        """Whether the discriminators' losses are bounded below by 0 (a WGAN critic's are not): the
        failure detector "D's loss at 0" applies only then."""
        return True

    def diversity_probe(self, spec, device) -> tuple[str, tuple] | None:
        """Fixed inputs for the collapse detector (train.failures.diversity_below): the network to
        probe and its inputs, drawn once without touching the run's random streams; None: the
        method has no probe."""
        return None

    @abc.abstractmethod
    def build(self, spec) -> MethodRun:
        """This method's implementation for one run of the spec."""


METHODS: Registry[Method] = Registry("method")
register = METHODS.register  # class decorator adding a method kind
method_union = METHODS.union  # the discriminated union of every registered method, for the spec schema
