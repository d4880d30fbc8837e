"""One default batch for the standing statistics, whichever command samples."""

from __future__ import annotations

import inspect

from pipeline.cli import build_parser
from pipeline.eval.evaluate import evaluate, evaluate_module
from pipeline.eval.protocol import STANDING_STATS_BATCH
from pipeline.eval.sampling import write_samples


def test_sample_eval_and_training_scores_default_to_one_standing_statistics_batch():
    assert STANDING_STATS_BATCH == 64  # BigGAN-PyTorch's sample.py: max(G_batch_size 0, batch_size 64)
    parser = build_parser()
    defaults = {command: parser.parse_args([command, "runs/x"]).batch_size for command in ("sample", "eval")} | {
        f.__name__: inspect.signature(f).parameters["batch_size"].default
        for f in (write_samples, evaluate, evaluate_module)  # evaluate_module: training's scores
    }
    assert set(defaults.values()) == {STANDING_STATS_BATCH}, defaults
