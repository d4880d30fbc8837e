"""The training loop: `python -m pipeline train SPEC [key=value ...]`.

Reads top to bottom: setup, networks and engines, data, resume, then steps made of phases
(`d_steps` discriminator steps, then one generator step) until `train.max_steps`. Progress is
counted in real images seen by D. Re-running the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from pipeline.data.dali import loader_from_spec
from pipeline.dist import engines as dist
from pipeline.errors import Issue, SpecError, user_error
from pipeline.graph import build_network, compile_network
from pipeline.train import checkpoint
from pipeline.train.ema import EMA
from pipeline.train.losses import get_loss
from pipeline.train.regularizers import gradient_penalty, ortho_penalty, r1_penalty


class TrainingStopped(SpecError):
    """A run stopped on purpose (NaN); the last good checkpoint is intact."""


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
        raise user_error(f"label_smoothing and label_flip apply to the non_saturating loss, not {train.loss}",
                         path="train.loss")
    return get_loss(train.loss, **(options if train.loss == "non_saturating" else {}))


def grad_norm(engine) -> float | None:
    """L2 norm of the accumulated gradient at an optimizer step (None between accumulation steps,
    and under ZeRO 1/2, where gradients live in DeepSpeed's partitions rather than in .grad)."""
    if not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item() if grads else None


def batch_plan(train, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) with batch = micro x accumulation x world size."""
    micro = train.batch_per_rank or max(1, train.batch_size // world_size)
    if train.batch_size % (micro * world_size):
        raise user_error(f"train.batch_size {train.batch_size} is not a multiple of batch_per_rank {micro} x "
                         f"{world_size} rank(s)", path="train.batch_size",
                         hint="choose batch_size = batch_per_rank x gradient accumulation x number of ranks")
    return micro, train.batch_size // (micro * world_size)


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    from einops import rearrange
    from PIL import Image

    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = rearrange(pixels, "(r c) ch h w -> (r h) (c w) ch", r=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy()).save(path)


def train(loaded, *, device: str | None = None, stop_after: int | None = None) -> Path:
    """Train (or resume) the run a spec describes; return the run directory.
    `stop_after` ends the process's work after that many steps without a final checkpoint (tests
    use it to stand in for a killed run)."""
    spec, t = loaded.spec, loaded.spec.train
    world = dist.setup(device)
    micro, accum = batch_plan(t, world.size)
    run_dir = Path(spec.run.dir or f"runs/{spec.name}")
    spec_dict = spec.model_dump(mode="json")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))

    # ----- networks, EMA and engines: identical initial weights on every rank
    torch.manual_seed(spec.seed)
    G = build_network(loaded, "generator", world.device)  # compiled below, after the EMA copy
    D = build_network(loaded, "discriminator", world.device)
    ema = EMA(G, t.ema.decay, t.ema.start_images, dtype=torch.float32) if t.ema else None  # fp32 even under bf16
    compile_network(G, spec.compile)
    config = dist.engine_config(t, micro, accum, world.size)
    g_engine, d_engine = dist.make_engine(G, t.g_opt, config), dist.make_engine(D, t.d_opt, config)
    loss = make_loss(t)
    # bf16: convolutions and matrix products in bf16, norms, losses and master weights in fp32
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32

    def mixed():
        return torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")

    # ----- latents: one generator for the global batch, each rank takes its slice, so that a run
    # on N ranks draws the same z as a run on one
    latent_rng = torch.Generator().manual_seed(spec.seed)

    def latents(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n * world.size, spec.latent.z_dim, generator=latent_rng)
        y = torch.randint(0, spec.data.num_classes, (n * world.size,), generator=latent_rng)
        part = slice(world.rank * n, (world.rank + 1) * n)
        return z[part].to(world.device), y[part].to(world.device)

    # ----- resume
    step, images_seen, loader_state = 0, 0, None
    last = checkpoint.latest(run_dir)
    if last is not None:
        state, local = checkpoint.load(last, g_engine=g_engine, d_engine=d_engine, ema=ema, world=world,
                                       spec_dict=spec_dict)
        step, images_seen, loader_state = state["step"], state["images_seen"], local["loader"]
        torch.set_rng_state(local["rng"]["cpu"])
        latent_rng.set_state(local["rng"]["latents"])
        if "cuda" in local["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(local["rng"]["cuda"])
    loader = loader_from_spec(spec, batch_size=micro, device=world.device, rank=world.rank, world_size=world.size,
                              state=loader_state, dtype=dtype)
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    # ----- the phases of one step
    def d_step() -> dict:
        for _ in range(accum):
            real, y_real = next(loader)
            z, y_fake = latents(micro)
            with torch.no_grad(), mixed():
                fake = g_engine.module(z, y_fake)
            if t.r1_gamma:
                real = real.detach().requires_grad_(True)
            with mixed():
                logits = d_engine(torch.cat([real, fake.to(real.dtype)]), torch.cat([y_real, y_fake])).float()
                real_logits, fake_logits = logits[:micro], logits[micro:]
                d_loss = loss.d(real_logits, fake_logits)
                if t.r1_gamma:
                    d_loss = d_loss + t.r1_gamma / 2 * r1_penalty(real_logits, real)
                if t.gp_weight:
                    d_loss = d_loss + t.gp_weight * gradient_penalty(d_engine.module, real, fake, y_real)
            d_engine.backward(d_loss)
            norm = grad_norm(d_engine)
            d_engine.step()
        return {"loss_d": d_loss.item(), "d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item(),
                **({"grad_norm_d": norm} if norm is not None else {})}

    def g_step() -> dict:
        with frozen(D):
            for _ in range(accum):
                z, y = latents(micro)
                with mixed():
                    g_loss = loss.g(d_engine.module(g_engine(z, y), y).float())  # D's raw module: no engine hooks
                if t.ortho_reg:
                    g_loss = g_loss + ortho_penalty(g_engine.module, t.ortho_reg)
                g_engine.backward(g_loss)
                norm = grad_norm(g_engine)
                g_engine.step()
        return {"loss_g": g_loss.item(), **({"grad_norm_g": norm} if norm is not None else {})}

    phases = [Phase("D", t.d_steps, d_step), Phase("G", 1, g_step)]

    # ----- fixed latents for sample grids: rows are classes, columns samples
    rows = min(10, spec.data.num_classes)
    sample_gen = torch.Generator().manual_seed(spec.seed + 1)
    sample_z = torch.randn(rows * 8, spec.latent.z_dim, generator=sample_gen).to(world.device)
    sample_y = torch.linspace(0, spec.data.num_classes - 1, rows).long().repeat_interleave(8).to(world.device)

    def write_samples(at: int) -> None:
        net = ema.module if ema is not None else g_engine.module
        was_training = net.training
        net.eval()
        with torch.no_grad():
            save_grid(net(sample_z, sample_y), rows, run_dir / "samples" / f"step-{at:08d}.png")
        net.train(was_training)

    def save_checkpoint(at: int) -> Path:
        return checkpoint.save(run_dir, at, g_engine=g_engine, d_engine=d_engine, ema=ema, world=world,
                               loader_state=loader.state_dict(), keep=t.keep_checkpoints,
                               state={"step": at, "images_seen": images_seen, "world_size": world.size,
                                      "spec": spec_dict, "latent_rng": latent_rng.get_state()})

    # ----- Ctrl-C / SIGTERM: finish the step, save, stop
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    writer = _tensorboard(run_dir) if world.is_main else None
    progress = _Progress(t.max_steps, step, enabled=world.is_main)
    tick, tick_images, done = time.perf_counter(), images_seen, 0
    try:
        while step < t.max_steps:
            values: dict[str, float] = {}
            for phase in phases:
                for _ in range(phase.repeat):
                    values |= phase.run()
                    if phase.name == "D":
                        images_seen += micro * accum * world.size
            if ema is not None:
                ema.update(g_engine.module, images_seen)
            step += 1
            bad = [k for k in ("loss_d", "loss_g") if not math.isfinite(values[k])]
            if bad:
                last = checkpoint.latest(run_dir)
                raise TrainingStopped([Issue(f"{' and '.join(bad)} became {values[bad[0]]} at step {step}; stopped. "
                                             f"The last good checkpoint is {last or '(none yet)'}",
                                             hint="lower the learning rates, use fp32, or resume from that checkpoint "
                                                  "with different settings in a new run.dir")])
            if step % t.log_every == 0 or step == t.max_steps:
                now = time.perf_counter()
                values = dist.all_mean(values, world.device)
                record = {"step": step, "images_seen": images_seen, **values, "lr_g": t.g_opt.lr, "lr_d": t.d_opt.lr,
                          "images_per_s": (images_seen - tick_images) / (now - tick)}
                tick, tick_images = now, images_seen
                if world.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for key, value in record.items():
                            if key != "step":
                                writer.add_scalar(key, value, images_seen)
                progress.update(step, record)
            if world.is_main and (step % t.sample_every == 0 or step == t.max_steps):
                write_samples(step)
            done += 1
            if stop_after is not None and done >= stop_after:
                return run_dir
            if step % t.checkpoint_every == 0 or step == t.max_steps or stop["signal"] is not None:
                save_checkpoint(step)
            if stop["signal"] is not None:
                raise KeyboardInterrupt
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        progress.close()
        if writer is not None:
            writer.close()
    if world.is_main:
        export(run_dir, ema.module if ema is not None else g_engine.module, spec_dict)
    dist.barrier()
    return run_dir


def export(run_dir: Path, generator: torch.nn.Module, spec_dict: dict) -> Path:
    """The generator's weights (the EMA's when there is one) as safetensors, and the spec beside it."""
    from safetensors.torch import save_file

    out = run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in generator.state_dict().items()},
              out / "generator.safetensors")
    (out / "spec.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    return out


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl has everything
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class _Progress:
    """A progress bar with images/s and ETA on a terminal; silent otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        import sys

        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        elif enabled:
            self.total = total

    def update(self, step: int, record: dict) -> None:
        info = f"{record['images_per_s']:.0f} img/s  D {record['loss_d']:.3f}  G {record['loss_g']:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif hasattr(self, "total"):
            print(f"step {step}/{self.total}  images {record['images_seen']}  {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


