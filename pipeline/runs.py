"""A run directory's layout, in one place; every other module asks here where things live.

RUN/spec.resolved.yaml     the spec as trained, every default spelled out
RUN/metrics.jsonl          one JSON record per logged step, evaluation and rollback
RUN/tensorboard/           the same scalars for TensorBoard (when it is installed)
RUN/samples/step-N*.png    the method's sample grids
RUN/checkpoints/step-N/    checkpoints (their inside: train/checkpoint.py)
RUN/export/NAME.safetensors and spec.yaml: the finished run's networks (EMAs where kept); an
                           import of published weights (pipeline/weights) writes the same, and
                           may add NAME-train.safetensors and a discriminator
RUN/LOCK                   the process writing the run (train/run_lock.py)
RUN/profile/               `profile`'s reports
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import user_error

if TYPE_CHECKING:
    import torch

    from pipeline.spec.schema import Spec

EXPORT_SPEC = "spec.yaml"  # beside the exported weights: what `sample` and `eval` rebuild them from


@dataclass(frozen=True)
class Run:
    """The paths of one run directory."""

    root: Path

    @property
    def resolved_spec(self) -> Path:
        return self.root / "spec.resolved.yaml"

    @property
    def metrics(self) -> Metrics:
        return Metrics(self.root / "metrics.jsonl")

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def samples(self, step: int, suffix: str = "") -> Path:
        return self.root / "samples" / f"step-{step:08d}{suffix}.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def exported(self, network: str) -> Path:
        return self.export / f"{network}.safetensors"

    @property
    def lock(self) -> Path:
        return self.root / "LOCK"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    def begin(self, spec_dict: dict[str, Any], step: int) -> None:
        """A start or a resume from `step`: the resolved spec written, and lines logged after that
        step (by the run that is being resumed) dropped."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.resolved_spec.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        self.metrics.keep_until(step)

    def remove_if_unused(self) -> None:
        """Remove a run directory that holds nothing a person could use (no checkpoint, export,
        sample or logged line): a refused start leaves nothing behind. For a directory this call made."""
        import shutil

        kept = [self.checkpoints / "step-*", self.export, self.metrics.path, self.root / "samples" / "*.png"]
        if not any(any(self.root.glob(str(p.relative_to(self.root)))) for p in kept):
            shutil.rmtree(self.root, ignore_errors=True)

    def write_export(self, networks: dict[str, torch.nn.Module], spec_dict: dict[str, Any]) -> Path:
        """Each network's weights as NAME.safetensors (the caller passes EMAs where there are
        some), and the spec beside them."""
        from safetensors.torch import save_file

        self.export.mkdir(parents=True, exist_ok=True)
        for name, net in networks.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, self.exported(name))
        (self.export / EXPORT_SPEC).write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        return self.export


@dataclass(frozen=True)
class Metrics:
    """RUN/metrics.jsonl: appended to line by line, cut back on a resume or a rollback, read by
    `train`'s report and the lock's takeover warning."""

    path: Path

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record (none when the file does not exist yet)."""
        return [json.loads(line) for line in self._lines()] if self.path.exists() else []

    def keep_until(self, step: int) -> None:
        """Drop the lines of steps after `step` (a resume or rollback to it will log them again)."""
        if self.path.exists():
            kept = [line for line in self._lines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def last(self) -> dict[str, Any] | None:
        """The last complete record, read from the file's end only (None: none readable)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):  # a process killed mid-append leaves a partial last line
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                return record
        return None

    def _lines(self) -> list[str]:
        """The lines; a partial last line (a crash or a full disk mid-append) is dropped with a
        warning, any other line that is not a JSON record is an error naming it."""
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not a record with a step")
            except ValueError as exc:
                if number == len(lines):
                    print(f"warning: {self.path}:{number}: dropping a partial last line ({exc})", file=sys.stderr)
                    return lines[:-1]
                raise user_error(
                    f"line {number} is not a metrics record: {exc}",
                    file=str(self.path),
                    hint="fix or delete that line; the checkpoints are unaffected",
                ) from None
        return lines


def export_files(spec: Spec) -> list[Path]:
    """What a finished run of `spec` exports: each exported network's weights."""
    run = Run(spec.run_dir)
    return [run.exported(name) for name in spec.method.exports(spec)]


def trained_weights(export: Path, network: str) -> Path:
    """EXPORT/NETWORK-train.safetensors: a network's own weights where NETWORK.safetensors holds its
    EMA (an import of published weights that has both; `train.init_from` starts from them)."""
    return export / f"{network}-train.safetensors"


def is_export(path: Path) -> bool:
    """A folder of exported weights (a run's export/, or a copy of it)."""
    return (path / EXPORT_SPEC).is_file() and any(path.glob("*.safetensors"))
