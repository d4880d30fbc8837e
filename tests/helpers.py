"""Helpers shared by test modules of several packages (the directory is on pytest's path)."""

from __future__ import annotations

import subprocess
import time

import pytest

# How long a subprocess may take to log the steps a test waits for; a bound for a hung run only,
# far above what a loaded machine needs.
PATIENCE_S = 900


def wait_for_steps(proc: subprocess.Popen, run_dir, num_steps: int, stderr_path) -> None:
    """Return once the training subprocess PROC has logged NUM_STEPS lines to RUN_DIR/metrics.jsonl;
    fail with its stderr if it exits first, or if they have not come after PATIENCE_S."""
    log = run_dir / "metrics.jsonl"
    start = time.monotonic()
    # complete lines only: the one being written may not be JSON yet
    while not (log.exists() and log.read_text().count("\n") >= num_steps):
        if proc.poll() is not None:
            pytest.fail(
                f"training exited with status {proc.returncode} before logging {num_steps} steps:\n"
                + stderr_path.read_text()[-3000:]
            )
        if time.monotonic() - start > PATIENCE_S:
            proc.kill()
            proc.wait()
            pytest.fail(
                f"training had not logged {num_steps} steps after {PATIENCE_S} s:\n" + stderr_path.read_text()[-3000:]
            )
        time.sleep(0.2)
