"""The progress a person watches: a bar with images/s and the time left on a terminal, a line
per log interval otherwise (rank 0 only); and `say`, a line about what the run is doing now
(building, resuming, compiling, evaluating), so that no phase longer than a few seconds is silent."""

from __future__ import annotations

import sys
import time
from typing import Any


def say(message: str) -> None:
    """A line about what is happening (stderr, flushed: it shows at once in a log file too)."""
    print(message, file=sys.stderr, flush=True)


def quiet(message: str) -> None:
    """`say` on a rank other than 0: nothing."""


def stage(record: dict[str, Any]) -> str:
    """A growing network's stage as a logged line gives it ('stage 16x16 fade 0.42  '); '' for the rest."""
    if "resolution" not in record:
        return ""
    side = record["resolution"]
    phase = f"fade {record['alpha']:.2f}" if record.get("phase") == "fade" else "stable"
    return f"stage {side}x{side} {phase}  "


class Progress:
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

    def after_step(self, step: int, images_before: int) -> None:
        """After every step (cheap): the bar and the time left move even between log lines."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, left=self.time_left(step))

    def update(self, step: int, record: dict[str, Any]) -> None:
        losses = "  ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        info = f"{stage(record)}{record['images_per_s']:.0f} img/s  {losses}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info, left=self.time_left(step))
        elif self.enabled:
            print(
                f"step {step}/{self.total}  images {record['images_seen']}  {info}  {self.time_left(step)}", flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
