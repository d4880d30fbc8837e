"""What `train` and `eval` say while they work: every phase longer than a few seconds has a line
(building, resuming, the first step's pace, each evaluation with its scores, each truncation of a
sweep), on stderr beside the progress lines."""

from __future__ import annotations

import re

import pytest

from pipeline.eval.evaluate import counted

TINY = [
    "train.max_steps=2",
    "train.batch_size=8",
    "train.log_every=2",
    "train.sample_every=100",
    "train.checkpoint_every=1",
    "eval.every=2",
    "eval.num_samples=20",
    "eval.standing_stats=1",
]


def lines_in_order(text: str, *patterns: str) -> None:
    """Each pattern (a regular expression) matches a line of TEXT, each after the previous one's."""
    lines, at = text.splitlines(), 0
    for pattern in patterns:
        found = next((i for i in range(at, len(lines)) if re.search(pattern, lines[i])), None)
        assert found is not None, f"no line matching {pattern!r} after line {at} of:\n{text}"
        at = found + 1


@pytest.mark.slow
def test_a_run_and_its_resume_say_what_they_are_doing(cli, demo_shards_with_classifier, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "spec=demo", f"data.shards={demo_shards_with_classifier}", f"run.dir={run_dir}", *TINY]
    first = cli(*args)
    assert first.code == 0, first.err
    lines_in_order(
        first.err,
        r"^building generator and discriminator and their engines on cpu \(1 rank\(s\)\)$",
        r"^built: 1,365,350 parameters in [\d.]+ s$",
        r"^opening the data streams at 32x32, 8 per micro-batch$",
        r"^evaluating step 0: 20 samples, eval.features demo$",
        r"^  standing statistics: 1 passes of 64$",
        r"^  FID [\d.]+, KID [-\d.]+, IS [\d.]+, class accuracy [\d.]+% \(20 samples, .*\) \[[\d.]+ s\]$",
        r"^training from step 0 to 2$",
        r"^step 1 took [\d.]+ s; a line every train.log_every=2$",
        r"^evaluating step 2: 20 samples",
        r"^  FID [\d.]+",
        r"trained to step 2 of 2 \(16 images\)$",
    )
    assert not re.search(r"(?m)^resum", first.err)
    assert re.search(r"(?m)^step 2/2  images 16 ", first.out)  # the progress line (no terminal: a line)

    resumed = cli(*args, "train.max_steps=3")
    assert resumed.code == 0, resumed.err
    lines_in_order(
        resumed.err,
        r"^building generator and discriminator",
        rf"^resuming from {re.escape(str(run_dir / 'checkpoints' / 'step-00000002'))}: weights, optimizer states",
        r"^resumed from step 2 \(16 images seen\)$",
        r"^training from step 2 to 3$",
        r"^step 3 took [\d.]+ s",
        r"^evaluating step 3: 20 samples",
        r"^  FID [\d.]+",
    )
    assert "evaluating step 0" not in resumed.err  # the baseline is a fresh run's

    sweep = cli("eval", run_dir, "--num", "20", "--truncation", "0.5,none", "--standing-stats", "1")
    assert sweep.code == 0, sweep.err
    lines_in_order(
        sweep.err,
        r"^truncation 0.5 \(1 of 2\): 20 samples$",
        r"^  FID [\d.]+, KID [-\d.]+, IS [\d.]+, class accuracy [\d.]+% \[[\d.]+ s\]$",
        r"^truncation none \(2 of 2\): 20 samples$",
        r"^  FID [\d.]+",
    )


def test_scoring_says_how_far_it_is():
    said: list[str] = []
    batches = [(list(range(2)), None)] * 3  # three batches of two images
    assert list(counted(iter(batches), 6, said.append, every_s=0)) == batches
    assert said == ["  scored 2 of 6 samples", "  scored 4 of 6 samples"]  # not at the end: the scores follow
    said.clear()
    assert len(list(counted(iter(batches), 6, said.append, every_s=3600))) == 3
    assert said == []  # fast: no lines
