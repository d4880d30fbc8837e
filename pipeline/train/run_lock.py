"""One run directory, one writer: `train` holds RUN/LOCK (owner's PID, host, start time) while it runs.

A second `train` on the same run directory refuses at once, naming the owner. A lock left by a
process that is gone (SIGKILL, a crash, a reboot) is taken over with a warning when its owner ran
on this host; from another host its liveness cannot be checked, so the message says how to remove it.
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

LOCK_FILE = "LOCK"


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
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _owner(path)
            if owner is not None and owner.get("host") == me["host"] and not _alive(owner.get("pid")):
                print(
                    f"warning: taking over {path}: its owner, process {owner.get('pid')} (since "
                    f"{owner.get('since')}), is no longer running",
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
