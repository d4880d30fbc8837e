"""Sampling a trained generator: truncated latents, standing statistics, class-conditional grids
and interpolations (latent and class), written as PNGs and GIFs with a `samples.json` recording
the protocol. `python -m pipeline sample RUN_OR_WEIGHTS` is `write_samples(load_generator(...))`.

Latents are drawn where the `torch.Generator` lives (the CPU without one) and then moved to the
network's device, so a seed gives the same latents on a CPU and on a GPU.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

import torch
import yaml
from torch import nn

from pipeline.errors import Issue, SpecError, user_error
from pipeline.eval.protocol import STANDING_STATS_BATCH
from pipeline.images import save_gif, save_png, tile, to_pixels, to_uint8  # noqa: F401  (also used from here)
from pipeline.runs import EXPORT_SPEC, is_export

if TYPE_CHECKING:
    from pipeline.graph import GraphModule
    from pipeline.spec import Spec
    from pipeline.spec.schema import LatentSpec

TRUNCATION_MODES = ("truncate", "scale")
INTERPOLATIONS = ("latent", "class")
# Rejection sampling draws this many values per round at most (64 MiB of float32), however small
# the threshold: each slot still to fill gets as many candidates as fit.
MAX_DRAWS_PER_ROUND = 1 << 24
SOURCE_HINT = (
    "give a run directory (runs/NAME), one of its checkpoints/step-N directories, an export "
    "directory or a generator.safetensors file"
)


# ----- latents -----
def _normal(shape, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu")


def truncated_normal(
    shape, threshold: torch.Tensor | float | None, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """N(0, 1) values conditioned on |v| <= threshold (BigGAN's truncation trick): values beyond
    the threshold are drawn again until none remain, so none pile up at +-threshold as clipping
    would make them. `threshold` None gives the plain normal. A 0-d tensor threshold is compared
    as a tensor, so a caller may keep it as one across values; the redrawing loop itself depends
    on the data (not a function to torch.compile).

    Each round gives every value still outside several fresh candidates (about two expected to be
    inside) and keeps the first inside: the same distribution as redrawing one at a time, but a
    threshold of 0.04 (3% of draws inside) takes a few rounds instead of hundreds."""
    z = _normal(shape, generator)
    if threshold is None:
        return z.to(device or z.device)
    threshold = torch.as_tensor(threshold, dtype=z.dtype, device=z.device)
    if threshold.numel() != 1 or not bool(threshold > 0):
        raise ValueError(f"the truncation threshold must be one positive number, got {threshold.tolist()}")
    flat = z.view(-1)
    todo = (flat.abs() > threshold).nonzero().squeeze(1)
    inside_rate = torch.erf(threshold / math.sqrt(2)).item()  # P(|v| <= threshold)
    while todo.numel():
        per_slot = max(1, min(math.ceil(2 / inside_rate), MAX_DRAWS_PER_ROUND // todo.numel()))
        candidates = _normal((todo.numel(), per_slot), generator)
        inside = candidates.abs() <= threshold
        found = inside.any(1)
        first = inside.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first of equal maxima
        flat[todo[found]] = candidates.gather(1, first).squeeze(1)[found]
        todo = todo[~found]
    return z.to(device or z.device)


def scaled_normal(
    shape, scale: torch.Tensor | float, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """N(0, scale^2): the "scale the standard deviation" variant of truncation that BigGAN-PyTorch's
    code uses (values are not bounded; only their spread shrinks)."""
    z = _normal(shape, generator)
    return (z * torch.as_tensor(scale, dtype=z.dtype, device=z.device)).to(device or z.device)


def sample_latents(
    n: int,
    z_dim: int,
    truncation: float | None,
    *,
    mode: str = "truncate",
    generator: torch.Generator | None = None,
    device=None,
    distribution: str = "normal",
) -> torch.Tensor:
    """`n` latents of `z_dim`: plain normal (truncation None), truncated normal with threshold
    `truncation` (mode "truncate") or normal with standard deviation `truncation` (mode "scale");
    or, for a spec whose `latent.distribution` is uniform, U(-1, 1) (no truncation)."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation mode must be one of {TRUNCATION_MODES}, got {mode!r}")
    if distribution == "uniform":
        if truncation is not None:
            raise user_error(
                "truncation applies to normal latents; this run's latent.distribution is uniform",
                hint="sample without --truncation",
            )
        gen_device = generator.device if generator is not None else "cpu"
        z = torch.rand((n, z_dim), generator=generator, device=gen_device) * 2 - 1
        return z.to(device or z.device)
    if truncation is None:
        return truncated_normal((n, z_dim), None, generator=generator, device=device)
    if mode == "scale":
        return scaled_normal((n, z_dim), truncation, generator=generator, device=device)
    return truncated_normal((n, z_dim), truncation, generator=generator, device=device)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Great-circle interpolation from `a` (t = 0, exactly) to `b` (t = 1, exactly), over the last
    dimension: sin((1-t)w)/sin(w) a + sin(tw)/sin(w) b, w the angle between them. Unit vectors
    stay unit vectors; vectors of other norms follow the same formula (as in White 2016,
    "Sampling Generative Networks"). `t` has the batch shape (a number, or e.g. (steps,) against
    a and b of shape (rows, 1, D) for (rows, steps, D)).

    The angle is 2 atan2(|a' - b'|, |a' + b'|) of the directions a', b', accurate also for nearly
    parallel vectors, where arccos of their dot product is not. Where sin(w) vanishes (parallel
    vectors, or opposite ones, whose great circle is not unique) it falls back to linear
    interpolation."""
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device).unsqueeze(-1)
    a_dir = a / a.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    b_dir = b / b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    angle = 2 * torch.atan2((a_dir - b_dir).norm(dim=-1, keepdim=True), (a_dir + b_dir).norm(dim=-1, keepdim=True))
    sin_angle = torch.sin(angle)
    degenerate = sin_angle.abs() <= torch.finfo(a.dtype).eps
    safe_sin = torch.where(degenerate, torch.ones_like(sin_angle), sin_angle)
    weight_a = torch.where(degenerate, 1 - t, torch.sin((1 - t) * angle) / safe_sin)
    weight_b = torch.where(degenerate, t, torch.sin(t * angle) / safe_sin)
    return weight_a * a + weight_b * b


# ----- loading a trained generator -----
@dataclass
class LoadedGenerator:
    """A generator with trained weights, in eval mode without gradients."""

    module: nn.Module  # a GraphModule, forward (z, y), on the device it was loaded to
    spec: Spec  # the pipeline Spec the weights were trained with
    source: str  # for people, e.g. "runs/demo: EMA at step 400"
    ema: bool  # the EMA's weights (else G's own)
    step: int | None  # the generator step the weights are from
    weights: Path  # the file read
    home: Path  # the run directory, or the folder of exported weights: where samples go by default

    @property
    def latent(self) -> LatentSpec:
        """The spec's latent, which sampling draws from."""
        if self.spec.latent is None:
            raise user_error(f"{self.source}: the spec has no `latent:`, which sampling draws the latents from")
        return self.spec.latent

    @property
    def z_dim(self) -> int:
        return self.latent.z_dim

    @property
    def num_classes(self) -> int:
        if self.spec.data.num_classes is None:
            raise user_error(f"{self.source}: the spec has no data.num_classes; sampling draws images per class")
        return self.spec.data.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def _loaded_spec(data: dict, origin: Path):
    """A LoadedSpec from a stored resolved spec (a checkpoint's state.json, an export's spec.yaml).
    Validated as it is, not through `load_spec`: that would merge its `base` again."""
    from pydantic import ValidationError

    from pipeline.spec import LoadedSpec, Spec
    from pipeline.spec.schema import upgrade_stored
    from pipeline.spec.yaml_io import SourceMap

    try:
        return LoadedSpec(Spec.model_validate(upgrade_stored(data)), SourceMap(), origin)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise user_error(
            f"{origin}: the stored spec does not validate: {'.'.join(map(str, first['loc']))}: {first['msg']}",
            hint="was it written by another version of the pipeline?",
        ) from None


def _build(loaded, weights: dict[str, torch.Tensor], origin: Path, device, network: str) -> nn.Module:
    """The spec's network `network` holding `weights`. Built on the meta device and then given the
    loaded tensors: initialising (orthogonal init, spectral norm's warm-up) 70M parameters that are
    overwritten at once would cost seconds."""
    from pipeline.graph import analyze_network, instantiate, to_memory_format

    module = instantiate(loaded, analyze_network(loaded, network), "meta")
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong_shape = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        details = [
            f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if names
        ]
        raise user_error(
            f"{origin} does not hold the network {network!r} of its spec ({'; '.join(details)})",
            hint="the weights and the spec beside them must come from the same run",
        )
    # Copies in fp32 whatever the training precision: a file's tensors sit at any offset in its
    # buffer, and misaligned ones make CPU kernels sum in another order (outputs off by 1e-6).
    module.load_state_dict(
        {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in weights.items()},
        assign=True,
    )
    return to_memory_format(module.to(device), loaded.spec.compile).eval().requires_grad_(False)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def has_ema(spec, network: str) -> bool:
    """Whether training kept an EMA of this network."""
    return spec.ema_of(network) is not None


def _from_export(file: Path, device) -> LoadedGenerator:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec_file = file.parent / EXPORT_SPEC
    if not spec_file.is_file():
        raise user_error(
            f"{spec_file} is missing: the spec of {file} is read from spec.yaml beside it",
            hint="training writes both to RUN/export/; copy them together",
        )
    try:
        data = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        raise user_error(f"cannot read {spec_file}: {exc}") from None
    if not isinstance(data, dict):
        raise user_error(f"{spec_file} is not a spec (a YAML mapping)")
    loaded = _loaded_spec(data, spec_file)
    try:
        weights = load_file(file)
    except (SafetensorError, OSError) as exc:
        raise user_error(f"cannot read {file}: {exc}", hint="expected safetensors weights of a generator") from None
    network = file.stem
    if network not in loaded.spec.method.exports(loaded.spec):
        raise user_error(
            f"{file}: the spec beside it exports no network {network!r}",
            hint=f"its exports are {', '.join(loaded.spec.method.exports(loaded.spec))}",
        )
    ema = has_ema(loaded.spec, network)  # export() writes the EMA's weights where there is one
    # export() runs only after the last step, when the step equals the spec's max_steps
    return LoadedGenerator(
        _build(loaded, weights, file, device, network),
        loaded.spec,
        _display(file),
        ema,
        loaded.spec.train.max_steps,
        file,
        file.parent,
    )


def _from_checkpoint(ckpt: Path, device, network: str | None) -> LoadedGenerator:
    from pipeline.safe_files import read_tensors
    from pipeline.train.checkpoint import ema_file, network_weights, read_state

    state = read_state(ckpt)
    loaded = _loaded_spec(state["spec"], ckpt / "state.json")
    spec, step = loaded.spec, state["step"]
    network = network or spec.method.exports(spec)[0]
    run = _display(ckpt.parent.parent)
    if has_ema(spec, network):
        file = ema_file(ckpt, network)
        if not file.is_file():
            raise user_error(
                f"{file} is missing, though the run's spec has an EMA of {network}",
                hint="the checkpoint is incomplete; use an earlier one (checkpoints/step-N)",
            )
        weights, what = read_tensors(file), f"the EMA of {network}"
    else:
        weights, file, what = network_weights(ckpt, network), ckpt, f"{network} (no EMA)"
    return LoadedGenerator(
        _build(loaded, weights, file, device, network),
        spec,
        f"{run}: {what} at step {step}",
        has_ema(spec, network),
        step,
        file,
        ckpt.parent.parent,
    )


def load_generator(
    source: str | Path, device: str | torch.device = "cpu", *, network: str | None = None
) -> LoadedGenerator:
    """Load a trained network (by default the first the spec's method exports: a GAN's generator)
    from a run directory (its latest checkpoint: the EMA's weights where there is one), a
    checkpoint directory, an export directory, or an exported NAME.safetensors file (with
    `spec.yaml` beside it). Built without torch.compile."""
    from pipeline.train.checkpoint import latest

    path = Path(source)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise user_error(f"device {device} requested, but no CUDA device is available", hint="use --device cpu")
    if not path.exists():
        raise user_error(f"{path} does not exist", hint=SOURCE_HINT)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise user_error(f"{path} is not a .safetensors file", hint=SOURCE_HINT)
        return _from_export(path, device)
    if is_export(path):
        if network is None:
            exported = sorted(path.glob("*.safetensors"))
            file = path / "generator.safetensors" if (path / "generator.safetensors").is_file() else exported[0]
        else:
            file = path / f"{network}.safetensors"
        return _from_export(file, device)
    if (path / "state.json").is_file():
        return _from_checkpoint(path, device, network)
    last = latest(path)
    if last is None:
        raise user_error(
            f"{path} holds no finished checkpoint (checkpoints/step-N/state.json) and no exported weights",
            hint=SOURCE_HINT,
        )
    return _from_checkpoint(last, device, network)


# ----- standing statistics -----
def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm that keeps running statistics: the project's BatchNorm (also inside
    ConditionalBatchNorm, cross-replica or not) and torch's own."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def standing_stats(
    module: nn.Module,
    *,
    num_passes: int,
    batch_size: int,
    z_dim: int,
    num_classes: int,
    truncation: float | None,
    mode: str = "truncate",
    distribution: str = "normal",
    generator: torch.Generator | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """BigGAN's standing statistics: reset every BatchNorm's running mean and variance, then set
    them to the average of the batch statistics over `num_passes` forward passes at the sampling
    distribution (latents at this truncation, classes uniform). Momentum None makes BatchNorm
    keep a cumulative average; the original momentum is put back. Only the BatchNorms run in
    train mode: spectral norm's power iteration would otherwise move the weights being measured.
    Cross-replica BatchNorms run unsynchronized, since this process runs alone (a synchronized one
    would wait for the other ranks). Leaves the module in eval mode. `log` hears how far it is
    every 10 s."""
    if num_passes < 1 or batch_size < 2:
        raise ValueError(
            f"standing statistics need num_passes >= 1 and batch_size >= 2 (BatchNorm over one "
            f"value per channel is undefined), got {num_passes} and {batch_size}"
        )
    from pipeline.blocks.layers import BatchNorm

    norms = batch_norms(module)
    device = next(module.parameters()).device
    saved = [(m.momentum, getattr(m, "cross_replica", None)) for m in norms]
    module.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            if isinstance(m, BatchNorm):  # the project's: a cross-replica switch
                m.cross_replica = False
            m.train()
        said = time.perf_counter()
        for done in range(num_passes if norms else 0):
            if log is not None and done and time.perf_counter() - said >= 10:
                said = time.perf_counter()
                log(f"  standing statistics: pass {done + 1} of {num_passes}")
            z = sample_latents(
                batch_size, z_dim, truncation, mode=mode, generator=generator, device=device, distribution=distribution
            )
            y = torch.randint(
                num_classes,
                (batch_size,),
                generator=generator,
                device=generator.device if generator is not None else "cpu",
            )
            module(z, y.to(device))
    finally:
        for m, (momentum, cross_replica) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if cross_replica is not None:
                m.cross_replica = cross_replica
        module.eval()


# ----- images -----
@torch.no_grad()
def generate(module: nn.Module, z: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Images for latents and labels, `batch_size` at a time, as float32 on the CPU."""
    device = next(module.parameters()).device
    return torch.cat(
        [
            module(z[i : i + batch_size].to(device), y[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(z), batch_size)
        ]
    )


def class_grid(
    module: nn.Module,
    classes: list[int],
    num_per_class: int,
    *,
    z_dim: int,
    truncation: float | None = None,
    mode: str = "truncate",
    distribution: str = "normal",
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images (len(classes), num_per_class, C, H, W): rows are classes, columns samples."""
    z = sample_latents(
        len(classes) * num_per_class, z_dim, truncation, mode=mode, generator=generator, distribution=distribution
    )
    y = torch.tensor(classes).repeat_interleave(num_per_class)
    return generate(module, z, y, batch_size=batch_size).unflatten(0, (len(classes), num_per_class))


def latent_interpolation(
    module: nn.Module,
    classes: list[int],
    num_steps: int,
    *,
    z_dim: int,
    truncation: float | None = None,
    mode: str = "truncate",
    distribution: str = "normal",
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images (len(classes), num_steps, C, H, W): each row one class, its latent moving along the
    great circle (slerp) between two latents drawn for that row."""
    start = sample_latents(len(classes), z_dim, truncation, mode=mode, generator=generator, distribution=distribution)
    end = sample_latents(len(classes), z_dim, truncation, mode=mode, generator=generator, distribution=distribution)
    z = slerp(start[:, None], end[:, None], torch.linspace(0, 1, num_steps))  # (rows, steps, z_dim)
    y = torch.tensor(classes).repeat_interleave(num_steps)
    return generate(module, z.flatten(0, 1), y, batch_size=batch_size).unflatten(0, (len(classes), num_steps))


def class_embeddings(module: nn.Module) -> list[nn.Embedding]:
    """The nodes of a generator graph that read the class labels: all must be embeddings."""
    if not hasattr(module, "input_names"):
        raise TypeError("class interpolation needs a generator built by pipeline.graph (a GraphModule)")
    graph = cast("GraphModule", module)  # or a wrapper forwarding its attributes (torch.compile's)
    label = graph.input_names[1]
    readers = [
        name
        for name, fields in graph.steps
        if any(ref.partition(".")[0] == label for _, refs in fields for ref in refs)
    ]
    others = [name for name in readers if not isinstance(graph[name], nn.Embedding)]
    if not readers or others:
        raise user_error(
            f"class interpolation mixes class embeddings, but the generator's labels `{label}` feed "
            + (f"non-embedding nodes ({', '.join(others)})" if others else "no node"),
            hint="use --interpolate latent",
        )
    return [graph[name] for name in readers]


@contextmanager
def mixed_class_embedding(module: nn.Module, y_to: torch.Tensor, weight: torch.Tensor):
    """Inside, every class embedding of the generator graph outputs
    lerp(embedding(y), embedding(y_to), weight) per sample, y being the labels given to the graph.

    A forward hook replaces the embedding's output: the graph, its modules and their forward
    code stay as they are, and nothing remains once the block exits."""

    def mix(embedding, args, out):
        # forward, not __call__: __call__ would run this hook again
        target = embedding.forward(y_to.to(out.device))
        return torch.lerp(out, target, weight.to(out.device, out.dtype).unsqueeze(-1))

    handles = [embedding.register_forward_hook(mix) for embedding in class_embeddings(module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def class_interpolation(
    module: nn.Module,
    classes: list[int],
    num_rows: int,
    num_steps: int,
    *,
    z_dim: int,
    truncation: float | None = None,
    mode: str = "truncate",
    distribution: str = "normal",
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images (num_rows, 1 + (len(classes) - 1) * (num_steps - 1), C, H, W): each row one fixed
    latent, the class embedding moving linearly from classes[0] to classes[1] (num_steps points,
    both ends included), then on to classes[2], and so on."""
    if len(classes) < 2 or num_steps < 2:
        raise ValueError(f"class interpolation needs two classes and two steps, got {classes} and {num_steps}")
    class_embeddings(module)  # fails early and clearly for a graph it cannot mix
    weights: list[torch.Tensor] = []
    starts: list[torch.Tensor] = []
    ends: list[torch.Tensor] = []
    for a, b in itertools.pairwise(classes):
        t = torch.linspace(0, 1, num_steps)[0 if not weights else 1 :]  # segments share their end points
        weights.append(t)
        starts.append(torch.full_like(t, a, dtype=torch.long))
        ends.append(torch.full_like(t, b, dtype=torch.long))
    weight, start, end = torch.cat(weights), torch.cat(starts), torch.cat(ends)
    num_cols = len(weight)
    z = sample_latents(
        num_rows, z_dim, truncation, mode=mode, generator=generator, distribution=distribution
    ).repeat_interleave(num_cols, 0)
    weight, start, end = weight.repeat(num_rows), start.repeat(num_rows), end.repeat(num_rows)
    device = next(module.parameters()).device
    images = []
    for i in range(0, len(z), batch_size):
        part = slice(i, i + batch_size)
        with mixed_class_embedding(module, end[part], weight[part]):
            images.append(module(z[part].to(device), start[part].to(device)).float().cpu())
    return torch.cat(images).unflatten(0, (num_rows, num_cols))


# ----- the `sample` command -----
def default_classes(num_classes: int, num_rows: int = 10) -> list[int]:
    """The classes of the training sample grids: all of them up to `num_rows`, else evenly spread."""
    return torch.linspace(0, num_classes - 1, min(num_rows, num_classes)).long().tolist()


class _DrawOptions(TypedDict):
    """The keyword arguments write_samples gives class_grid and the interpolations."""

    z_dim: int
    truncation: float | None
    mode: str
    distribution: str
    generator: torch.Generator | None
    batch_size: int


def write_samples(
    gen: LoadedGenerator,
    out_dir: str | Path,
    *,
    classes: list[int] | None = None,
    num_per_class: int = 8,
    truncation: float | None = None,
    mode: str = "truncate",
    standing_passes: int | None = None,
    batch_size: int = STANDING_STATS_BATCH,
    seed: int = 0,
    interpolate: str | None = None,
    num_steps: int = 8,
    gif: bool = False,
) -> dict:
    """Write `grid.png` (rows = classes, columns = samples), one PNG per image in `images/`
    (`class<c>-<i>.png`), optionally an interpolation strip `interpolation-<kind>.png` (and `.gif`),
    and `samples.json` recording the protocol; return that record.

    With `standing_passes` > 0 (by default the spec's `eval.standing_stats`, the passes training
    scores with), standing statistics replace the BatchNorm statistics of `gen.module` first
    (batches of `batch_size`, at the sampling truncation). The latents come from `seed` alone,
    the standing statistics from seed + 1: the same seed draws the same latents whether standing
    statistics are on or not."""
    classes = default_classes(gen.num_classes) if classes is None else list(classes)
    if standing_passes is None:
        standing_passes = gen.spec.eval.standing_stats
    _check_request(
        gen, classes, num_per_class, truncation, mode, standing_passes, batch_size, interpolate, num_steps, gif
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = gen.module
    if standing_passes:
        standing_stats(
            module,
            num_passes=standing_passes,
            batch_size=batch_size,
            z_dim=gen.z_dim,
            num_classes=gen.num_classes,
            truncation=truncation,
            mode=mode,
            distribution=gen.latent.distribution,
            generator=torch.Generator().manual_seed(seed + 1),
        )
    module.eval()
    latent_rng = torch.Generator().manual_seed(seed)
    options: _DrawOptions = {
        "z_dim": gen.z_dim,
        "truncation": truncation,
        "mode": mode,
        "distribution": gen.latent.distribution,
        "generator": latent_rng,
        "batch_size": batch_size,
    }

    grid = class_grid(module, classes, num_per_class, **options)
    save_png(grid, out_dir / "grid.png", row_labels=[f"class {c}" for c in classes])
    width = len(str(gen.num_classes - 1))
    for row, c in enumerate(classes):
        for i in range(num_per_class):
            save_png(grid[row, i], out_dir / "images" / f"class{c:0{width}d}-{i:03d}.png")
    files = {"grid": "grid.png", "images": f"images/class<c>-<i>.png ({len(classes) * num_per_class})"}

    if interpolate is not None:
        if interpolate == "latent":
            strip = latent_interpolation(module, classes, num_steps, **options)
        else:
            strip = class_interpolation(module, classes, num_per_class, num_steps, **options)
        files["interpolation"] = f"interpolation-{interpolate}.png"
        save_png(strip, out_dir / files["interpolation"])
        if gif:
            files["gif"] = f"interpolation-{interpolate}.gif"
            save_gif(strip, out_dir / files["gif"])

    record = {
        "source": gen.source,
        "weights": str(gen.weights),
        "spec": gen.spec.name,
        "ema": gen.ema,
        "step": gen.step,
        "truncation": None if truncation is None else {"value": truncation, "mode": mode},
        "standing_stats": (
            {"num_passes": standing_passes, "batch_size": batch_size, "seed": seed + 1} if standing_passes else None
        ),
        "seed": seed,
        "classes": classes,
        "num_per_class": num_per_class,
        "interpolation": None
        if interpolate is None
        else {
            "kind": interpolate,
            "num_steps": num_steps,
            "rows": "classes" if interpolate == "latent" else f"{num_per_class} fixed latents",
            "path": "slerp between two latents per row"
            if interpolate == "latent"
            else "linear in the class embedding, " + " -> ".join(map(str, classes)),
        },
        "files": files,
    }
    (out_dir / "samples.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _check_request(
    gen, classes, num_per_class, truncation, mode, standing_passes, batch_size, interpolate, num_steps, gif
) -> None:
    problems = []
    bad = [c for c in classes if not 0 <= c < gen.num_classes]
    if bad or not classes:
        problems.append(("classes", f"{bad or 'none'}: classes are 0 .. {gen.num_classes - 1}"))
    if num_per_class < 1:
        problems.append(("num", f"{num_per_class}: give at least one image per class"))
    if truncation is not None and not truncation > 0:
        problems.append(("truncation", f"{truncation}: the threshold (or scale) must be positive"))
    if mode not in TRUNCATION_MODES:
        problems.append(("truncation-mode", f"{mode!r}: one of {', '.join(TRUNCATION_MODES)}"))
    if standing_passes < 0:
        problems.append(("standing-stats", f"{standing_passes}: a number of passes, 0 for none"))
    if batch_size < (2 if standing_passes else 1):
        problems.append(("batch-size", f"{batch_size}: standing statistics need batches of 2 or more"))
    if interpolate is not None and interpolate not in INTERPOLATIONS:
        problems.append(("interpolate", f"{interpolate!r}: one of {', '.join(INTERPOLATIONS)}"))
    if interpolate == "class" and len(classes) < 2:
        problems.append(("classes", "class interpolation goes from one class to the next: give two or more"))
    if interpolate is not None and num_steps < 2:
        problems.append(("steps", f"{num_steps}: an interpolation needs at least 2 steps"))
    if gif and interpolate is None:
        problems.append(("gif", "a GIF animates an interpolation: add --interpolate latent or class"))
    if problems:
        raise SpecError([Issue(message, path=f"--{option}") for option, message in problems])
