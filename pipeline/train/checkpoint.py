"""Checkpoints that can always be resumed from and are never half-written.

Layout of run_dir/checkpoints/step-NNNNNNNN/: one directory per engine, named by the method
(G/ and D/ for a GAN: model, optimizer and ZeRO partitions), ema-NETWORK.safetensors per EMA,
rank-NNNNN.pt per rank (RNG states, each data stream's reader position and the method's own
state), state.json (counters, the engines' networks and the resolved spec) and checksums.json,
written last. Everything is written under a `.tmp` name that is renamed when all ranks are done, so a
crash or a full disk leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.data.parts import merge_positions
from pipeline.distributed.engines import barrier, saved_weights
from pipeline.errors import user_error
from pipeline.runs import Run
from pipeline.safe_files import DAMAGED, read_json, read_tensors, read_torch, sha256

CHECKSUMS = "checksums.json"
# Settings a resumed run may change: they steer the run, not the model or its optimisation.
MAY_DIFFER = (
    "description",
    "run",
    "compile",
    "eval",
    "train.max_steps",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.failures",
    "train.init_from",  # read at a run's start only
    "train.init_classes",
    "data.max_bad_samples",
    "data.shards",
    "data.num_threads",
)
# ... and every optimizer's learning rate (train.g_opt.lr, train.d_opt.lr, a network's own opt.lr): a
# resumed run takes the new rate, e.g. to calm a run that grew unstable; and its implementation
MAY_DIFFER_LAST = tuple(f"{opt}.{key}" for opt in ("opt", "g_opt", "d_opt") for key in ("lr", "fused"))


def step_dir(run_dir: Path, step: int) -> Path:
    return Run(run_dir).checkpoint(step)


def _complete(run_dir: Path) -> list[Path]:
    """Checkpoints renamed into place (complete when written), newest first."""
    done = [
        p
        for p in Run(run_dir).checkpoints.glob("step-*")
        if not p.name.endswith(".tmp") and (p / "state.json").exists()
    ]
    return sorted(done, key=lambda p: p.name, reverse=True)


def latest(run_dir: Path) -> Path | None:
    done = _complete(run_dir)
    return done[0] if done else None


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's files against the checksums written with it, or None.
    Checkpoints written before checksums existed cannot be checked and pass."""
    if not (path / CHECKSUMS).exists():
        return None
    recorded = read_json(path / CHECKSUMS)
    if not isinstance(recorded, dict):
        return f"{path / CHECKSUMS} is not a mapping of files to checksums"
    present = {str(f.relative_to(path)): f for f in _files(path)}
    for name in sorted(set(recorded) - set(present)):
        return f"{path / name} is missing"
    for name, file in present.items():
        if name not in recorded:
            return f"{file} was not written with the checkpoint"
        if sha256(file) != recorded[name]:
            return f"{file} differs from what was written (its checksum does not match)"
    return None


def latest_intact(run_dir: Path, before: int | None = None) -> Path | None:
    """The newest checkpoint (of a step below `before`, when given) whose files match their
    checksums; a damaged newer one is skipped with a warning naming the file. None when there is
    no such checkpoint; an error when every one is damaged."""
    problems: list[str] = []
    for path in _complete(run_dir):
        if before is not None and int(path.name.removeprefix("step-")) >= before:
            continue
        problem = damage(path)
        if problem is None:
            for earlier in problems:
                print(f"warning: skipping a damaged checkpoint: {earlier}; resuming from {path}", file=sys.stderr)
            return path
        problems.append(problem)
    if problems:
        raise user_error(
            "no intact checkpoint to resume from: " + "; ".join(problems),
            hint="start a new run with run.dir=PATH, or restore the damaged files",
        )
    return None


def read_state(path: Path) -> dict:
    """A checkpoint's state.json: counters, world size and the resolved spec."""
    state = read_json(path / "state.json")
    missing = [
        k for k in ("step", "images_seen", "world_size", "spec") if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise user_error(f"{path / 'state.json'} lacks {', '.join(missing)}", hint=DAMAGED)
    assert isinstance(state, dict)  # `missing` names every key of anything else
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, path + ".")
        else:
            out[path] = value
    return out


def spec_differences(saved: dict, current: dict) -> list[str]:
    """What differs between a stored spec and the current one, ignoring what a resumed run may
    change. A spec stored by an older version is first read as today's schema reads it (its
    moved keys in their new places, new settings at their defaults)."""
    from pydantic import ValidationError

    from pipeline.spec.schema import Spec, upgrade_stored

    with contextlib.suppress(ValidationError):  # else compared as stored: the differences name what fails
        saved = Spec.model_validate(upgrade_stored(saved)).resolved()
    a, b = _flat(saved), _flat(current)
    keep = [
        k
        for k in sorted(set(a) | set(b))
        if not any(k == m or k.startswith(m + ".") for m in MAY_DIFFER)
        and not any(k == m or k.endswith("." + m) for m in MAY_DIFFER_LAST)
    ]
    return [
        f"{k}: {a.get(k, '(absent)')!r} in the checkpoint, {b.get(k, '(absent)')!r} now"
        for k in keep
        if a.get(k) != b.get(k)
    ]


def save(
    run_dir: Path, step: int, *, engines: dict, emas: dict, world, rank_state: dict, state: dict, keep: int
) -> Path:
    """Write a checkpoint of every engine and EMA, this rank's `rank_state` (RNG, stream positions,
    the method's state) and, from the main rank, `state` (counters and the spec)."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        return _save(run_dir, final, tmp, engines, emas, world, rank_state, state, keep)
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc):
            raise
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(run_dir).free
        raise user_error(
            f"no space left on {_mount_point(run_dir)} ({free / 1e6:.0f} MB free) while writing the checkpoint of "
            f"step {step}; the partial one was removed and the previous checkpoint is intact",
            path="run.dir",
            hint="free some space (or set run.dir on a larger disk), then run the same command again to resume",
        ) from None


def _disk_full(exc: BaseException) -> bool:
    # torch.save reports a full disk as a RuntimeError from its zip writer, not as ENOSPC
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
        isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "No space left" in str(exc))
    )


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _save(run_dir, final, tmp, engines, emas, world, rank_state, state, keep) -> Path:
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for name, engine in engines.items():
        engine.save(tmp / name)
    rng = {"cpu": torch.get_rng_state(), **rank_state.get("rng", {})}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rank_state | {"rng": rng}, tmp / f"rank-{world.rank:05d}.pt")
    barrier()
    if world.is_main:
        for name, ema in emas.items():
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / f"ema-{name}.safetensors")
        engine_networks = {name: list(engine.networks) for name, engine in engines.items()}
        (tmp / "state.json").write_text(json.dumps(state | {"engines": engine_networks}, indent=1))
        # last: the checksum of every file, verified on resume (bit rot, a bad copy, a truncation)
        sums = {str(f.relative_to(tmp)): sha256(f) for f in _files(tmp)}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(p for p in Run(run_dir).checkpoints.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, *, engines: dict, emas: dict, world, spec_dict: dict) -> tuple[dict, dict]:
    """Restore engines and EMAs; return (state.json, this rank's state: RNG, streams, method)."""
    state = read_state(path)
    differences = spec_differences(state["spec"], spec_dict)
    if differences:
        raise user_error(
            f"the checkpoint {path} was written by a different spec:\n      " + "\n      ".join(differences),
            hint="use the spec the run was started with, or start a new run with run.dir=PATH",
        )
    written_by = state["world_size"]
    for name, engine in engines.items():
        engine.load(path / name, written_by)
    for name, ema in emas.items():
        ema.load_state_dict(read_tensors(ema_file(path, name)))
    # RNG states and the method's own (CSGAN's image history, replay): this rank's, or on another
    # number of ranks those of rank (rank mod the old number); the streams' positions: every part's
    ranks = [world.rank] if written_by == world.size else range(written_by)
    files = {rank: _rank_file(path, rank) for rank in ranks}
    local = files[world.rank % written_by]
    local["streams"] = merge_positions(files)
    return state, local


def _rank_file(path: Path, rank: int) -> dict:
    local = read_torch(path / f"rank-{rank:05d}.pt")
    if not isinstance(local, dict):
        raise user_error(f"{path / f'rank-{rank:05d}.pt'} is not a rank's state (a dict)", hint=DAMAGED)
    if "loader" in local:  # written before streams had names: the one stream of a GAN
        local["streams"] = {"images": local.pop("loader")}
    return local


def data_parts(state: dict) -> int:
    """The number of parts a run reads its data in (data/parts.py): its first number of ranks."""
    return state.get("data_parts", state["world_size"])  # written before parts: never resumed elsewhere


def ema_file(path: Path, network: str) -> Path:
    """The EMA of a network in a checkpoint (`ema.safetensors`: a GAN's, written before EMAs were per network)."""
    file = path / f"ema-{network}.safetensors"
    legacy = path / "ema.safetensors"
    return legacy if not file.exists() and network == "generator" and legacy.exists() else file


def engines_of(state: dict) -> dict[str, list[str]]:
    """Engine directory -> the networks it holds, as the checkpoint's state.json records it."""
    return state.get("engines") or {"G": ["generator"], "D": ["discriminator"]}  # before methods: a GAN


def network_weights(path: Path, network: str) -> dict[str, torch.Tensor]:
    """A network's full weights from a checkpoint, on the CPU, read without unpickling code."""
    for engine, networks in engines_of(read_state(path)).items():
        if network in networks:
            weights = saved_weights(path / engine)
            if len(networks) == 1:
                return weights
            prefix = network + "."
            return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    raise user_error(f"{path} holds no network {network!r}", hint=DAMAGED)
