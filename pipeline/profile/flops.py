"""FLOPs of one training step, counted by running the method's own phases on the meta device.

Every network the method trains is instantiated on `meta` (no storage) at the run's
micro-batch, and each phase's objective runs once on meta inputs (zeros of the streams' and
latents' shapes) under `torch.utils.flop_counter`, followed by the backward the loop would run
(with the phase's frozen networks frozen, so their weight gradients are skipped). The FLOPs go to
the profiling region they run in (`G_fwd`, `D_fwd`, `D_bwd`, ...: the same names `profile`
times), and each phase counts `repeat x accumulation` times per step. So the count follows
whatever the method does: R1 or the gradient penalty, LOGAN-style extra passes, four networks.

Counted as flop_counter counts: convolutions and matrix products (2 FLOPs per multiply-add),
forward and backward. Spectral norm's power iteration (matrix-vector products, a few per weight
per training forward, independent of the batch) is reported apart as `sn`, as `validate` does,
from the number of forwards each network ran.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import regions
from pipeline.graph import analyze_spec, instantiate
from pipeline.train.phases import frozen


class _FlopRegions:
    """Stands in for `regions.Regions` while counting: FLOPs since the last region boundary go to
    the innermost open region (exclusive, like the timed regions); outside any, to `outside`."""

    def __init__(self, counter: FlopCounterMode, outside: str):
        self.counter, self.outside = counter, outside
        self.totals: dict[str, float] = {}
        self.stack: list[str] = []
        self.last = 0

    def _charge(self) -> None:
        now = self.counter.get_total_flops()
        name = self.stack[-1] if self.stack else self.outside
        if now > self.last:
            self.totals[name] = self.totals.get(name, 0.0) + now - self.last
        self.last = now

    @contextmanager
    def time(self, name: str):
        self._charge()
        self.stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()


class _MetaInputs:
    """`StepInputs` on the meta device: zeros of every stream's and latent's shape. Schedules see
    the end of every warm-up, and stochastic passes (CutMix) are counted as if they always ran."""

    images_seen = 1 << 62
    step = 0
    rank, world_size = 0, 1
    counting_flops = True

    def __init__(self, spec, nets, micro: int, streams: dict[str, bool]):
        self.spec, self.nets, self.micro, self.streams = spec, nets, micro, streams
        self.reads = dict.fromkeys(streams, 0)

    def next(self, stream: str):
        self.reads[stream] += 1
        d = self.spec.data
        images = torch.zeros(self.micro, d.channels, d.resolution, d.resolution, device="meta")
        labels = torch.zeros(self.micro, dtype=torch.long, device="meta") if self.streams[stream] else None
        return images, labels

    def latents(self, n: int):
        z = torch.zeros(n, self.spec.latent.z_dim, device="meta")
        y = torch.zeros(n, dtype=torch.long, device="meta") if self.spec.data.num_classes else None
        return z, y

    def mixed(self):
        return nullcontext()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values


def step_flops(loaded, micro: int, accum: int) -> dict[str, float]:
    """FLOPs per step (all phases, one rank) by region name, and `sn` for spectral norm."""
    return meta_step(loaded, micro, accum)[0]


def meta_step(loaded, micro: int, accum: int) -> tuple[dict[str, float], dict[str, int]]:
    """One step of the method's phases on the meta device: its FLOPs (as `step_flops`) and the
    micro-batches it reads from each stream (one rank)."""
    spec = loaded.spec
    plans = analyze_spec(loaded)
    nets = {name: instantiate(loaded, plan, "meta").train() for name, plan in plans.items()}
    forwards = dict.fromkeys(nets, 0)
    hooks = [
        net.register_forward_hook(lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1))
        for name, net in nets.items()
    ]
    method = spec.method.build(spec)
    inputs = _MetaInputs(spec, nets, micro, spec.method.streams(spec))
    totals: dict[str, float] = {}
    reads = dict.fromkeys(inputs.reads, 0)
    previous = regions._active
    try:
        for phase in method.phases:
            times = phase.repeat * accum
            before, read_before = dict(forwards), dict(inputs.reads)
            with FlopCounterMode(display=False) as counter, frozen(*(nets[n] for n in phase.frozen)):
                counting = _FlopRegions(counter, f"{phase.name}_fwd")
                regions._active = counting
                losses, _ = phase.objective(inputs)
                for name in phase.steps:
                    with regions.region(f"{name}_bwd"):
                        losses[name].backward()
                regions._active = previous
            for name, flops in counting.totals.items():
                totals[name] = totals.get(name, 0.0) + flops * times
            for name in forwards:  # a phase's forwards run `times` times per step
                forwards[name] = before[name] + (forwards[name] - before[name]) * times
            for name in reads:
                reads[name] += (inputs.reads[name] - read_before[name]) * times
    finally:
        regions._active = previous
        for hook in hooks:
            hook.remove()
    totals["sn"] = float(sum(plans[name].sn_flops_per_forward * count for name, count in forwards.items()))
    return totals, reads
