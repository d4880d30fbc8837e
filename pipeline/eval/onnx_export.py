"""A trained generator as an ONNX model: `python -m pipeline export RUN --onnx OUT`.

The model maps latents (and class labels, for a conditional generator) to images:

    z      float32 [N, z_dim]   the latent, used as given: truncation is the caller's (see below)
    y      int64   [N]          class labels in 0 .. num_classes - 1 (absent when G reads no labels)
    image  float32 [N, C, H, W] the output, in [-1, 1], channels first (NCHW)

N is free (a dynamic axis). The generator is the one `sample` loads (the EMA where the run kept
one), with its BatchNorms' standing statistics measured first (by default the spec's
eval.standing_stats passes, at `truncation`, from seed + 1: the statistics `sample --seed S` uses)
and frozen into the graph; spectral norm and equalized LR are folded into plain weights.

Truncation is not in the graph: the truncated normal redraws values until they fall inside the
threshold, a loop whose length depends on the values. The model takes z as given, so a caller
draws z from the truncated normal (or scales it, mode "scale") itself; `truncation` sets the
distribution the standing statistics are measured at and is recorded in the model's metadata.

The exporter is torch's dynamo-based one (torch.export, then onnxscript). The TorchScript exporter
(dynamo=False, deprecated since torch 2.9) traced spectral norm's parametrization into a graph
whose outputs were wrong (max |difference| 1.7 on the demo's generator); with the weights folded
both agree with torch to 1e-5, and the dynamo one is the one torch keeps.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import Issue, SpecError, user_error
from pipeline.eval.sampling import TRUNCATION_MODES, sample_latents, standing_stats

if TYPE_CHECKING:
    from pipeline.eval.sampling import LoadedGenerator

LATENT, LABELS, IMAGE = "z", "y", "image"  # the ONNX model's input and output names
OPSET = 20  # what the dynamo exporter writes by default in torch 2.13
CHECK_BATCH = 3  # the batch of the check against torch: not the batch exported at (2)
CHECK_TOLERANCE = 1e-3  # a larger difference from torch is reported as a warning
INSTALL_HINT = "pip install 'gan-pipeline[onnx]' (onnx, onnxscript, and onnxruntime for the check)"


def reads_labels(graph: nn.Module) -> bool:
    """Whether any node of the generator graph reads its second input, the class labels."""
    from pipeline.graph import GraphModule

    if not isinstance(graph, GraphModule):
        raise TypeError(f"expected a generator built by pipeline.graph (a GraphModule), got {type(graph).__name__}")
    if len(graph.input_names) < 2:
        return False
    label = graph.input_names[1]
    refs = [ref for _, fields in graph.steps for _, names in fields for ref in names] + list(graph.output_refs)
    return any(ref.partition(".")[0] == label for ref in refs)


class _Conditional(nn.Module):
    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator  # not `graph`: torch.export's own module has a `graph`

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.generator(z, y)


class _Unconditional(nn.Module):
    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator  # not `graph`: torch.export's own module has a `graph`

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z, None)  # no node reads the labels


@dataclass(frozen=True)
class OnnxRequest:
    """What `export` was asked for, besides the generator and the file."""

    truncation: float | None = None
    mode: str = "truncate"
    standing_passes: int | None = None  # None: the spec's eval.standing_stats
    batch_size: int = 64  # of the standing-statistics passes
    seed: int = 0  # the standing statistics draw from seed + 1, as `sample --seed` does
    force: bool = False  # replace an existing OUT


def check_destination(out: Path, force: bool) -> None:
    """OUT's folder must exist; OUT itself must not, unless `force` (and then be a file)."""
    if not out.parent.is_dir():
        raise user_error(f"{out.parent} is not a directory", hint=f"create it first, or write {out.name} elsewhere")
    if out.is_dir():
        raise user_error(f"{out} is a directory", hint="give the ONNX file's path, e.g. generator.onnx")
    if out.exists() and not force:
        raise user_error(f"{out} exists", hint="add --force to replace it, or choose another name")


def _check(gen: LoadedGenerator, req: OnnxRequest, passes: int) -> None:
    if gen.spec.method.use == "translate":
        raise user_error(
            f"{gen.source}: method {gen.spec.method.kind!r} translates images; `export --onnx` writes "
            "generators that map latents (and classes) to images",
            hint="image-to-image generators are not exported to ONNX; `sample` and `eval` take this run",
        )
    problems = []
    if req.truncation is not None and not req.truncation > 0:
        problems.append(("truncation", f"{req.truncation}: the threshold (or scale) must be positive"))
    if req.truncation is not None and gen.latent.distribution == "uniform":
        problems.append(
            ("truncation", "truncation applies to normal latents; the run's latent.distribution is uniform")
        )
    if req.mode not in TRUNCATION_MODES:
        problems.append(("truncation-mode", f"{req.mode!r}: one of {', '.join(TRUNCATION_MODES)}"))
    if passes < 0:
        problems.append(("standing-stats", f"{passes}: a number of passes, 0 for none"))
    if passes and req.batch_size < 2:
        problems.append(("batch-size", f"{req.batch_size}: standing statistics need batches of 2 or more"))
    if problems:
        raise SpecError([Issue(message, path=f"--{option}") for option, message in problems])


def _exportable(gen: LoadedGenerator) -> tuple[nn.Module, bool]:
    """A CPU copy of the generator with its parametrizations folded, wrapped to take (z, y) or (z)."""
    from pipeline.blocks.layers import bake_parametrizations
    from pipeline.graph import GraphModule

    graph = copy.deepcopy(gen.module).cpu().eval()
    bake_parametrizations(graph)
    if isinstance(graph, GraphModule):
        graph.channels_last = False  # the memory layout is the runtime's business
    conditional = reads_labels(graph)
    wrapper = _Conditional(graph) if conditional else _Unconditional(graph)
    return wrapper.eval().requires_grad_(False), conditional


def _inputs(gen: LoadedGenerator, conditional: bool, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    rng = torch.Generator().manual_seed(seed)
    z = sample_latents(n, gen.z_dim, None, generator=rng, distribution=gen.latent.distribution)
    if not conditional:
        return (z,)
    return z, torch.randint(gen.num_classes, (n,), generator=rng)


def _metadata(gen: LoadedGenerator, req: OnnxRequest, passes: int, conditional: bool, shape) -> dict[str, str]:
    c, h, w = shape
    meta = {
        "source": gen.source,
        "spec": gen.spec.name or "",
        "step": str(gen.step),
        "ema": str(gen.ema).lower(),
        "latent": f"{LATENT}: float32 [N, {gen.z_dim}], {gen.latent.distribution}"
        + ("" if req.truncation is None else f", truncated ({req.mode} at {req.truncation}) by the caller"),
        "labels": f"{LABELS}: int64 [N], 0 .. {gen.num_classes - 1}" if conditional else "none (unconditional)",
        "image": f"{IMAGE}: float32 [N, {c}, {h}, {w}] (NCHW), in [-1, 1]",
        "truncation": "none" if req.truncation is None else str(req.truncation),
        "truncation_mode": req.mode,
        "standing_stats": f"{passes} passes of {req.batch_size}, seed {req.seed + 1}" if passes else "none",
    }
    return meta


def export_onnx(gen: LoadedGenerator, out: str | Path, req: OnnxRequest | None = None) -> dict[str, Any]:
    """Write `gen` as an ONNX model to `out` (see the module's docstring) and check it under
    onnxruntime against torch on a batch of another size; return a record of what was written.
    The file appears whole or not at all: it is written beside `out` under a temporary name and
    renamed. Measures standing statistics into `gen.module` (as `sample` does)."""
    req = req or OnnxRequest()
    out = Path(out)
    passes = gen.spec.eval.standing_stats if req.standing_passes is None else req.standing_passes
    _check(gen, req, passes)
    check_destination(out, req.force)
    try:
        import onnx  # noqa: F401  (the exporter's own imports fail less clearly)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise user_error(f"ONNX export needs {exc.name}, which is not installed", hint=INSTALL_HINT) from None

    reads = reads_labels(gen.module)
    if passes:
        standing_stats(
            gen.module,
            num_passes=passes,
            batch_size=req.batch_size,
            z_dim=gen.z_dim,
            num_classes=gen.num_classes if reads else 1,  # an unconditional G reads no labels
            truncation=req.truncation,
            mode=req.mode,
            distribution=gen.latent.distribution,
            generator=torch.Generator().manual_seed(req.seed + 1),
        )
    model, conditional = _exportable(gen)
    example = _inputs(gen, conditional, 2, req.seed)  # 2: a batch of 1 would be taken for a constant
    with torch.no_grad():
        shape = tuple(model(*example).shape[1:])
    batch = torch.export.Dim("batch")
    names = [LATENT, LABELS][: len(example)]

    start = time.perf_counter()
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"  # beside OUT: the rename stays on one file system
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            # torch's exporter warns about torchvision ops it cannot register and its own
            # deprecations; the check below is what tells whether the graph is right
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                input_names=names,
                output_names=[IMAGE],
                dynamic_shapes={name: {0: batch} for name in names},
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
        assert program is not None  # dynamo=True returns the program
        program.model.doc_string = (
            f"The generator of {gen.source}: latents{' and class labels' if conditional else ''} in, "
            "images in [-1, 1] (NCHW) out."
        )
        program.model.metadata_props.update(_metadata(gen, req, passes, conditional, shape))
        program.save(str(tmp), external_data=False)
        seconds = time.perf_counter() - start
        max_diff = _check_against_torch(tmp, model, gen, conditional, req.seed)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "source": gen.source,
        "onnx": str(out),
        "bytes": out.stat().st_size,
        "inputs": {LATENT: [None, gen.z_dim], **({LABELS: [None]} if conditional else {})},
        "output": {IMAGE: [None, *shape]},
        "conditional": conditional,
        "truncation": None if req.truncation is None else {"value": req.truncation, "mode": req.mode},
        "standing_stats": passes,
        "export_seconds": seconds,
        "max_abs_diff": max_diff,
        "check_batch": CHECK_BATCH,
    }


def _check_against_torch(
    path: Path, model: nn.Module, gen: LoadedGenerator, conditional: bool, seed: int
) -> float | None:
    """The largest |ONNX - torch| over a batch of CHECK_BATCH under onnxruntime on the CPU (None:
    onnxruntime is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = _inputs(gen, conditional, CHECK_BATCH, seed + 2)
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)})[0]
    with torch.no_grad():
        want = model(*inputs)
    return float((torch.from_numpy(got) - want).abs().max())


class _quiet:
    """Loggers raised to ERROR while open (torch's exporter logs warnings about torchvision)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(name) for name in names]
        self.levels: list[int] = []

    def __enter__(self) -> None:
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for logger, level in zip(self.loggers, self.levels, strict=True):
            logger.setLevel(level)
