"""Evaluation of runs: periodic scores in metrics.jsonl, the eval command and its truncation sweep."""

from __future__ import annotations

import json

import pytest

from pipeline.eval.during_training import evaluator_for
from pipeline.spec import load_spec
from pipeline.train.loop import train


@pytest.fixture(scope="module")
def demo_run(demo_shards_with_classifier, tmp_path_factory):
    """A 2-step demo run evaluated at steps 0 and 2, by the demo classifier beside its shards."""
    shards = demo_shards_with_classifier
    run_dir = tmp_path_factory.mktemp("run")
    loaded = load_spec(
        "demo",
        [
            f"data.shards={shards}",
            f"run.dir={run_dir}",
            "train.batch_size=16",
            "train.max_steps=2",
            "train.log_every=1",
            "train.sample_every=2",
            "train.checkpoint_every=2",
            "eval.every=2",
            "eval.num_samples=40",
            "eval.standing_stats=2",
        ],
    )
    train(loaded, evaluate=evaluator_for(loaded.spec))
    return run_dir, shards


def test_training_logs_scores_with_their_protocol(demo_run):
    run_dir, shards = demo_run
    assert (shards / "classifier.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert r["fid"] > 0 and 1 <= r["is_mean"] <= 10 and 0 <= r["class_accuracy"] <= 1
        p = r["eval_protocol"]
        assert p["num_samples"] == 40 and p["standing_stats_passes"] == 2 and p["ema"] is True
        assert p["truncation"] is None and len(p["feature_net_sha256"]) == 64 and p["resize_filter"]


def test_eval_command_sweeps_truncation(cli, demo_run, tmp_path):
    from pathlib import Path

    run_dir, _ = demo_run
    result = cli(
        "eval", run_dir, "--num", "40", "--truncation", "0.5,none", "--standing-stats", "2", "--out", tmp_path, "--json"
    )
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert [r["protocol"]["truncation"] for r in record["results"]] == [0.5, None]
    assert record["results"][0]["protocol"]["step"] == 2 and record["results"][0]["protocol"]["ema"] is True
    json_file, plot = Path(record["json"]), Path(record["plot"])
    assert json_file.parent == tmp_path and json_file.name.startswith("step-00000002-")
    assert json.loads(json_file.read_text())["results"] == record["results"]
    assert plot.name == f"{json_file.stem}-fid-is.png" and plot.read_bytes()[:4] == b"\x89PNG"
    # the same generator, the same seed: the export scores like the run
    again = cli(
        "eval",
        run_dir / "export",
        "--num",
        "40",
        "--truncation",
        "0.5",
        "--standing-stats",
        "2",
        "--out",
        tmp_path / "export",
        "--json",
    )
    assert again.code == 0, again.err
    assert json.loads(again.out)["results"][0]["fid"] == pytest.approx(record["results"][0]["fid"], rel=1e-5)


def test_eval_errors_are_user_errors(cli, demo_run, tmp_path):
    run_dir, _ = demo_run
    result = cli("eval", run_dir, "--truncation", "0.5,big")
    assert result.code == 2 and "'big'" in result.err and "Traceback" not in result.err
    result = cli("eval", tmp_path / "nothing")
    assert result.code == 2 and "does not exist" in result.err
    result = cli("eval", run_dir, "--features", "inception:/no/such/file.pth")
    assert result.code == 2 and "/no/such/file.pth" in result.err
