"""Memory per rank of a training step, estimated from the spec alone (nothing is allocated).

Two parts, per rank:

- the state that lives through the run, from the parameter counts and `train:`: the weights
  (float32 master weights; `precision: bf16` is autocast, which keeps them in float32), their
  gradients, the optimizer's states (Adam: two per weight), the EMA copies (float32), and under
  ZeRO (DeepSpeed 0.19.8, `runtime/zero/stage_1_and_2.py`) the partitioned states, the float32
  partition of the master weights it clones (and that partition's gradient), and the gradient
  reduction bucket it allocates per engine (`setup_buckets`: `reduce_bucket_size`, 5e8 values by
  default, in the gradients' dtype, float32 here);
- the activations autograd saves for the backward, measured: each phase of the method runs on
  the meta device as the loop runs it (the networks it freezes frozen, G's forward in the D step
  without a graph, D's forward in the G step with one), under
  `torch.autograd.graph.saved_tensors_hooks`, and the bytes of every distinct storage packed
  for the backward are added up (weights and buffers, counted above, excepted). Autocast does
  not act on meta tensors, so `bf16` runs under `MetaAutocast`, which makes autocast's casts
  (torch's CUDA autocast op lists) itself; attention saves what the fused kernels save, and
  cross-replica BatchNorm takes its synchronized path when there are several ranks. Each phase
  is measured at two micro-batches, which gives bytes per sample and a part that does not grow
  with the batch (the casted and spectrally normalised weights the forward saves).

A step's peak is the state plus the largest phase's saved activations, plus a backward workspace:
the gradients of the activations in flight while saved tensors are freed (`WORKSPACE`, a fraction
of the saved activations, calibrated against measured peaks; see BENCHMARKS.md, "Memory per
rank"). Not counted: the CUDA context and NCCL's buffers, DALI's prefetched batches, the caching
allocator's fragmentation: what `HEADROOM` keeps free. torch.compile saves less than eager (its
partitioner recomputes cheap operations in the backward): the estimate is eager's, an upper bound
for compiled runs.
"""

from __future__ import annotations

import functools
import re
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from pipeline.blocks.attention import fused_attention_on_meta
from pipeline.blocks.layers import meta_replicas
from pipeline.graph import analyze_spec, instantiate
from pipeline.profile.flops import _MetaInputs
from pipeline.train.phases import frozen
from pipeline.train.preflight import batch_plan

GIB = 1 << 30
DEFAULT_GPU_MEMORY = 80 * GIB  # an H100's (80 GB HBM3, as NVIDIA counts it: 80 GiB of which ~79.1 usable)
HEADROOM = 0.10  # of the device's memory kept free for the CUDA context, NCCL, DALI and fragmentation
WORKSPACE = 0.0  # activation gradients in flight at the backward's peak, as a fraction of the saved activations
ZERO_BUCKET_VALUES = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (runtime/zero/config.py)
PROBE_MICRO = (4, 8)  # two micro-batches (multiples of ProGAN's stddev groups of 4; BatchNorm needs 2 or more)

# torch.autocast's CUDA op lists (torch/csrc/autograd/autocast_mode.cpp; the autocast docs):
# these run in bf16 under `precision: bf16` ...
LOWER_PRECISION = frozenset(
    [
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "linear",
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "mm",
        "bmm",
        "baddbmm",
        "addmm",
        "addbmm",
        "addmv",
        "addr",
        "mv",
        "chain_matmul",
        "multi_dot",
        "prelu",
        "scaled_dot_product_attention",
    ]
)
# ... and these in float32 whatever their inputs
FULL_PRECISION = frozenset(
    [
        "softmax",
        "log_softmax",
        "softmin",
        "layer_norm",
        "group_norm",
        "norm",
        "normalize",
        "pow",
        "__pow__",
        "__rpow__",
        "rsqrt",
        "reciprocal",
        "exp",
        "expm1",
        "log",
        "log1p",
        "log2",
        "log10",
        "sum",
        "prod",
        "cumsum",
        "cumprod",
        "softplus",
        "cross_entropy",
        "nll_loss",
        "mse_loss",
        "l1_loss",
        "smooth_l1_loss",
        "binary_cross_entropy_with_logits",
        "kl_div",
        "cosine_similarity",
        "cdist",
        "dist",
        "pdist",
        "renorm",
    ]
)
# ... and these in the widest floating type of their inputs
PROMOTE = frozenset(
    [
        "addcdiv",
        "addcmul",
        "atan2",
        "bilinear",
        "cross",
        "dot",
        "grid_sampler",
        "index_put",
        "scatter_add",
        "tensordot",
        "cat",
        "stack",
    ]
)


class MetaAutocast(TorchFunctionMode):
    """`torch.autocast(dtype=bfloat16)` for meta tensors, which autocast leaves as they are: the
    floating inputs of LOWER_PRECISION functions cast to bf16 (a parameter once per region, as
    autocast's weight cache does), those of FULL_PRECISION functions to float32."""

    def __init__(self):
        super().__init__()
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _low(self, x):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            return x
        if x.is_leaf and x.requires_grad:  # a weight: cast once, as autocast's cache does
            source, cast = self.cache.get(id(x), (None, None))
            if source is not x:  # (the source is kept, so that its id is not reused)
                cast = x.to(torch.bfloat16)
                self.cache[id(x)] = (x, cast)
            return cast
        return x.to(torch.bfloat16)

    @staticmethod
    def _full(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOWER_PRECISION:
            args, kwargs = tree_map(self._low, (args, kwargs))
        elif name in FULL_PRECISION:
            args, kwargs = tree_map(self._full, (args, kwargs))
        elif name in PROMOTE:
            floats = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.is_floating_point()]
            if len({x.dtype for x in floats}) > 1:
                widest = functools.reduce(torch.promote_types, (x.dtype for x in floats))
                args, kwargs = tree_map(
                    lambda x: x.to(widest) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                    (args, kwargs),
                )
        return func(*args, **kwargs)


class _MemoryInputs(_MetaInputs):
    """The meta step inputs in the run's precision: images as the loader gives them, autocast."""

    def __init__(self, spec, nets, micro: int, streams: dict[str, bool]):
        super().__init__(spec, nets, micro, streams)
        self.bf16 = spec.train.precision == "bf16"

    def next(self, stream: str):
        images, labels = super().next(stream)
        return (images.to(torch.bfloat16) if self.bf16 else images), labels

    def mixed(self):
        return MetaAutocast() if self.bf16 else super().mixed()


@dataclass
class PhaseActivations:
    """Bytes autograd saves for the backward of one phase, at `micro` samples per micro-batch."""

    name: str
    fixed: int  # whatever the batch: weights cast to bf16, spectrally normalised weights
    per_sample: float

    def at(self, micro: int) -> float:
        return self.fixed + self.per_sample * micro


def meta_networks(loaded) -> tuple[dict, dict[str, torch.nn.Module]]:
    """(the plans, every network the method trains instantiated on the meta device, in train mode)."""
    plans = analyze_spec(loaded)
    return plans, {name: instantiate(loaded, plan, "meta").train() for name, plan in plans.items()}


def saved_by_phase(
    loaded, micro: int, *, world_size: int = 1, attention: str = "fused", nets: dict | None = None
) -> dict[str, int]:
    """Bytes of the distinct storages each phase of the method saves for its backward, at `micro`
    samples per micro-batch on the meta device (the networks' own weights and buffers excepted).
    `attention`: fused (what scaled_dot_product_attention's kernels save, as runs do now) or
    explicit (the (queries x keys) map, as before they did)."""
    spec = loaded.spec
    nets = nets if nets is not None else meta_networks(loaded)[1]
    owned = {t.untyped_storage()._cdata for net in nets.values() for t in (*net.parameters(), *net.buffers())}
    method = spec.method.build(spec)
    inputs = _MemoryInputs(spec, nets, micro, spec.method.streams(spec))
    saved: dict[str, int] = {}
    with ExitStack() as stack:
        stack.enter_context(meta_replicas(world_size))
        if attention == "fused":
            stack.enter_context(fused_attention_on_meta())
        for phase in method.phases:
            kept: dict[int, torch.Tensor] = {}

            def pack(t: torch.Tensor, kept=kept) -> torch.Tensor:
                key = t.untyped_storage()._cdata
                if key not in owned:
                    kept[key] = t
                return t

            # the forward alone: what it saves is the backward's to free, and running that backward
            # on meta would take as long again and change nothing measured here
            with frozen(*(nets[n] for n in phase.frozen)), torch.autograd.graph.saved_tensors_hooks(pack, _same):
                phase.objective(inputs)
            saved[phase.name] = sum(t.untyped_storage().nbytes() for t in kept.values())
            kept.clear()
    return saved


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def phase_activations(
    loaded, *, world_size: int = 1, attention: str = "fused", nets: dict | None = None
) -> list[PhaseActivations]:
    """Each phase's saved activations as a part that grows with the batch and one that does not,
    from two micro-batches (PROBE_MICRO): linear in the batch by construction."""
    nets = nets if nets is not None else meta_networks(loaded)[1]
    small, large = PROBE_MICRO
    a = saved_by_phase(loaded, small, world_size=world_size, attention=attention, nets=nets)
    b = saved_by_phase(loaded, large, world_size=world_size, attention=attention, nets=nets)
    out = []
    for name in a:
        per = (b[name] - a[name]) / (large - small)
        out.append(PhaseActivations(name, max(0, round(a[name] - per * small)), per))
    return out


def state_bytes(loaded, world_size: int, nets: dict[str, torch.nn.Module]) -> dict[str, int]:
    """What lives through the run on each rank, by kind (see the module's docstring), from the
    meta networks `nets` (their parameter counts and buffers)."""
    spec, t = loaded.spec, loaded.spec.train
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    buffers = {name: sum(b.numel() * b.element_size() for b in net.buffers()) for name, net in nets.items()}
    stage, n = t.zero_stage, world_size
    out = dict.fromkeys(
        ("weights", "gradients", "optimizer states", "EMA", "ZeRO master partition", "ZeRO reduce bucket"), 0
    )
    out["weights"] = sum(4 * c + buffers[name] for name, c in counts.items())
    for members in spec.method.engines(spec).values():
        p = sum(counts[m] for m in members)
        opt = spec.opt_of(members[0])
        states = 2 if opt.kind == "adam" else (1 if opt.momentum else 0)
        out["gradients"] += 4 * p // (n if stage >= 2 else 1)
        out["optimizer states"] += 4 * states * p // (n if stage >= 1 else 1)
        if stage >= 1:
            out["ZeRO master partition"] += 2 * 4 * p // n  # the float32 partition and its gradient
            out["ZeRO reduce bucket"] += 4 * ZERO_BUCKET_VALUES
    for name in nets:
        if spec.ema_of(name) is not None:
            out["EMA"] += 4 * counts[name] + buffers[name]
    return {k: v for k, v in out.items() if v}


@dataclass
class MemoryEstimate:
    """Bytes per rank of a spec's step, by part, and what follows for a device of given memory."""

    world_size: int
    micro: int  # the configured samples per micro-batch on a rank
    accum: int  # the configured accumulation steps
    batch_size: int
    state: dict[str, int]
    phases: list[PhaseActivations]
    notes: list[str] = field(default_factory=list)

    @property
    def state_total(self) -> int:
        return sum(self.state.values())

    def activations(self, micro: int) -> float:
        """The largest phase's saved activations, with the backward's workspace."""
        return max(p.at(micro) for p in self.phases) * (1 + WORKSPACE) if self.phases else 0.0

    def per_rank(self, micro: int | None = None) -> float:
        return self.state_total + self.activations(self.micro if micro is None else micro)

    def largest_micro(self, memory: float) -> int:
        """The largest samples per micro-batch whose estimate fits `memory` less HEADROOM (0: none)."""
        usable = memory * (1 - HEADROOM) - self.state_total
        if usable <= 0:
            return 0
        fits = [
            int((usable / (1 + WORKSPACE) - p.fixed) // p.per_sample) if p.per_sample > 0 else 1 << 30
            for p in self.phases
        ]
        return max(0, min(fits, default=1 << 30))

    def split(self, memory: float) -> tuple[int, int] | None:
        """(samples per micro-batch, accumulation steps) for train.batch_size on these ranks: the
        largest micro-batch that fits and divides each rank's share; None if not even 1 fits."""
        share = self.batch_size // self.world_size
        limit = min(self.largest_micro(memory), share)
        best = next((m for m in range(limit, 0, -1) if share % m == 0), None)
        return None if best is None else (best, share // best)


def estimate(loaded, world_size: int = 1, *, attention: str = "fused") -> MemoryEstimate:
    """The memory estimate of a spec on `world_size` ranks (its configured batch split)."""
    spec = loaded.spec
    micro, accum = batch_plan(spec.train, world_size)
    _, nets = meta_networks(loaded)
    phases = phase_activations(loaded, world_size=world_size, attention=attention, nets=nets)
    notes = []
    if spec.method.batch_sizes(spec):
        notes.append("at train.batch_size and data.resolution; the method's scheduled batches are not estimated")
    if spec.compile.enabled:
        notes.append("eager's activations: torch.compile saves less (an upper bound)")
    return MemoryEstimate(
        world_size, micro, accum, spec.train.batch_size, state_bytes(loaded, world_size, nets), phases, notes
    )


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> float | None:
    """'80GiB', '80GB', '81559MiB', '8e10' -> bytes (GB: 10^9, GiB: 2^30); None if not a size."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS:
        return None
    value = float(match.group(1)) * _UNITS[match.group(2)]
    return value if value > 0 else None


def _ranks(n: int) -> str:
    return f"{n} rank{'s' if n != 1 else ''}"


def gib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def measure_cpu_peak(loaded, steps: int = 2) -> int:
    """The peak of the bytes held in tensors while a Trainer is built on the CPU and runs `steps`
    steps: torch's CPU memory profiler's running total of allocated bytes (the CPU counterpart of
    `torch.cuda.max_memory_allocated`; Python objects and the allocator's slack are not in it),
    for comparing the estimate with what a run holds."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    from pipeline.train.loop import Trainer

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(loaded, device="cpu", resume=False)
        for _ in range(steps):
            trainer.run_step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [(e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]"]
    # the reporter's running total keeps what an earlier profile allocated and freed after it
    # stopped (frees are tracked only while profiling): count from the total this one started at
    start = totals[0][0] - totals[0][1]
    return max(total for total, _ in totals) - start


def fit_warning(est: MemoryEstimate, memory: float) -> str | None:
    """What to say when the configured split does not fit `memory` less HEADROOM; None when it does."""
    usable = memory * (1 - HEADROOM)
    if est.per_rank() <= usable:
        return None
    split = est.split(memory)
    return (
        f"the configured split ({est.micro} per rank x {est.accum} accumulated x {_ranks(est.world_size)}) needs about "
        f"{gib(est.per_rank())} per rank (estimate), more than {gib(usable)} of {gib(memory)}: likely out of "
        "memory; "
        + (
            f"set train.batch_per_rank={split[0]} ({split[1]} accumulation steps reach batch {est.batch_size})"
            if split
            else "not even 1 sample per rank fits; use ZeRO (train.zero_stage=2), more memory or a smaller model"
        )
    )


def describe(est: MemoryEstimate, memory: float | None) -> list[str]:
    """The lines `validate` prints: the estimate per rank and, given the device's memory, the
    largest micro-batch that fits, the accumulation that reaches the batch, and a warning when
    the configured split does not fit."""
    n, micro, accum = est.world_size, est.micro, est.accum
    worst = max(est.phases, key=lambda p: p.at(micro)) if est.phases else None
    lines = [
        f"memory per rank (estimate), {_ranks(n)}, batch {est.batch_size} = {micro} per rank x {accum} accumulated "
        f"x {n}: {gib(est.per_rank())}",
        "  state: " + ", ".join(f"{k} {gib(v)}" for k, v in est.state.items()),
        "  activations saved for the backward, per sample: "
        + ", ".join(f"{p.name} step {p.per_sample / 2**20:,.1f} MiB" for p in est.phases)
        + (f"; at {micro} per rank: {gib(est.activations(micro))} (the {worst.name} step)" if worst else ""),
    ]
    lines += [f"  ({note})" for note in est.notes]
    if memory is not None:
        split = est.split(memory)
        lines.append(
            f"  on {gib(memory)} per device ({HEADROOM:.0%} kept free): at most {est.largest_micro(memory)} per rank "
            "fit"
            + (
                f"; for batch {est.batch_size} on {_ranks(n)}: train.batch_per_rank={split[0]} with {split[1]} "
                "accumulation step(s)"
                if split
                else ""
            )
        )
        warning = fit_warning(est, memory)
        if warning:
            lines.append("warning: " + warning)
    return lines
