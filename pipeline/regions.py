"""Named regions of a training step (`data_wait`, `G_fwd`, `D_bwd`, `opt_D`, `ema`, `comm`, ...).

The training loop marks its phases with `region(name)`; that costs one global lookup unless a
`Regions` timer is active (a profile run). An active timer synchronises the accelerator at every
boundary, so that asynchronously launched work is charged to the region that launched it, and
times are exclusive: a nested region's time is not counted again in its parent. Each region is
also a `torch.profiler.record_function` range, so traces show the same names.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol, Self

import torch


class _Timer(Protocol):
    """What `region` enters while active: a `Regions`, or the FLOP counter's stand-in for one."""

    def time(self, name: str) -> AbstractContextManager[object]: ...


_active: _Timer | None = None


def region(name: str):
    return _active.time(name) if _active is not None else nullcontext()


class Regions:
    """Exclusive wall-clock seconds per region name while active (`with Regions(...) as r:`)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time spent in nested regions]

    def __enter__(self) -> Self:
        global _active
        if _active is not None:
            raise RuntimeError("regions are already being timed")
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None

    @contextmanager
    def time(self, name: str):
        self.sync()
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            with torch.profiler.record_function(name):
                yield
                self.sync()
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[0]
            self.seconds[name] += elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed


def timed(name: str, fn):
    """`fn` with every call marked as region `name` (for work done inside a library, such as
    DeepSpeed's gradient all-reduce inside `engine.backward`)."""

    def wrapper(*args, **kwargs):
        with region(name):
            return fn(*args, **kwargs)

    return wrapper
