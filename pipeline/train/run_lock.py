"""One run directory, one writer: `train` holds RUN/LOCK (owner's PID, host, start time) while it runs.

A second `train` on the same run directory refuses at once, naming the owner. A lock left by a
process that is gone (SIGKILL, the kernel's out-of-memory killer, a crash, a reboot) is taken over
with a warning when its owner ran on this host, saying how far the run got; the owner's start time
(Linux) tells a live owner from another process that reuses its PID. From another host liveness
cannot be checked, so the message says how to remove the lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import user_error
from pipeline.runs import Run


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _started(pid) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _stale(owner: dict) -> bool:
    """The owner (on this host) is gone, or its PID now belongs to a process started since."""
    pid = owner.get("pid")
    if not _alive(pid):
        return True
    then, now = owner.get("started"), _started(pid)
    return then is not None and now is not None and then != now


def _progress(run_dir: Path) -> str:
    """How far a run got, from the last line of its metrics.jsonl ('' if nothing is logged)."""
    last = Run(run_dir).metrics.last()
    if last is None:
        return ""
    where = ", ".join(f"{k} {last[k]}" for k in ("resolution", "phase") if isinstance(last.get(k), int | str))
    return f" after its last logged step, {last['step']}" + (f" ({where})" if where else "")


def _owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


@contextmanager
def run_lock(run_dir: Path):
    """Hold RUN_DIR/LOCK for the duration; refuse (a user error) if another live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = Run(run_dir).lock
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    me["started"] = _started(me["pid"])
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _owner(path)
            if owner is not None and owner.get("host") == me["host"] and _stale(owner):
                print(
                    f"warning: taking over {path}: its owner, process {owner.get('pid')} (since "
                    f"{owner.get('since')}), is no longer running; it ended without releasing the lock"
                    f"{_progress(run_dir)}, as a process killed from outside does (the kernel's out-of-memory "
                    "killer says so in `dmesg`; then lower the batch); continuing from its newest checkpoint, if any",
                    file=sys.stderr,
                )
                path.unlink(missing_ok=True)
                continue
            who = (
                f"process {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
                if owner
                else "another process (its lock file is unreadable)"
            )
            raise user_error(
                f"{run_dir} is being trained by {who}",
                path="run.dir",
                hint=f"wait for that run to finish or stop it, or train into another run.dir; if it is gone "
                f"(it ran on another machine), delete {path}",
            ) from None
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield path
    finally:
        if (_owner(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
