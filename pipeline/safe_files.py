"""Reading back files the project wrote, such that no byte read can run code.

Run directories and exports are shared and downloaded; a checkpoint file is input like a spec.
Tensors are read with safetensors, records with JSON, and torch files only with
`torch.load(weights_only=True)`, PyTorch's unpickler that builds tensors, containers and numbers
and refuses every other global, with an explicit allow-list of the few plain classes DeepSpeed
stores. A file that fails to read is a user error naming it, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.errors import user_error

DAMAGED = "the file is damaged or incomplete: resume from an earlier checkpoint (delete this one), or start anew"


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes (shards, checkpoints, feature networks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_torch(path: str | Path, *, map_location=None, allowed: Iterable[type] = ()) -> object:
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global or an opcode
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise user_error(
            f"refused to load {path}: it holds something a checkpoint of this project never stores ({reason}), "
            "and loading it could run code",
            hint="the file was changed or comes from elsewhere; do not load it. Resume from another checkpoint "
            "(delete this one) or start anew",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise user_error(f"cannot read {path}: {exc}", hint=DAMAGED) from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise user_error(f"cannot read {path}: {exc}", hint=DAMAGED) from None


def read_json(path: str | Path) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise user_error(f"cannot read {path}: {exc}", hint=DAMAGED) from None
