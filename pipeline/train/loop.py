"""The training loop: `python -m pipeline train SPEC [key=value ...]`.

Reads top to bottom: `Trainer` builds the networks, engines and data streams and restores the
latest checkpoint; then steps made of the method's phases (for a GAN: `d_steps` discriminator
steps, then one generator step) until `train.max_steps`, each followed by the tasks of
train/tasks.py (log lines and failure detection, samples, evaluation, checkpoints). The method
says what each phase computes; this file owns backward, optimizer steps and EMAs. Progress is
counted in real images read from the data streams. Re-running the same command resumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.data.parts import PartsLoader, share
from pipeline.distributed import engines as dist
from pipeline.errors import SpecError
from pipeline.graph import GraphModule, build_network, compile_network
from pipeline.precision import DTYPES
from pipeline.regions import region
from pipeline.runs import Run, export_files
from pipeline.train import checkpoint, init_from
from pipeline.train.ema import EMA
from pipeline.train.phases import StepInputs, frozen
from pipeline.train.preflight import (
    batch_plan,
    check_before_building,
    rank_from_environment,
    world_size_from_environment,
)
from pipeline.train.progress import Progress, quiet, say
from pipeline.train.run_lock import run_lock
from pipeline.train.stops import Interrupted, StopSignal, TrainingStopped, out_of_memory, stopped, stopped_out_of_memory
from pipeline.train.streams import close, open_streams
from pipeline.train.tasks import (
    Checkpoints,
    Evaluation,
    Evaluator,
    FailureWatch,
    FirstStepPace,
    LogLines,
    MetricsWriter,
    RolledBack,
    RunLog,
    SampleGrids,
    Task,
)

if TYPE_CHECKING:
    from pipeline.methods.registry import MethodRun, Schedule
    from pipeline.spec.load import LoadedSpec
    from pipeline.spec.schema import Spec, TrainSpec

__all__ = ["Evaluator", "Interrupted", "RunSummary", "Trainer", "TrainingStopped", "batch_plan", "frozen", "train"]


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    step: int  # the run's step when this call ended
    max_steps: int
    steps_run: int  # steps trained by this call; 0 when the run was already complete
    images_seen: int


def already_complete(spec: Spec) -> RunSummary | None:
    """The summary of a run that needs nothing more: its latest checkpoint is at (or past)
    `train.max_steps` for this very spec and its export is written. Nothing is built for it."""
    run_dir = spec.run_dir
    last = checkpoint.latest(run_dir)
    if last is None or not all(f.exists() for f in export_files(spec)):
        return None
    try:
        state = checkpoint.read_state(last)
    except SpecError:
        return None  # damaged: the full path falls back to an intact checkpoint and says which file
    if state["step"] < spec.train.max_steps or checkpoint.spec_differences(state["spec"], spec.resolved()):
        return None  # more to train, or a changed spec that the full path refuses with the differences
    if checkpoint.damage(last) is not None:
        return None
    return RunSummary(run_dir, state["step"], spec.train.max_steps, 0, state["images_seen"])


class Trainer:
    """Everything a run builds: process group, networks, EMAs, engines, data streams, and the
    method's phases. `train` and `profile` both build it, so a profile measures exactly what
    training runs. Named regions (`D_fwd`, `opt_G`, ...) are free unless a profile switches them on.
    Its attributes are set by its own methods only."""

    # ----- what the spec fixes
    spec: Spec
    t: TrainSpec  # spec.train
    spec_dict: dict[str, Any]  # the resolved spec, as checkpoints and the export store it
    run_dir: Path
    world: dist.World
    dtype: torch.dtype  # bf16: convolutions and matrix products in bf16; norms, losses, master weights fp32
    accum: int  # micro-batches accumulated per step
    spec_micro: int  # samples per micro-batch on this rank, as train.batch_size makes it
    # ----- what it builds
    method: MethodRun  # the phases of a step, and the method's own state
    nets: dict[str, GraphModule]
    emas: dict[str, EMA]
    engines: dict[str, dist.Engine]
    latent_rng: torch.Generator  # one draw for the global batch; each rank takes its slice
    inputs: StepInputs  # what the phases' objectives see
    log: RunLog  # the values logged since the last line
    say: Callable[[str], None]  # a line about what the run is doing (rank 0; quiet elsewhere)
    # ----- the state of the run (restored from a checkpoint)
    step: int
    images_seen: int  # real images read, all ranks together
    images_last_step: int
    rollbacks: list[dict[str, Any]]  # every rollback so far (each scales some learning rates)
    failures_state: dict[str, Any]  # the failure detectors' history, as checkpointed
    parts: int  # the data's parts (data/parts.py): one per rank of the run's first start
    # ----- the method's schedule and the data streams opened for it
    schedule: Schedule | None  # the coming (or last taken) step's; None: the method has none
    phase: tuple[int, bool] | None  # the (stage, fading) of the last step taken
    micro: int  # samples per micro-batch on this rank at this stage
    data_shape: tuple[int, int] | None  # (resolution, micro) the streams are open for
    streams: dict[str, PartsLoader]
    skipped_before: int  # bad samples skipped by readers of earlier stages
    lrs: dict[str, float]  # each engine's learning rate now, as logged
    _scheduled_lr: tuple[dict[str, float], float] | None  # the schedule's learning rates that lrs were set for

    def __init__(self, loaded: LoadedSpec, *, device: str | None = None, resume: bool = True):
        spec, t = loaded.spec, loaded.spec.train
        self.spec, self.t = spec, t
        self.world = world = dist.setup(device, spec.run.collective_timeout_s)
        self.say = tell = say if world.is_main else quiet
        start = time.perf_counter()
        self.micro, self.accum = batch_plan(t, world.size)
        self.spec_micro = self.micro
        self.run_dir = spec.run_dir
        self.spec_dict = spec.resolved()
        self.method = spec.method.build(spec)
        self.dtype = DTYPES[t.precision]
        self.schedule, self.data_shape, self.skipped_before, self.streams = None, None, 0, {}
        self.lrs, self._scheduled_lr = {}, None
        needs = spec.method.networks(spec)

        # ----- networks, EMAs and engines: identical initial weights on every rank
        tell(f"building {' and '.join(needs)} and their engines on {world.device} ({world.size} rank(s))")
        torch.manual_seed(spec.seed)
        self.nets = {name: build_network(loaded, name, world.device, compile=False) for name in needs}
        last = checkpoint.latest_intact(self.run_dir) if resume else None
        ema_files = init_from.start(spec, self.nets, resuming_from=last, report=world.is_main)
        emas = {name: ema for name in needs if (ema := spec.ema_of(name)) is not None}
        # an eager copy, kept in fp32 even under bf16
        self.emas = {n: EMA(self.nets[n], e.decay, e.start_images, dtype=torch.float32) for n, e in emas.items()}
        init_from.load_emas(self.emas, ema_files, spec)
        for net in self.nets.values():
            compile_network(net, spec.compile)
        config = dist.engine_config(t, self.micro, self.accum, world.size)
        self.engines = {
            engine: dist.Engine(
                engine, {n: self.nets[n] for n in members}, {n: spec.opt_of(n) for n in members}, config
            )
            for engine, members in spec.method.engines(spec).items()
        }

        # ----- latents: one generator for the global batch, each rank takes its slice, so that a
        # run on N ranks draws the same z as a run on one
        self.latent_rng = torch.Generator().manual_seed(spec.seed)

        params = sum(p.numel() for net in self.nets.values() for p in net.parameters())
        tell(f"built: {params:,} parameters in {time.perf_counter() - start:.1f} s")

        # ----- resume (from `last`, found above), and the data: one reader per stream, each at its
        # checkpointed position
        if last is not None:
            tell(f"resuming from {last}: weights, optimizer states, EMAs and the data's position")
        self.restore(last)
        if last is not None:
            tell(f"resumed from step {self.step} ({self.images_seen:,} images seen)")
        self.inputs = StepInputs(self)
        self.log = RunLog(world.device)
        self.images_last_step = 0

    def restore(self, path: Path | None) -> None:
        """Continue from a checkpoint (None: from the start): weights, optimizer states, EMAs,
        counters, RNG states, the method's state, rollbacks so far (their learning-rate scale), and
        the data streams reopened at their positions."""
        world = self.world
        local: dict[str, Any] = {}
        self.step, self.images_seen, self.rollbacks = 0, 0, []
        self.failures_state, self.phase, self.parts = {}, None, world.size
        if path is not None:
            written = checkpoint.read_state(path)
            self.parts = checkpoint.data_parts(written)
            share(self.parts, world.rank, world.size, self.spec_micro)  # refused before anything is loaded
            state, local = checkpoint.load(
                path, engines=self.engines, emas=self.emas, world=world, spec_dict=self.spec_dict
            )
            self.step, self.images_seen = state["step"], state["images_seen"]
            self.rollbacks = list(state.get("rollbacks", []))
            self.failures_state = state.get("failures", {})  # the detectors' history (train/failures.py)
            if "schedule" in state:  # a step in a new phase after the resume still resets the optimizers
                self.phase = (state["schedule"]["stage"], state["schedule"]["phase"] == "fade")
            torch.set_rng_state(local["rng"]["cpu"])
            self.latent_rng.set_state(local["rng"]["latents"])
            if "cuda" in local["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(local["rng"]["cuda"])
            self.method.load_state_dict(local.get("method", {}))
        self.apply_schedule(positions=local.get("streams", {}))

    def apply_schedule(self, positions: dict[str, Any] | None = None) -> None:
        """The method's schedule for the coming step (ProGAN's growth; most methods have none): the
        growing networks' stage and alpha, the learning rates, and the data streams, reopened at
        their positions when the resolution or the batch changes (or `positions` are given: the
        first opening)."""
        spec, world = self.spec, self.world
        s = self.schedule = self.method.schedule(self.images_seen)
        resolution = s.resolution if s is not None and s.resolution is not None else spec.data.resolution
        micro = self.spec_micro
        if s is not None:
            if s.reset_optimizers and self.phase is not None and s.phase != self.phase:
                for engine in self.engines.values():
                    engine.reset_optimizer()
            self.phase = s.phase
            for net in [*self.nets.values(), *(ema.module for ema in self.emas.values())]:
                if isinstance(net, GraphModule) and net.growth is not None:
                    net.set_stage(s.stage, s.fading, s.alpha)
            if s.batch_size is not None:  # preflight checked that it splits
                micro = s.batch_size // (self.accum * world.size)
        if positions is None and (resolution, micro) == self.data_shape:
            if s is not None and (s.lr, s.lr_scale) != self._scheduled_lr:
                self.scale_lrs()
            return
        self.scale_lrs()
        if positions is None:  # a new stage: the streams continue where they are
            positions = {name: loader.state_dict() for name, loader in self.streams.items()}
            self.skipped_before += sum(getattr(loader, "skipped", 0) for loader in self.streams.values())
        close(self.streams)  # replaced
        self.data_shape, self.micro = (resolution, micro), micro
        stage = f"stage {resolution}x{resolution}: " if s is not None and s.resolution is not None else ""
        self.say(f"{stage}opening the data streams at {resolution}x{resolution}, {micro} per micro-batch")
        self.streams = open_streams(
            spec, world, resolution=resolution, micro=micro, parts=self.parts, dtype=self.dtype, positions=positions
        )

    def scale_lrs(self) -> None:
        """Learning rates: the spec's (or the schedule's at this stage), times the schedule's factor
        and the scale of every rollback so far."""
        s = self.schedule
        scheduled, factor = (dict(s.lr), s.lr_scale) if s is not None else ({}, 1.0)
        self._scheduled_lr = (scheduled, factor)
        spec, self.lrs = self.spec, {}
        needs = spec.method.networks(spec)
        for name, members in spec.method.engines(spec).items():
            # a rollback scales the engines it names (every engine: one written before it named them)
            scale = factor * math.prod(r["lr_scale"] for r in self.rollbacks if name in r.get("engines", [name]))
            base = spec.opt_of(members[0]).lr
            lr = scheduled.get(needs[members[0]].role, base)
            self.engines[name].scale_lr(scale * lr / base)
            self.lrs[f"lr_{name.lower()}"] = lr * scale

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        world, classes, latent = self.world, self.spec.data.num_classes, self.spec.latent
        assert latent is not None, "a method that draws latents has a spec with `latent`"
        shape = (n * world.size, latent.z_dim)
        if latent.distribution == "uniform":
            z = torch.rand(shape, generator=self.latent_rng) * 2 - 1
        else:
            z = torch.randn(shape, generator=self.latent_rng)
        y = torch.randint(0, classes, (n * world.size,), generator=self.latent_rng) if classes else None
        part = slice(world.rank * n, (world.rank + 1) * n)
        return z[part].to(world.device), None if y is None else y[part].to(world.device)

    # ----- one step: every phase of the method, then the EMAs
    def run_step(self) -> list[str]:
        """One step; returns what became non-finite in it ('loss_g became nan'), usually nothing
        (one host synchronisation)."""
        start_images, losses = self.images_seen, dict[str, torch.Tensor]()
        self.apply_schedule()
        for phase in self.method.phases:
            for _ in range(phase.repeat):
                with frozen(*(self.nets[n] for n in phase.frozen)):
                    for _ in range(self.accum):
                        phase_losses, values = phase.objective(self.inputs)
                        for name in phase.steps:
                            with region(f"{name}_bwd"):
                                self.engines[name].backward(phase_losses[name])
                        for name in phase.steps:
                            with region(f"opt_{name}"):
                                norm = self.engines[name].step()
                            if norm is not None:
                                values[f"grad_norm_{name.lower()}"] = norm
                        self.log.add(values)
                        for key in (k for k in values if k.startswith("loss_")):
                            losses[key] = losses[key] + values[key] if key in losses else values[key]
        with region("ema"):
            for name, ema in self.emas.items():
                ema.update(self.nets[name], self.images_seen)
        self.step += 1
        self.images_last_step = self.images_seen - start_images
        keys = list(losses)
        finite = torch.isfinite(torch.stack([losses[k].float() for k in keys])).tolist() if keys else []
        return [f"{k} became {losses[k].item()}" for k, ok in zip(keys, finite, strict=True) if not ok]

    def scored(self) -> dict[str, torch.nn.Module]:
        """The exported networks as sampling and evaluation see them: their EMA where they have one."""
        return {
            name: self.emas[name].module if name in self.emas else self.nets[name]
            for name in self.spec.method.exports(self.spec)
        }

    def step_or_stop(self) -> None:
        """`run_step`, stopping the run (naming the checkpoint to resume from) when a loss became
        non-finite or the step ran out of memory."""
        try:
            bad = self.run_step()
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not out_of_memory(exc):
                raise
            raise stopped_out_of_memory(exc, self) from None
        if bad:
            raise stopped(bad, self.step, self.run_dir)

    def read(self, stream: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next micro-batch of a stream, counted as real images seen (all ranks together)."""
        with region("data_wait"):
            batch = next(self.streams[stream])
        self.images_seen += self.micro * self.world.size
        return batch

    def roll_back(self, target: Path, rollback: dict[str, Any], *, reseed: bool) -> None:
        """Back to checkpoint `target`, with one more rollback scaling the learning rates and
        (`reseed`) latents drawn afresh, so that the run does not replay the same draws."""
        rollbacks = [*self.rollbacks, rollback]
        self.restore(target)
        self.rollbacks = rollbacks
        self.scale_lrs()
        if reseed:
            self.latent_rng.manual_seed(self.spec.seed + 1_000_003 * len(rollbacks))

    def start_at(self, images_seen: int) -> None:
        """Continue as if `images_seen` real images had been read: the schedule there (`profile`
        measures a method's last phase)."""
        self.images_seen = images_seen
        self.apply_schedule()

    def rank_state(self) -> dict[str, Any]:
        """What each rank checkpoints of its own: its streams' positions, the method's state, the latents' RNG."""
        return {
            "streams": {name: loader.state_dict() for name, loader in self.streams.items()},
            "method": self.method.state_dict(),
            "rng": {"latents": self.latent_rng.get_state()},
        }

    def summary(self, steps_run: int) -> RunSummary:
        return RunSummary(self.run_dir, self.step, self.t.max_steps, steps_run, self.images_seen)


def train(
    loaded: LoadedSpec, *, device: str | None = None, stop_after: int | None = None, evaluate: Evaluator | None = None
) -> RunSummary:
    """Train (or resume) the run a spec describes; say where it ended. `evaluate` scores the
    exported networks every `eval.every` steps (the CLI passes the method's evaluation in).
    `stop_after` ends the process's work after that many steps without a final checkpoint (tests
    use it to stand in for a killed run)."""
    complete = already_complete(loaded.spec)
    if complete is not None:
        return complete
    check_before_building(loaded.spec, world_size_from_environment())  # before anything is built or written
    if rank_from_environment() != 0:
        return _train(loaded, device=device, stop_after=stop_after, evaluate=evaluate)
    run_dir = loaded.spec.run_dir
    fresh = not run_dir.exists()
    try:
        with run_lock(run_dir):  # one writer per run directory
            return _train(loaded, device=device, stop_after=stop_after, evaluate=evaluate)
    except SpecError as exc:
        if fresh and not isinstance(exc, TrainingStopped):  # a refusal, not a run that stopped
            Run(run_dir).remove_if_unused()
        raise


def _first_step_note(spec: Spec) -> str:
    """What the first step does besides training, when it is slow."""
    if not spec.compile.enabled:
        return ""
    return (
        f"; the first step compiles the networks (torch.compile, scope {spec.compile.scope}: a minute or more "
        "cold, seconds with a warm cache)"
    )


def _train(loaded: LoadedSpec, *, device: str | None, stop_after: int | None, evaluate: Evaluator | None) -> RunSummary:
    # ----- build and restore: networks, engines, data streams, at the latest checkpoint if any
    tr = Trainer(loaded, device=device)
    run, main = Run(tr.run_dir), tr.world.is_main
    if main:
        run.begin(tr.spec_dict, tr.step)  # the resolved spec; lines logged after the resumed checkpoint dropped

    # ----- what happens between steps: each part keeps its own interval (steps or images)
    metrics = MetricsWriter(run, enabled=main)
    watch = FailureWatch(tr, metrics)  # ganhacks tip 10: stop or roll back on a failing run
    progress = Progress(tr.t.max_steps, tr.step, enabled=main)
    evaluation = Evaluation(tr, metrics, evaluate)
    checkpoints = Checkpoints(tr, watch)
    tasks: list[Task] = [LogLines(tr, metrics, watch, progress), SampleGrids(tr, run), evaluation, progress]

    done = 0  # steps trained by this call
    with ExitStack() as cleanup:
        stop = cleanup.enter_context(StopSignal())  # Ctrl-C / SIGTERM: finish the step, save, stop
        cleanup.callback(progress.close)
        cleanup.callback(metrics.close)
        evaluation.before_training()
        tr.say(f"training from step {tr.step} to {tr.t.max_steps}" + _first_step_note(tr.spec))
        tasks.insert(0, FirstStepPace(tr))  # from here
        while tr.step < tr.t.max_steps:
            images_before = tr.images_seen
            tr.step_or_stop()  # every phase of the method; stops on a NaN loss or out of memory
            try:
                for task in tasks:
                    task.after_step(tr.step, images_before)
            except RolledBack:
                continue
            done += 1
            if stop_after is not None and done >= stop_after:
                return tr.summary(done)
            checkpoints.after_step(tr.step, images_before, now=stop.noted)
            if stop.noted:
                raise Interrupted(
                    f"interrupted at step {tr.step} of {tr.t.max_steps}; checkpoint written to "
                    f"{checkpoints.last_saved}. Run the same command again to resume from it."
                )
    if main:
        run.write_export(tr.scored(), tr.spec_dict)
    dist.barrier()
    return tr.summary(done)
