"""The training loop: `python -m pipeline train SPEC [key=value ...]`.

Reads top to bottom: setup, networks and engines, data, resume, then steps made of phases
(`d_steps` discriminator steps, then one generator step) until `train.max_steps`. Progress is
counted in real images seen by D. Re-running the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.data.dali import loader_from_spec
from pipeline.distributed import engines as dist
from pipeline.errors import Issue, SpecError, user_error
from pipeline.eval.sampling import save_png
from pipeline.graph import build_network, compile_network
from pipeline.precision import DTYPES, autocast
from pipeline.profile.regions import region
from pipeline.train import checkpoint
from pipeline.train.ema import EMA
from pipeline.train.losses import get_loss
from pipeline.train.preflight import (
    batch_plan,
    check_before_building,
    rank_from_environment,
    world_size_from_environment,
)
from pipeline.train.regularizers import gradient_penalty, ortho_penalty, r1_penalty
from pipeline.train.run_lock import run_lock


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


def already_complete(spec) -> RunSummary | None:
    """The summary of a run that needs nothing more: its latest checkpoint is at (or past)
    `train.max_steps` for this very spec and its export is written. Nothing is built for it."""
    run_dir = spec.run_dir
    last = checkpoint.latest(run_dir)
    if last is None or not (run_dir / "export" / "generator.safetensors").exists():
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


@contextmanager
def frozen(module: torch.nn.Module):
    """No gradient reaches `module`'s parameters inside (D during the G step). With DeepSpeed,
    D's next backward fails ("gradient computed twice") unless D is frozen here."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


@dataclass
class Phase:
    name: str
    repeat: int
    run: Callable[[], dict]


def make_loss(train):
    """The spec's loss with its options (label smoothing and flipping belong to non_saturating)."""
    options = {"label_smoothing": train.label_smoothing, "flip_prob": train.label_flip}
    if train.loss != "non_saturating" and any(options.values()):
        raise user_error(
            f"label_smoothing and label_flip apply to the non_saturating loss, not {train.loss}", path="train.loss"
        )
    return get_loss(train.loss, **(options if train.loss == "non_saturating" else {}))


def grad_norm(engine) -> float | None:
    """L2 norm of the accumulated gradient at an optimizer step (None between accumulation steps,
    and under ZeRO 1/2, where gradients live in DeepSpeed's partitions rather than in .grad)."""
    if not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item() if grads else None


class Trainer:
    """Everything a run builds: process group, networks, EMA, engines, data, and the phases of one
    step (`d_steps` discriminator steps, then one generator step). `train` and `profile` both build
    it, so a profile measures exactly what training runs. Named regions (`D_fwd`, `opt_G`, ...) are
    free unless a profile switches them on."""

    def __init__(self, loaded, *, device: str | None = None, resume: bool = True):
        spec, t = loaded.spec, loaded.spec.train
        self.spec, self.t = spec, t
        self.world = world = dist.setup(device)
        self.micro, self.accum = batch_plan(t, world.size)
        self.run_dir = spec.run_dir
        self.spec_dict = spec.resolved()

        # ----- networks, EMA and engines: identical initial weights on every rank
        torch.manual_seed(spec.seed)
        self.G = build_network(loaded, "generator", world.device, compile=False)  # compiled after the EMA copy
        self.D = build_network(loaded, "discriminator", world.device)
        # the EMA (an eager copy) is kept in fp32 even under bf16
        self.ema = EMA(self.G, t.ema.decay, t.ema.start_images, dtype=torch.float32) if t.ema else None
        compile_network(self.G, spec.compile)
        config = dist.engine_config(t, self.micro, self.accum, world.size)
        self.g_engine = dist.make_engine(self.G, t.g_opt, config)
        self.d_engine = dist.make_engine(self.D, t.d_opt, config)
        self.loss = make_loss(t)
        # bf16: convolutions and matrix products in bf16, norms, losses and master weights in fp32
        self.dtype = DTYPES[t.precision]

        # ----- latents: one generator for the global batch, each rank takes its slice, so that a
        # run on N ranks draws the same z as a run on one
        self.latent_rng = torch.Generator().manual_seed(spec.seed)

        # ----- resume
        self.step, self.images_seen, loader_state = 0, 0, None
        last = checkpoint.latest_intact(self.run_dir) if resume else None
        if last is not None:
            state, local = checkpoint.load(
                last,
                g_engine=self.g_engine,
                d_engine=self.d_engine,
                ema=self.ema,
                world=world,
                spec_dict=self.spec_dict,
            )
            self.step, self.images_seen, loader_state = state["step"], state["images_seen"], local["loader"]
            torch.set_rng_state(local["rng"]["cpu"])
            self.latent_rng.set_state(local["rng"]["latents"])
            if "cuda" in local["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(local["rng"]["cuda"])
        self.loader = loader_from_spec(
            spec,
            batch_size=self.micro,
            device=world.device,
            rank=world.rank,
            world_size=world.size,
            state=loader_state,
            dtype=self.dtype,
        )
        self.phases = [Phase("D", t.d_steps, self.d_step), Phase("G", 1, self.g_step)]

    def mixed(self):
        return autocast(self.world.device.type, self.t.precision)

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        world = self.world
        z = torch.randn(n * world.size, self.spec.latent.z_dim, generator=self.latent_rng)
        y = torch.randint(0, self.spec.data.num_classes, (n * world.size,), generator=self.latent_rng)
        part = slice(world.rank * n, (world.rank + 1) * n)
        return z[part].to(world.device), y[part].to(world.device)

    # ----- the phases of one step
    def d_step(self) -> dict:
        t, micro, mixed = self.t, self.micro, self.mixed
        for _ in range(self.accum):
            with region("data_wait"):
                real, y_real = next(self.loader)
            with region("G_fwd"), torch.no_grad(), mixed():
                z, y_fake = self.latents(micro)
                fake = self.g_engine.module(z, y_fake)
            if t.r1_gamma:
                real = real.detach().requires_grad_(True)
            with region("D_fwd"), mixed():
                # D's raw module, as in the G step: the engine's forward adds output hooks that make
                # R1's torch.autograd.grad fail ("direct calls to backward"); engine.backward below
                # still scales by the accumulation steps and reduces the gradients
                logits = self.d_engine.module(
                    torch.cat([real, fake.to(real.dtype)]), torch.cat([y_real, y_fake])
                ).float()
                real_logits, fake_logits = logits[:micro], logits[micro:]
                d_loss = self.loss.d(real_logits, fake_logits)
                if t.r1_gamma:
                    d_loss = d_loss + t.r1_gamma / 2 * r1_penalty(real_logits, real)
                if t.gp_weight:
                    d_loss = d_loss + t.gp_weight * gradient_penalty(self.d_engine.module, real, fake, y_real)
            with region("D_bwd"):
                self.d_engine.backward(d_loss)
            with region("opt_D"):
                norm = grad_norm(self.d_engine)
                self.d_engine.step()
        return {
            "loss_d": d_loss.item(),
            "d_real": real_logits.mean().item(),
            "d_fake": fake_logits.mean().item(),
            **({"grad_norm_d": norm} if norm is not None else {}),
        }

    def g_step(self) -> dict:
        with frozen(self.D):
            for _ in range(self.accum):
                with region("G_fwd"), self.mixed():
                    z, y = self.latents(self.micro)
                    fake = self.g_engine(z, y)
                with region("D_fwd"), self.mixed():
                    g_loss = self.loss.g(self.d_engine.module(fake, y).float())  # D's raw module: no engine hooks
                if self.t.ortho_reg:
                    with region("G_fwd"):
                        g_loss = g_loss + ortho_penalty(self.g_engine.module, self.t.ortho_reg)
                with region("G_bwd"):
                    self.g_engine.backward(g_loss)
                with region("opt_G"):
                    norm = grad_norm(self.g_engine)
                    self.g_engine.step()
        return {"loss_g": g_loss.item(), **({"grad_norm_g": norm} if norm is not None else {})}

    def run_step(self) -> dict:
        """One step: every phase, then the EMA. Returns this rank's values to log."""
        values: dict[str, float] = {}
        for phase in self.phases:
            for _ in range(phase.repeat):
                values |= phase.run()
                if phase.name == "D":
                    self.images_seen += self.micro * self.accum * self.world.size
        if self.ema is not None:
            with region("ema"):
                self.ema.update(self.g_engine.module, self.images_seen)
        self.step += 1
        return values

    def non_finite_weights(self) -> list[str]:
        """'G has N non-finite values' for each network (and the EMA) whose parameters or buffers
        are not all finite: what a NaN or infinite update leaves even when the losses looked fine."""
        nets = {"G": self.g_engine.module, "D": self.d_engine.module}
        if self.ema is not None:
            nets["the EMA of G"] = self.ema.module
        found = []
        for name, net in nets.items():
            tensors = [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
            count = int(sum((~torch.isfinite(t)).sum() for t in tensors))
            if count:
                found.append(f"{name} has {count} non-finite weights")
        return found

    @property
    def images_per_step(self) -> int:
        """Real images through D per step, all ranks together."""
        return self.t.d_steps * self.t.batch_size


def train(loaded, *, device: str | None = None, stop_after: int | None = None) -> RunSummary:
    """Train (or resume) the run a spec describes; say where it ended.
    `stop_after` ends the process's work after that many steps without a final checkpoint (tests
    use it to stand in for a killed run)."""
    complete = already_complete(loaded.spec)
    if complete is not None:
        return complete
    check_before_building(loaded.spec, world_size_from_environment())  # before anything is built or written
    if rank_from_environment() != 0:
        return _train(loaded, device=device, stop_after=stop_after)
    with run_lock(loaded.spec.run_dir):  # one writer per run directory
        return _train(loaded, device=device, stop_after=stop_after)


def _train(loaded, *, device: str | None, stop_after: int | None) -> RunSummary:
    tr = Trainer(loaded, device=device)
    spec, t, world, run_dir = tr.spec, tr.t, tr.world, tr.run_dir
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump(tr.spec_dict, sort_keys=False))
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
        kept = [line for line in _metric_lines(metrics_path) if json.loads(line)["step"] <= tr.step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    # ----- fixed latents for sample grids: rows are classes, columns samples
    rows = min(10, spec.data.num_classes)
    sample_gen = torch.Generator().manual_seed(spec.seed + 1)
    sample_z = torch.randn(rows * 8, spec.latent.z_dim, generator=sample_gen).to(world.device)
    sample_y = torch.linspace(0, spec.data.num_classes - 1, rows).long().repeat_interleave(8).to(world.device)

    def write_samples(at: int) -> None:
        net = tr.ema.module if tr.ema is not None else tr.g_engine.module
        was_training = net.training
        net.eval()
        with torch.no_grad():
            save_png(net(sample_z, sample_y).unflatten(0, (rows, -1)), run_dir / "samples" / f"step-{at:08d}.png")
        net.train(was_training)

    # ----- periodic evaluation (main rank; the scorer and real statistics are made once)
    scorer = None

    def write_eval(at: int) -> None:
        nonlocal scorer
        from pipeline.eval.evaluate import evaluate_module, make_scorer

        e = spec.eval
        scorer = scorer or make_scorer(spec, e.features, world.device)
        net = tr.ema.module if tr.ema is not None else tr.g_engine.module
        result = evaluate_module(
            net,
            spec,
            scorer,
            num=e.num_samples,
            truncation=e.truncation,
            standing_passes=e.standing_stats,
            seed=spec.seed,
        )
        result["protocol"]["ema"] = tr.ema is not None
        record = {
            "step": at,
            "images_seen": tr.images_seen,
            **{k: v for k, v in result.items() if k != "protocol"},
            "eval_protocol": result["protocol"],
        }
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key in ("fid", "kid_mean", "is_mean", "class_accuracy"):
                if record.get(key) is not None:
                    writer.add_scalar(f"eval/{key}", record[key], tr.images_seen)

    def save_checkpoint(at: int) -> Path:
        return checkpoint.save(
            run_dir,
            at,
            g_engine=tr.g_engine,
            d_engine=tr.d_engine,
            ema=tr.ema,
            world=world,
            loader_state=tr.loader.state_dict(),
            keep=t.keep_checkpoints,
            state={
                "step": at,
                "images_seen": tr.images_seen,
                "world_size": world.size,
                "spec": tr.spec_dict,
                "latent_rng": tr.latent_rng.get_state(),
            },
        )

    # ----- Ctrl-C / SIGTERM: finish the step, save, stop
    stop = {"signal": None}
    previous = {
        s: signal.signal(s, lambda signum, _: stop.update(signal=signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    writer = _tensorboard(run_dir) if world.is_main else None
    progress = _Progress(t.max_steps, tr.step, enabled=world.is_main)
    tick, tick_images, done = time.perf_counter(), tr.images_seen, 0  # done: steps trained by this call
    try:
        if world.is_main and spec.eval.every and tr.step == 0:
            write_eval(0)  # the untrained generator: the baseline the scores fall from
        while tr.step < t.max_steps:
            values = tr.run_step()
            step = tr.step
            bad = [f"{k} became {values[k]}" for k in ("loss_d", "loss_g") if not math.isfinite(values[k])]
            if bad:
                raise _stopped(bad, step, run_dir)
            if step % t.log_every == 0 or step == t.max_steps:
                now = time.perf_counter()
                values = dist.all_mean(values, world.device)
                record = {
                    "step": step,
                    "images_seen": tr.images_seen,
                    **values,
                    "lr_g": t.g_opt.lr,
                    "lr_d": t.d_opt.lr,
                    "images_per_s": (tr.images_seen - tick_images) / (now - tick),
                }
                tick, tick_images = now, tr.images_seen
                if world.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for key, value in record.items():
                            if key != "step":
                                writer.add_scalar(key, value, tr.images_seen)
                progress.update(step, record)
            if world.is_main and (step % t.sample_every == 0 or step == t.max_steps):
                write_samples(step)
            if world.is_main and spec.eval.every and (step % spec.eval.every == 0 or step == t.max_steps):
                write_eval(step)
            progress.advance(step)
            done += 1
            if stop_after is not None and done >= stop_after:
                return RunSummary(run_dir, step, t.max_steps, done, tr.images_seen)
            if step % t.checkpoint_every == 0 or step == t.max_steps or stop["signal"] is not None:
                bad = tr.non_finite_weights()  # a checkpoint is only written when every weight is finite
                if bad:
                    raise _stopped(bad, step, run_dir)
                saved = save_checkpoint(step)
            if stop["signal"] is not None:
                raise Interrupted(
                    f"interrupted at step {step} of {t.max_steps}; checkpoint written to {saved}. "
                    "Run the same command again to resume from it."
                )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        progress.close()
        if writer is not None:
            writer.close()
    if world.is_main:
        export(run_dir, tr.ema.module if tr.ema is not None else tr.g_engine.module, tr.spec_dict)
    dist.barrier()
    return RunSummary(run_dir, tr.step, t.max_steps, done, tr.images_seen)


def _stopped(problems: list[str], step: int, run_dir: Path) -> TrainingStopped:
    last = checkpoint.latest(run_dir)
    return TrainingStopped(
        [
            Issue(
                f"{' and '.join(problems)} at step {step}; stopped. The last good checkpoint is {last or '(none yet)'}",
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


def export(run_dir: Path, generator: torch.nn.Module, spec_dict: dict) -> Path:
    """The generator's weights (the EMA's when there is one) as safetensors, and the spec beside it."""
    from safetensors.torch import save_file

    out = run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in generator.state_dict().items()}, out / "generator.safetensors"
    )
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
        info = f"{record['images_per_s']:.0f} img/s  D {record['loss_d']:.3f}  G {record['loss_g']:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info, left=self.time_left(step))
        elif self.enabled:
            print(
                f"step {step}/{self.total}  images {record['images_seen']}  {info}  {self.time_left(step)}", flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
