"""What only a GPU can show: a bf16 training step, the DALI pipeline decoding on the GPU, and a
compiled step. Skipped without CUDA, so `just test` on a GPU machine runs them; CI has none."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.dali import DaliLoader
from pipeline.data.shard_files import find_shards
from pipeline.spec import load_spec
from pipeline.train import loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHORT = ["train.batch_size=16", "train.log_every=1", "train.checkpoint_every=2", "eval.every=0"]


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_bf16_step_on_the_gpu_trains_with_finite_losses(demo_shards, tmp_path):
    args = [f"data.shards={demo_shards}", f"run.dir={tmp_path}", "train.precision=bf16", "train.max_steps=3", *SHORT]
    summary = loop.train(load_spec("demo", args), device="cuda")
    assert summary.step == 3
    lines = logged(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    losses = [value for line in lines for key, value in line.items() if key.startswith("loss_")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_dali_decodes_on_the_gpu_what_it_decodes_on_the_cpu(demo_shards):
    shards = find_shards(demo_shards)
    batches = {}
    for device in ("cpu", "cuda"):
        loader = DaliLoader(shards, 32, 32, 10, crop="center", device=device, shuffle=False, num_threads=1)
        images, labels = next(loader)
        assert images.device.type == device and labels is not None and labels.device.type == device
        batches[device] = (images.cpu(), labels.cpu())
    (cpu_images, cpu_labels), (gpu_images, gpu_labels) = batches["cpu"], batches["cuda"]
    assert torch.equal(cpu_labels, gpu_labels)  # the same samples, in stored order
    assert gpu_images.shape == (32, 3, 32, 32) and gpu_images.min() >= -1 and gpu_images.max() <= 1
    # nvJPEG and libjpeg-turbo may round a pixel differently; the images are the same
    assert (gpu_images - cpu_images).abs().mean() < 0.02


def test_a_compiled_step_on_the_gpu_matches_the_eager_one(demo_shards, tmp_path):
    losses = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compiled-{compiled}"
        args = [f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=2", *SHORT]
        args.append(f"compile={str(compiled).lower()}")
        loop.train(load_spec("demo", args), device="cuda")
        losses[compiled] = [line["loss_d"] for line in logged(run_dir)]
    # the same data and initial weights: the first step's loss agrees to float32 kernel differences
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-3, abs=1e-4)
