"""The training loop: `python -m pipeline train SPEC [key=value ...]`.

Reads top to bottom: setup, networks and engines, data streams, resume, then steps made of the
method's phases (for a GAN: `d_steps` discriminator steps, then one generator step) until
`train.max_steps`. The method says what each phase computes; this file owns backward, optimizer
steps, EMAs, logging, samples, checkpoints, signals and NaN stops. Progress is counted in real
images read from the data streams. Re-running the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.data.dali import loader_from_spec
from pipeline.data.parts import PartsLoader, share
from pipeline.distributed import engines as dist
from pipeline.errors import Issue, SpecError, user_error
from pipeline.graph import build_network, compile_network
from pipeline.images import save_png
from pipeline.methods import frozen
from pipeline.precision import DTYPES, autocast
from pipeline.profile.regions import region
from pipeline.spec.schema import due
from pipeline.train import checkpoint
from pipeline.train.ema import EMA
from pipeline.train.failures import Failure, FailureTracker, diversity
from pipeline.train.preflight import (
    batch_plan,
    check_before_building,
    rank_from_environment,
    world_size_from_environment,
)
from pipeline.train.run_lock import run_lock

# evaluate(networks to score by name, the spec) -> scores to log; the CLI passes one in
Evaluator = Callable[[dict[str, torch.nn.Module], object], dict]


class TrainingStopped(SpecError):
    """A run stopped on purpose (NaN); the last good checkpoint is intact."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the step in progress was finished and checkpointed; the message says where."""


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    step: int  # the run's step when this call ended
    max_steps: int
    steps_run: int  # steps trained by this call; 0 when the run was already complete
    images_seen: int


def export_files(spec) -> list[Path]:
    """What a finished run exports: each exported network's weights (its EMA's where it has one)."""
    return [spec.run_dir / "export" / f"{name}.safetensors" for name in spec.method.exports(spec)]


def already_complete(spec) -> RunSummary | None:
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

    def next(self, stream: str):
        with region("data_wait"):
            batch = next(self.tr.streams[stream])
        self.tr.images_seen += self.micro * self.tr.world.size
        return batch

    def latents(self, n: int):
        return self.tr.latents(n)

    def mixed(self):
        return autocast(self.tr.world.device.type, self.tr.t.precision)

    @property
    def images_seen(self) -> int:
        """Real images read so far, all ranks together (schedules follow it)."""
        return self.tr.images_seen

    @property
    def step(self) -> int:
        """Steps completed before this one: the same in every phase, repeat and micro-batch of a step."""
        return self.tr.step

    counting_flops = False  # the meta-device stand-in used to count FLOPs says True


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


class Trainer:
    """Everything a run builds: process group, networks, EMAs, engines, data streams, and the
    method's phases. `train` and `profile` both build it, so a profile measures exactly what
    training runs. Named regions (`D_fwd`, `opt_G`, ...) are free unless a profile switches them on."""

    def __init__(self, loaded, *, device: str | None = None, resume: bool = True):
        spec, t = loaded.spec, loaded.spec.train
        self.spec, self.t = spec, t
        self.world = world = dist.setup(device, spec.run.collective_timeout_s)
        self.micro, self.accum = batch_plan(t, world.size)
        self.spec_micro = self.micro
        self.run_dir = spec.run_dir
        self.spec_dict = spec.resolved()
        self.method = spec.method.build(spec)
        self.schedule, self.data_shape, self.skipped_before, self.streams = None, None, 0, {}
        needs = spec.method.networks(spec)

        # ----- networks, EMAs and engines: identical initial weights on every rank
        torch.manual_seed(spec.seed)
        self.nets = {name: build_network(loaded, name, world.device, compile=False) for name in needs}
        self.emas = {}
        for name in needs:  # an eager copy, kept in fp32 even under bf16
            ema = spec.ema_of(name)
            if ema is not None:
                self.emas[name] = EMA(self.nets[name], ema.decay, ema.start_images, dtype=torch.float32)
        for net in self.nets.values():
            compile_network(net, spec.compile)
        config = dist.engine_config(t, self.micro, self.accum, world.size)
        self.engines = {
            engine: dist.Engine(
                engine, {n: self.nets[n] for n in members}, {n: spec.opt_of(n) for n in members}, config
            )
            for engine, members in spec.method.engines(spec).items()
        }
        # bf16: convolutions and matrix products in bf16, norms, losses and master weights in fp32
        self.dtype = DTYPES[t.precision]

        # ----- latents: one generator for the global batch, each rank takes its slice, so that a
        # run on N ranks draws the same z as a run on one
        self.latent_rng = torch.Generator().manual_seed(spec.seed)

        # ----- resume, and the data: one reader per stream, each at its checkpointed position
        last = checkpoint.latest_intact(self.run_dir) if resume else None
        self.restore(last)
        self._probe = None  # the fixed latents of sample_diversity
        self.inputs = StepInputs(self)
        self.log = RunLog(world.device)
        self.images_last_step = 0

    def restore(self, path: Path | None) -> None:
        """Continue from a checkpoint (None: from the start): weights, optimizer states, EMAs,
        counters, RNG states, the method's state, rollbacks so far (their learning-rate scale), and
        the data streams reopened at their positions."""
        spec, world = self.spec, self.world
        self.step, self.images_seen, self.rollbacks, local = 0, 0, [], {}
        self.failures_state = {}
        self.phase = None  # the (stage, fading) of the last step taken, if the method has a schedule
        self.parts = world.size  # the data's parts (data/parts.py): one per rank of the run's first start
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
        together = spec.method.read_together(spec)
        sizes = {name: getattr(loader, "dataset_size", None) for name, loader in self.streams.items()}
        if together and len(set(sizes.values())) > 1:
            raise user_error(
                "the method reads its streams as pairs, but they hold "
                + ", ".join(f"{n}: {size} samples" for n, size in sizes.items()),
                path="data.streams",
                hint="paired streams hold the same samples in the same order; set method.paired=false for "
                "unpaired data (and method.lambda_cs=0)",
            )

    def apply_schedule(self, positions: dict | None = None) -> None:
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
                if getattr(net, "growth", None) is not None:
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
        for loader in self.streams.values():  # replaced: released now (see DaliLoader.close)
            if hasattr(loader, "close"):
                loader.close()
        self.data_shape, self.micro = (resolution, micro), micro
        together = spec.method.read_together(spec)

        def part_reader(name: str, labelled: bool, seed_offset: int):
            def make(part: int, batch: int, state):
                return loader_from_spec(
                    spec,
                    stream=name,
                    labelled=labelled,
                    seed_offset=seed_offset,
                    batch_size=batch,
                    resolution=resolution,
                    device=world.device,
                    rank=part,
                    world_size=self.parts,
                    state=state,
                    dtype=self.dtype,
                )

            return make

        self.streams = {
            name: PartsLoader(
                part_reader(name, labelled, 0 if together else i),
                self.parts,
                world.rank,
                world.size,
                micro,
                positions.get(name),
            )
            for i, (name, labelled) in enumerate(spec.method.streams(spec).items())
        }

    def sample_diversity(self, failures) -> float | None:
        """The diversity (failures.diversity) of G's images of a fixed latent batch, for the gan
        method with the detector on; None otherwise. G as exported (its EMA when it has one), in
        evaluation mode, drawing nothing from the run's random streams."""
        m, spec = self.spec.method, self.spec
        if failures.diversity_below == 0 or m.kind != "gan" or spec.latent is None:
            return None
        if self._probe is None:
            generator = torch.Generator().manual_seed(spec.seed + 2)
            z = torch.randn(32, spec.latent.z_dim, generator=generator).to(self.world.device)
            classes = spec.data.num_classes
            y = (torch.arange(32) % classes).to(self.world.device) if classes else None
            self._probe = (z, y)
        G = self.emas[m.generator].module if m.generator in self.emas else self.nets[m.generator]
        mode = G.training
        G.eval()
        with torch.no_grad():
            value = diversity(G(*self._probe))
        G.train(mode)
        return value

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
        world, classes = self.world, self.spec.data.num_classes
        shape = (n * world.size, self.spec.latent.z_dim)
        if self.spec.latent.distribution == "uniform":
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
        start_images, losses = self.images_seen, {}
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

    def rank_state(self) -> dict:
        return {
            "streams": {name: loader.state_dict() for name, loader in self.streams.items()},
            "method": self.method.state_dict(),
        }

    def data_health(self) -> dict[str, int]:
        """Samples skipped (all ranks) for a logged line; stops the run when a stream's shard was
        found damaged (with data.on_bad_sample: error; a warning with skip) or more than
        data.max_bad_samples were skipped. Every rank takes part in the one collective, so every
        rank stops together; the rank that found a damaged shard names it."""
        d = self.spec.data
        damaged = [(name, shard) for name, loader in self.streams.items() for shard in _new_damage(loader)]
        skipped = self.skipped_before + sum(getattr(loader, "skipped", 0) for loader in self.streams.values())
        totals = dist.all_mean({"damaged": len(damaged), "skipped": skipped}, self.world.device)
        damaged_total, skipped_total = (round(v * self.world.size) for v in totals.values())
        roots = {name: getattr(loader, "shards", None) for name, loader in self.streams.items()}
        for name, (shard, keys) in damaged:
            root = roots[name].root if roots[name] is not None else None
            message = (
                f"shard {shard} of stream {name!r} ({root}) no longer matches the SHA-256 in its manifest: it "
                "changed or was damaged after it was written, and images read from it may be corrupt"
            )
            if keys:
                shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                message += f"; damaged samples: {shown}"
            if d.on_bad_sample == "error":
                raise user_error(
                    message,
                    path=roots[name].path if roots[name] is not None else "data.shards",
                    hint=f"`python -m pipeline shards check {root}` names the damaged samples; rebuild the shard, "
                    "or set data.on_bad_sample=skip to train on with a warning",
                )
            print(f"warning: {message}; training goes on (data.on_bad_sample=skip)", file=sys.stderr)
        if damaged_total and d.on_bad_sample == "error":
            raise user_error(f"another rank found {damaged_total} damaged shard(s) (its message names them)")
        if skipped_total > d.max_bad_samples:
            raise user_error(
                f"{skipped_total} bad samples were skipped, more than data.max_bad_samples={d.max_bad_samples}",
                path="data.max_bad_samples",
                hint="`python -m pipeline shards check DIR` names them; rebuild the shards, or raise the bound",
            )
        return {"data_skipped": skipped_total}

    def non_finite_weights(self) -> list[str]:
        """'generator has N non-finite weights' for each network (and EMA) whose parameters or
        buffers are not all finite: what a NaN or infinite update leaves even when the losses looked fine."""
        nets = dict(self.nets) | {f"the EMA of {name}": ema.module for name, ema in self.emas.items()}
        found = []
        for name, net in nets.items():
            tensors = [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
            count = int(sum((~torch.isfinite(t)).sum() for t in tensors))
            if count:
                found.append(f"{name} has {count} non-finite weights")
        return found


def train(
    loaded, *, device: str | None = None, stop_after: int | None = None, evaluate: Evaluator | None = None
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
    with run_lock(loaded.spec.run_dir):  # one writer per run directory
        return _train(loaded, device=device, stop_after=stop_after, evaluate=evaluate)


def _train(loaded, *, device: str | None, stop_after: int | None, evaluate: Evaluator | None) -> RunSummary:
    tr = Trainer(loaded, device=device)
    spec, t, world, run_dir = tr.spec, tr.t, tr.world, tr.run_dir
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump(tr.spec_dict, sort_keys=False))
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main:  # drop lines logged after the checkpoint we resume from
        _keep_metrics_until(metrics_path, tr.step)
    evaluate = evaluate if spec.eval.every else None
    # the method's sample grid: fixed inputs, chosen once
    grid = spec.method.sample_grid(spec, world.device) if world.is_main else None
    writer = _tensorboard(run_dir) if world.is_main else None

    def write_line(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, tr.images_seen)

    def write_samples(at: int) -> None:
        nets = tr.nets | tr.scored()  # the exported networks' EMAs in place of the networks
        modes = {name: net.training for name, net in nets.items()}
        for net in nets.values():
            net.eval()
        with torch.no_grad():
            for suffix, images in grid(nets).items():
                save_png(images, run_dir / "samples" / f"step-{at:08d}{suffix}.png")
        for name, net in nets.items():
            net.train(modes[name])

    def write_eval(at: int) -> None:
        result = evaluate(tr.scored(), spec)
        write_line({"step": at, "images_seen": tr.images_seen, **result})

    def save_checkpoint(at: int) -> Path:
        state = {"step": at, "images_seen": tr.images_seen, "world_size": world.size, "data_parts": tr.parts}
        state["spec"] = tr.spec_dict
        state["rollbacks"] = tr.rollbacks
        if tracker is not None:
            state["failures"] = tracker.state_dict()
        if grown := tr.schedule.record() if tr.schedule is not None else {}:  # the last step's stage, phase, alpha
            state["schedule"] = grown
        rank_state = tr.rank_state() | {"rng": {"latents": tr.latent_rng.get_state()}}
        return checkpoint.save(
            run_dir,
            at,
            engines=tr.engines,
            emas=tr.emas,
            world=world,
            rank_state=rank_state,
            state=state,
            keep=t.keep_checkpoints,
        )

    # ----- failure tracking (ganhacks tip 10): detectors over each logged line
    failures = t.failures
    tracker = None
    if failures.on_failure != "off":
        tracker = FailureTracker(failures, bounded_d_loss=getattr(spec.method, "loss", None) != "wgan_gp")
        tracker.reset(tr.failures_state)

    def roll_back(found: list[Failure], step: int) -> None:
        """Reload the newest checkpoint from before the symptom began, scale the learning rates,
        reseed the latents, and log the rollback with what triggered it."""
        reason = "; ".join(f.message for f in found)
        since = min(f.since_step for f in found)
        if len(tr.rollbacks) >= failures.max_rollbacks:
            limit = f"{reason} (after {len(tr.rollbacks)} rollbacks, train.failures.max_rollbacks)"
            raise _stopped([limit], step, run_dir, before=since)
        target = checkpoint.latest_intact(run_dir, before=since)
        if target is None:
            raise _stopped([f"{reason}; no checkpoint from before step {since} to roll back to"], step, run_dir)
        # the engines whose gradient norm fired have their learning rates scaled; every engine when
        # another detector fired (D at 0, G fooling D, collapse: the balance, not one network)
        of_key = {f"grad_norm_{name.lower()}": name for name in tr.engines}
        named = {of_key.get(f.key) for f in found}
        engines = sorted(named) if None not in named else sorted(tr.engines)
        rollback = {"at_step": step, "reason": reason, "lr_scale": failures.rollback.lr_scale, "engines": engines}
        rollbacks = [*tr.rollbacks, rollback]
        tr.restore(target)
        tr.rollbacks = rollbacks
        tr.scale_lrs()
        if failures.rollback.reseed:
            tr.latent_rng.manual_seed(spec.seed + 1_000_003 * len(rollbacks))
        tracker.reset(tr.failures_state)
        if world.is_main:
            _keep_metrics_until(metrics_path, tr.step)
            write_line({"step": tr.step, "images_seen": tr.images_seen, "rollback": len(rollbacks), **rollbacks[-1]})
            print(f"warning: rolled back from step {step} to {target} ({reason})", file=sys.stderr)

    # ----- Ctrl-C / SIGTERM: finish the step, save, stop
    stop = _StopSignal()
    progress = _Progress(t.max_steps, tr.step, enabled=world.is_main)
    tick, tick_images, done = time.perf_counter(), tr.images_seen, 0  # done: steps trained by this call
    with ExitStack() as cleanup:
        cleanup.enter_context(stop)
        cleanup.callback(progress.close)
        if writer is not None:
            cleanup.callback(writer.close)
        if world.is_main and evaluate and tr.step == 0:
            write_eval(0)  # the untrained networks: the baseline the scores fall from
        while tr.step < t.max_steps:
            # ----- one step
            images_before = tr.images_seen
            try:
                bad = tr.run_step()
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if not _out_of_memory(exc):
                    raise
                raise _stopped_out_of_memory(exc, tr) from None
            step = tr.step
            if bad:
                raise _stopped(bad, step, run_dir)

            # ----- log, samples, evaluation; intervals in steps or images, and always at the last step
            now_due = {
                name: due(getattr(t, name), step, images_before, tr.images_seen) or step == t.max_steps
                for name in ("log_every", "sample_every", "checkpoint_every")
            }
            if now_due["log_every"]:
                now = time.perf_counter()
                record = {"step": step, "images_seen": tr.images_seen, **tr.log.means(), **tr.lrs}
                if tr.schedule is not None:  # the schedule of the step just taken
                    record |= tr.schedule.record()
                record |= tr.data_health()
                record["images_per_s"] = (tr.images_seen - tick_images) / (now - tick)
                tick, tick_images = now, tr.images_seen
                found = _agreed(tracker.check(record, tr.sample_diversity(failures)) if tracker else [], world)
                if found and world.is_main:  # the line says what was detected in it
                    record["failure"] = sorted({f.detector for f in found})
                    record["failure_message"] = "; ".join(f.message for f in found)
                    print(f"warning: step {step}: {record['failure_message']}", file=sys.stderr)
                if world.is_main:
                    write_line(record)
                progress.update(step, record)
                _return_freed_host_memory()
                if found:
                    if failures.on_failure == "stop":
                        since = min(f.since_step for f in found)
                        raise _stopped(["; ".join(f.message for f in found)], step, run_dir, before=since)
                    if failures.on_failure == "rollback":
                        roll_back(found, step)
                        tick, tick_images = time.perf_counter(), tr.images_seen
                        continue
            if world.is_main and now_due["sample_every"]:
                write_samples(step)
            if world.is_main and evaluate and (step % spec.eval.every == 0 or step == t.max_steps):
                write_eval(step)
            progress.advance(step)
            done += 1
            if stop_after is not None and done >= stop_after:
                return RunSummary(run_dir, step, t.max_steps, done, tr.images_seen)

            # ----- checkpoint: only when every weight is finite
            if now_due["checkpoint_every"] or stop.signum is not None:
                bad = tr.non_finite_weights()
                if bad:
                    raise _stopped(bad, step, run_dir)
                saved = save_checkpoint(step)
            if stop.signum is not None:
                raise Interrupted(
                    f"interrupted at step {step} of {t.max_steps}; checkpoint written to {saved}. "
                    "Run the same command again to resume from it."
                )
    if world.is_main:
        export(run_dir, tr.scored(), tr.spec_dict)
    dist.barrier()
    return RunSummary(run_dir, tr.step, t.max_steps, done, tr.images_seen)


class _StopSignal:
    """Inside: Ctrl-C and SIGTERM are noted (`signum`) instead of interrupting; the loop finishes
    the step, checkpoints and stops. The previous handlers come back on leaving."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _new_damage(loader) -> list[tuple[str, list[str]]]:
    return loader.new_damage() if hasattr(loader, "new_damage") else []  # a synthetic stream has no shards


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


def _return_freed_host_memory() -> None:
    """Give the memory glibc holds freed on its heap back to the system. Once a growing network's
    activation sizes change (a new stage), the heap fragments: measured on this CPU at progan_demo's
    32x32 stage, resident memory grew by about 8 MB a step (1.4 to 1.9 GB in 60 steps), and stayed at
    0.74 GB with malloc_trim after each step. Called once per logged line; nothing where there is
    no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _keep_metrics_until(path: Path, step: int) -> None:
    if path.exists():
        kept = [line for line in _metric_lines(path) if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _agreed(found: list[Failure], world) -> list[Failure]:
    """Rank 0's failures, on every rank (each rank's logged means are its own): one collective."""
    if world.size == 1:
        return found
    mine = {"fired": float(bool(found)), "since": float(min((f.since_step for f in found), default=0))}
    sent = dist.all_mean({k: v if world.is_main else 0.0 for k, v in mine.items()}, world.device)
    if sent["fired"] * world.size < 0.5:
        return []
    return found if world.is_main else [Failure("rank 0", "rank 0 found a failure", round(sent["since"] * world.size))]


def _out_of_memory(exc: RuntimeError) -> bool:
    # CUDA's allocator raises torch.OutOfMemoryError; the CPU allocator a RuntimeError naming itself
    return isinstance(exc, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(exc)


def _stopped_out_of_memory(exc: RuntimeError, tr: Trainer) -> TrainingStopped:
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


def _stopped(problems: list[str], step: int, run_dir: Path, *, before: int | None = None) -> TrainingStopped:
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


def _metric_lines(path: Path) -> list[str]:
    """The lines of metrics.jsonl; a partial last line (a crash or a full disk mid-append) is
    dropped with a warning, any other line that is not a JSON record is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as exc:
            if number == len(lines):
                print(f"warning: {path}:{number}: dropping a partial last line ({exc})", file=sys.stderr)
                return lines[:-1]
            raise user_error(
                f"line {number} is not a metrics record: {exc}",
                file=str(path),
                hint="fix or delete that line; the checkpoints are unaffected",
            ) from None
    return lines


def export(run_dir: Path, networks: dict[str, torch.nn.Module], spec_dict: dict) -> Path:
    """Each exported network's weights (the EMA's where there is one) as NAME.safetensors, and the
    spec beside them."""
    from safetensors.torch import save_file

    out = run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    for name, net in networks.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, out / f"{name}.safetensors")
    (out / "spec.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    return out


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl has everything
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class _Progress:
    """A progress bar with images/s and the time left on a terminal; a line per log interval
    otherwise. The time left is this process's mean seconds per step times the steps left (rich's
    own estimate needs several updates within 30 s, which a slow machine never gives)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled, self.t0 = total, start, enabled, time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("{task.fields[left]}"),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="", left="")
            self.bar.start()

    def time_left(self, step: int) -> str:
        if step <= self.start:
            return "time left: -"
        seconds = int((time.perf_counter() - self.t0) / (step - self.start) * max(0, self.total - step))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d} left"

    def advance(self, step: int) -> None:
        """After every step (cheap): the bar and the time left move even between log lines."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, left=self.time_left(step))

    def update(self, step: int, record: dict) -> None:
        losses = "  ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        info = f"{record['images_per_s']:.0f} img/s  {losses}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info, left=self.time_left(step))
        elif self.enabled:
            print(
                f"step {step}/{self.total}  images {record['images_seen']}  {info}  {self.time_left(step)}", flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
