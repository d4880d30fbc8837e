"""What a run does between steps, one object per concern, each keeping its own interval and state:
log lines (with the failure detectors over them), sample grids, evaluation and checkpoints.

Each has `after_step(step, images_before)`: the loop calls them in order after every step, and
each decides whether this step is its time (an interval in steps or images, and always the last
step). A failure that rolls the run back raises `RolledBack`, and the rest of that step's tasks
are skipped. Only rank 0 writes files; the checks that stop a run are taken on every rank together.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipeline.distributed import engines as dist
from pipeline.distributed.engines import World
from pipeline.images import save_png
from pipeline.runs import Run
from pipeline.spec.schema import due
from pipeline.train import checkpoint
from pipeline.train.failures import Failure, FailureTracker, diversity
from pipeline.train.health import data_health, return_freed_host_memory
from pipeline.train.progress import Progress
from pipeline.train.stops import non_finite_weights, stopped

if TYPE_CHECKING:
    from pipeline.train.loop import Trainer

# evaluate(networks to score by name, the spec) -> scores to log; the CLI passes one in
Evaluator = Callable[[dict[str, torch.nn.Module], Any], dict[str, Any]]


class Task(Protocol):
    def after_step(self, step: int, images_before: int) -> None:
        """After every step: whatever this step is the time for (`step` taken, from `images_before`)."""


class FirstStepPace:
    """How long the first step of this call took (compiling included): its line comes before the
    first log line, which is `train.log_every` steps away. Made just before that step."""

    def __init__(self, tr: Trainer):
        self.tr = tr
        self.start: float | None = time.perf_counter()

    def after_step(self, step: int, images_before: int) -> None:
        if self.start is None:
            return
        compiled = " (compiling included)" if self.tr.spec.compile.enabled else ""
        took = time.perf_counter() - self.start
        self.tr.say(f"step {step} took {took:.1f} s{compiled}; a line every train.log_every={self.tr.t.log_every}")
        self.start = None


class RolledBack(Exception):
    """A failure rolled the run back to an earlier checkpoint: this step's other tasks are skipped."""


def _last(tr: Trainer, step: int) -> bool:
    return step == tr.t.max_steps


class MetricsWriter:
    """RUN/metrics.jsonl, and the same scalars to TensorBoard (when installed) against images seen.
    Rank 0 writes; elsewhere it does nothing."""

    def __init__(self, run: Run, enabled: bool):
        self.file, self.enabled = run.metrics, enabled
        self.tensorboard = _tensorboard(run.tensorboard) if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.append(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["images_seen"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl has everything
        return None
    return SummaryWriter(str(folder))


class FailureWatch:
    """ganhacks tip 10: the detectors (train/failures.py) over each logged line, and what a
    detection does: a warning in the line, a stop, or a rollback to the newest checkpoint from
    before the symptom began with the learning rates scaled."""

    def __init__(self, tr: Trainer, metrics: MetricsWriter):
        self.tr, self.metrics, self.settings = tr, metrics, tr.t.failures
        self.tracker = None
        if self.settings.on_failure != "off":
            self.tracker = FailureTracker(self.settings, bounded_d_loss=tr.spec.method.d_loss_bounded())
            self.tracker.reset(tr.failures_state)
        self._probe: tuple[Any, ...] | None = None  # (network, its inputs): the method's diversity probe, drawn once

    def state_dict(self) -> dict[str, Any] | None:
        """The detectors' history, checkpointed so that a resumed run judges against it."""
        return self.tracker.state_dict() if self.tracker is not None else None

    def check(self, record: dict[str, Any]) -> list[Failure]:
        """What the detectors find in a logged line (rank 0's finding, on every rank); the line
        says what was found in it."""
        found = self.tracker.check(record, self._diversity()) if self.tracker is not None else []
        found = _agreed(found, self.tr.world)
        if found and self.tr.world.is_main:
            record["failure"] = sorted({f.detector for f in found})
            record["failure_message"] = "; ".join(f.message for f in found)
            print(f"warning: step {record['step']}: {record['failure_message']}", file=sys.stderr)
        return found

    def act(self, found: list[Failure], step: int) -> None:
        """Stop, or roll back (raising RolledBack), as train.failures.on_failure says; warn: nothing more."""
        if not found or self.settings.on_failure == "warn":
            return
        if self.settings.on_failure == "stop":
            since = min(f.since_step for f in found)
            raise stopped(["; ".join(f.message for f in found)], step, self.tr.run_dir, before=since)
        self._roll_back(found, step)
        raise RolledBack

    def _diversity(self) -> float | None:
        """The diversity (failures.diversity) of the probed network's images of fixed inputs, with
        the detector on and a method that has a probe; the network as exported (its EMA when it
        has one), in evaluation mode, drawing nothing from the run's random streams."""
        tr = self.tr
        if self.settings.diversity_below == 0:
            return None
        if self._probe is None:
            self._probe = tr.spec.method.diversity_probe(tr.spec, tr.world.device) or ()
        if not self._probe:
            return None
        name, inputs = self._probe
        net = tr.emas[name].module if name in tr.emas else tr.nets[name]
        mode = net.training
        net.eval()
        with torch.no_grad():
            value = diversity(net(*inputs))
        net.train(mode)
        return value

    def _roll_back(self, found: list[Failure], step: int) -> None:
        """Reload the newest checkpoint from before the symptom began, scale the learning rates,
        reseed the latents, and log the rollback with what triggered it."""
        tr, settings = self.tr, self.settings
        reason = "; ".join(f.message for f in found)
        since = min(f.since_step for f in found)
        if len(tr.rollbacks) >= settings.max_rollbacks:
            limit = f"{reason} (after {len(tr.rollbacks)} rollbacks, train.failures.max_rollbacks)"
            raise stopped([limit], step, tr.run_dir, before=since)
        target = checkpoint.latest_intact(tr.run_dir, before=since)
        if target is None:
            raise stopped([f"{reason}; no checkpoint from before step {since} to roll back to"], step, tr.run_dir)
        # the engines whose gradient norm fired have their learning rates scaled; every engine when
        # another detector fired (D at 0, G fooling D, collapse: the balance, not one network)
        of_key = {f"grad_norm_{name.lower()}": name for name in tr.engines}
        named = [of_key.get(f.key or "") for f in found]
        engines = sorted({n for n in named if n is not None}) if None not in named else sorted(tr.engines)
        rollback = {"at_step": step, "reason": reason, "lr_scale": settings.rollback.lr_scale, "engines": engines}
        tr.roll_back(target, rollback, reseed=settings.rollback.reseed)
        assert self.tracker is not None  # a rollback needs the detectors on
        self.tracker.reset(tr.failures_state)
        if tr.world.is_main:
            self.metrics.file.keep_until(tr.step)
            line = {"step": tr.step, "images_seen": tr.images_seen, "rollback": len(tr.rollbacks), **rollback}
            self.metrics.write(line)
            print(f"warning: rolled back from step {step} to {target} ({reason})", file=sys.stderr)


def _agreed(found: list[Failure], world: World) -> list[Failure]:
    """Rank 0's failures, on every rank (each rank's logged means are its own): one collective."""
    if world.size == 1:
        return found
    mine = {"fired": float(bool(found)), "since": float(min((f.since_step for f in found), default=0))}
    sent = dist.all_mean({k: v if world.is_main else 0.0 for k, v in mine.items()}, world.device)
    if sent["fired"] * world.size < 0.5:
        return []
    return found if world.is_main else [Failure("rank 0", "rank 0 found a failure", round(sent["since"] * world.size))]


class RunLog:
    """Values the phases log (scalar tensors), summed on the device and averaged over every
    micro-batch, phase repeat and step since the last line: one host synchronisation per line."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        """The means since the last call (synchronises once), averaged over ranks; then resets."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        totals = torch.stack([self.sums[k] for k in keys]).tolist()
        self.sums, counts, self.counts = {}, self.counts, {}
        return dist.all_mean({k: total / counts[k] for k, total in zip(keys, totals, strict=True)}, self.device)


class LogLines:
    """Every `train.log_every` (steps or images) and at the last step: the means logged since the
    last line, the learning rates, the stage, the data's health and images/s, judged by the
    failure detectors, written to metrics.jsonl and shown on the progress bar."""

    def __init__(self, tr: Trainer, metrics: MetricsWriter, watch: FailureWatch, progress: Progress):
        self.tr, self.metrics, self.watch, self.progress = tr, metrics, watch, progress
        self._restart_clock()

    def _restart_clock(self) -> None:
        self.tick, self.tick_images = time.perf_counter(), self.tr.images_seen

    def after_step(self, step: int, images_before: int) -> None:
        tr = self.tr
        if not (due(tr.t.log_every, step, images_before, tr.images_seen) or _last(tr, step)):
            return
        now = time.perf_counter()
        record = {"step": step, "images_seen": tr.images_seen, **tr.log.means(), **tr.lrs}
        if tr.schedule is not None:  # the schedule of the step just taken
            record |= tr.schedule.record()
        record |= data_health(tr.streams, tr.skipped_before, tr.spec.data, tr.world)
        record["images_per_s"] = (tr.images_seen - self.tick_images) / (now - self.tick)
        self.tick, self.tick_images = now, tr.images_seen
        found = self.watch.check(record)
        self.metrics.write(record)
        self.progress.update(step, record)
        return_freed_host_memory()
        try:
            self.watch.act(found, step)
        except RolledBack:
            self._restart_clock()
            raise


class SampleGrids:
    """Every `train.sample_every` and at the last step, rank 0: the method's sample grids of fixed
    inputs (chosen once) as RUN/samples/step-N*.png."""

    def __init__(self, tr: Trainer, run: Run):
        self.tr, self.run = tr, run
        self.grid = tr.spec.method.sample_grid(tr.spec, tr.world.device) if tr.world.is_main else None

    def after_step(self, step: int, images_before: int) -> None:
        tr = self.tr
        if self.grid is None or not (due(tr.t.sample_every, step, images_before, tr.images_seen) or _last(tr, step)):
            return
        nets = tr.nets | tr.scored()  # the exported networks' EMAs in place of the networks
        modes = {name: net.training for name, net in nets.items()}
        for net in nets.values():
            net.eval()
        with torch.no_grad():
            for suffix, images in self.grid(nets).items():
                save_png(images, self.run.samples(step, suffix))
        for name, net in nets.items():
            net.train(modes[name])


class Evaluation:
    """Every `eval.every` steps and at the last step, rank 0: the method's scores of the exported
    networks (their EMAs where kept), logged to metrics.jsonl; and once before a fresh run's first
    step, the untrained networks' baseline the scores fall from."""

    def __init__(self, tr: Trainer, metrics: MetricsWriter, evaluate: Evaluator | None):
        self.tr, self.metrics = tr, metrics
        self.evaluate = evaluate if tr.spec.eval.every and tr.world.is_main else None

    def before_training(self) -> None:
        if self.evaluate is not None and self.tr.step == 0:
            self._write(0)

    def after_step(self, step: int, images_before: int) -> None:
        if self.evaluate is not None and (step % self.tr.spec.eval.every == 0 or _last(self.tr, step)):
            self._write(step)

    def _write(self, step: int) -> None:
        assert self.evaluate is not None
        e = self.tr.spec.eval
        # the evaluation says how far it is and its scores (eval/during_training.py)
        self.tr.say(f"evaluating step {step}: {e.num_samples:,} samples, eval.features {e.features}")
        result = self.evaluate(self.tr.scored(), self.tr.spec)
        self.metrics.write({"step": step, "images_seen": self.tr.images_seen, **result})


class Checkpoints:
    """Every `train.checkpoint_every`, at the last step and when a signal asks the run to stop:
    a checkpoint, written only when every weight is finite (else the run stops, naming the last
    good one)."""

    def __init__(self, tr: Trainer, watch: FailureWatch):
        self.tr, self.watch = tr, watch
        self.last_saved: Path | None = None

    def after_step(self, step: int, images_before: int, *, now: bool = False) -> None:
        tr = self.tr
        if now or due(tr.t.checkpoint_every, step, images_before, tr.images_seen) or _last(tr, step):
            bad = non_finite_weights(dict(tr.nets) | {f"the EMA of {n}": e.module for n, e in tr.emas.items()})
            if bad:
                raise stopped(bad, step, tr.run_dir)
            self.last_saved = self.save(step)

    def save(self, step: int) -> Path:
        tr = self.tr
        state: dict[str, Any] = {"step": step, "images_seen": tr.images_seen, "world_size": tr.world.size}
        state["data_parts"] = tr.parts
        state["spec"] = tr.spec_dict
        state["rollbacks"] = tr.rollbacks
        if (failures := self.watch.state_dict()) is not None:
            state["failures"] = failures
        if grown := tr.schedule.record() if tr.schedule is not None else {}:  # the last step's stage, phase, alpha
            state["schedule"] = grown
        return checkpoint.save(
            tr.run_dir,
            step,
            engines=tr.engines,
            emas=tr.emas,
            world=tr.world,
            rank_state=tr.rank_state(),
            state=state,
            keep=tr.t.keep_checkpoints,
        )
