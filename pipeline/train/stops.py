"""How a run stops: on purpose (a NaN, out of memory, a failure it cannot roll back from) with
a message naming the checkpoint to resume from, or on Ctrl-C / SIGTERM after finishing and
checkpointing the step in progress."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import Issue, SpecError
from pipeline.train import checkpoint

if TYPE_CHECKING:
    from pipeline.train.loop import Trainer


class TrainingStopped(SpecError):
    """A run stopped on purpose (NaN); the last good checkpoint is intact."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the step in progress was finished and checkpointed; the message says where."""


class StopSignal:
    """Inside: Ctrl-C and SIGTERM are noted (`signum`) instead of interrupting; the loop finishes
    the step, checkpoints and stops. The previous handlers come back on leaving."""

    signum: int | None
    previous: dict[signal.Signals, Any]

    def __enter__(self) -> StopSignal:
        self.signum = None
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def noted(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stopped(problems: list[str], step: int, run_dir: Path, *, before: int | None = None) -> TrainingStopped:
    """The stop, naming the checkpoint to resume from: the newest, or (`before`: the step a
    symptom began) the newest written before it, since later ones already carry the symptom."""
    last = checkpoint.latest(run_dir) if before is None else checkpoint.latest_intact(run_dir, before=before)
    return TrainingStopped(
        [
            Issue(
                f"{' and '.join(problems)} at step {step}; stopped. The last good checkpoint is {last or '(none yet)'}"
                + (f", the newest from before step {before}, when the symptom began" if before is not None else ""),
                hint="lower the learning rates, use fp32, or resume from that checkpoint with different settings "
                "in a new run.dir",
            )
        ]
    )


def out_of_memory(exc: RuntimeError) -> bool:
    # CUDA's allocator raises torch.OutOfMemoryError; the CPU allocator a RuntimeError naming itself
    return isinstance(exc, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(exc)


def stopped_out_of_memory(exc: RuntimeError, tr: Trainer) -> TrainingStopped:
    """Out of memory in a step: which step, batch and stage, and how to make it fit."""
    batch = tr.micro * tr.accum * tr.world.size
    stage = tr.schedule.record() if tr.schedule is not None else {}
    where = f" at resolution {stage['resolution']} ({stage['phase']})" if stage else ""
    staged = stage and tr.micro != tr.spec_micro  # this stage's own batch
    path = f"method.resolutions.{stage['resolution']}.batch_size" if staged else "train.batch_size"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TrainingStopped(
        [
            Issue(
                f"out of memory in step {tr.step + 1}{where}, a batch of {batch} ({tr.micro} per micro-batch x "
                f"{tr.accum} accumulated x {tr.world.size} ranks): {first}; stopped. The last good checkpoint is "
                f"{checkpoint.latest(tr.run_dir) or '(none yet)'}",
                path=path,
                hint="lower the batch, or set a smaller train.batch_per_rank: the same batch in more accumulated "
                "micro-batches; the same command then resumes",
            )
        ]
    )


def non_finite_weights(nets: dict[str, torch.nn.Module]) -> list[str]:
    """'generator has N non-finite weights' for each network whose parameters or buffers are not
    all finite: what a NaN or infinite update leaves even when the losses looked fine."""
    found = []
    for name, net in nets.items():
        tensors = [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
        count = int(sum((~torch.isfinite(t)).sum() for t in tensors))
        if count:
            found.append(f"{name} has {count} non-finite weights")
    return found
