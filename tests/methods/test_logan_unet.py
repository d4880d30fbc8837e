"""LOGAN's latent step and U-Net GAN's two heads and CutMix consistency, as options of the gan
method: validation, training, resume, profiling regions and FLOPs. The pure functions have their
own tests (test_latent_opt.py, test_unet_gan.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.errors import SpecError
from pipeline.profile.flops import step_flops
from pipeline.spec import load_spec
from pipeline.train import loop

FAST = [
    "train.batch_size=8",
    "train.log_every=1",
    "train.sample_every=2",
    "train.checkpoint_every=2",
    "eval.every=0",
]
LOSSES = ("loss_d", "loss_g", "d_real", "d_fake")


def run(spec: str, demo_shards, run_dir, *extra, stop_after=None):
    loaded = load_spec(spec, [f"data.shards={demo_shards}", f"run.dir={run_dir}", *FAST, *extra])
    loop.train(loaded, stop_after=stop_after)
    return run_dir


# ----- LOGAN
def test_logan_with_a_zero_step_trains_as_the_plain_method_bitwise(demo_shards, tmp_path, metrics):
    plain = metrics(run("demo", demo_shards, tmp_path / "plain", "train.max_steps=2"))
    zero = metrics(run("demo", demo_shards, tmp_path / "zero", "train.max_steps=2", "method.logan.alpha=0"))
    assert [[r[k] for k in LOSSES] for r in zero] == [[r[k] for k in LOSSES] for r in plain]


def test_logan_trains_resumes_exactly_and_logs_its_penalty(demo_shards, tmp_path, metrics):
    args = ("train.max_steps=3",)
    straight = metrics(run("demo_logan", demo_shards, tmp_path / "straight", *args))
    assert all(r["latent_penalty"] > 0 for r in straight)
    run("demo_logan", demo_shards, tmp_path / "broken", *args, stop_after=2)
    resumed = metrics(run("demo_logan", demo_shards, tmp_path / "broken", *args))
    keys = (*LOSSES, "latent_penalty")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]


def test_logan_has_its_own_profiling_region_counted_in_the_flops(tmp_path):
    loaded = load_spec(
        "demo_logan", ["data.synthetic=true", "data.shards=null", "train.batch_size=4", f"run.dir={tmp_path}"]
    )
    trainer = loop.Trainer(loaded, resume=False)
    trainer.run_step()
    with FlopCounterMode(display=False) as counter:
        trainer.run_step()
    planned = step_flops(loaded, trainer.micro, trainer.accum)
    assert sum(v for k, v in planned.items() if k != "sn") == pytest.approx(counter.get_total_flops(), rel=0.02)
    # the latent step (a G and D forward and the gradient to z) in both phases
    plain = step_flops(load_spec("demo", ["train.batch_size=4"]), trainer.micro, trainer.accum)
    assert planned["latent_opt"] > 0.5 * (plain["G_fwd"] + plain["D_fwd"])


def test_logan_needs_a_generator_with_a_latent(write_spec):
    path = write_spec(
        "base: demo\n"
        "method: {logan: {}}\n"
        "generator:\n"
        "  inputs: {y: labels}\n"
        "  nodes:\n"
        "    shared: {kind: embedding, in: y, embedding_dim: 32, sn: false}\n"
        "    cond: null\n"
        "    fc: {kind: linear, in: shared, out_features: 3072}\n"
        "    h: {kind: reshape, in: fc, shape: [3, 32, 32]}\n"
        "    up_8: null\n    up_16: null\n    attn: null\n    up_32: null\n"
        "    rgb: {kind: tanh, in: h}\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    (issue,) = info.value.issues
    assert issue.path == "method.logan" and "no latent input" in issue.message


# ----- U-Net GAN
def test_unet_d_trains_with_cutmix_and_resumes_the_schedule_exactly(demo_shards, tmp_path, metrics):
    # warm-up over the first 2 of 4 steps (8 real images each): probability 0, 0.5, 1, 1
    args = ("train.max_steps=4", "method.cutmix.warmup_images=16", "method.cutmix.max_probability=1.0")
    straight = run("demo_unet", demo_shards, tmp_path / "straight", *args)
    rows = metrics(straight)
    assert any("loss_cutmix" in r for r in rows) and all(r["loss_d"] > 0 for r in rows)
    assert (straight / "samples" / "step-00000004-d-pixels.png").exists()  # where D sees real and fake
    run("demo_unet", demo_shards, tmp_path / "broken", *args, stop_after=3)
    resumed = metrics(run("demo_unet", demo_shards, tmp_path / "broken", *args))
    keys = (*LOSSES, "loss_cutmix", "consistency")
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in rows]


def test_the_unet_spec_that_crashed_now_trains(tmp_path, metrics):
    # unet_d_128's graph at tiny widths: both heads enter both losses, with R1 on the global logit
    overrides = [
        "data.synthetic=true",
        "data.num_classes=10",
        f"run.dir={tmp_path}",
        "train.batch_size=2",
        "train.max_steps=1",
        "train.log_every=1",
        "eval.every=0",
        "method.r1_gamma=1.0",
        *[f"generator.nodes.{n}.out_channels=16" for n in ("up_8", "up_16", "up_32", "up_64", "up_128")],
        "generator.nodes.fc.out_features=256",
        "generator.nodes.h.shape=[16,4,4]",
        *[f"discriminator.nodes.{n}.out_channels=16" for n in ("enc_64", "enc_32", "enc_16", "enc_8", "enc_4")],
        *[f"discriminator.nodes.{n}.out_channels=16" for n in ("dec_8", "dec_16", "dec_32", "dec_64", "dec_128")],
    ]
    loop.train(load_spec("unet_d_128", overrides))
    (row,) = metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(row[k])) for k in LOSSES)


def test_cutmix_needs_a_per_pixel_output_and_a_loss_with_targets():
    with pytest.raises(SpecError) as info:
        load_spec("demo", ["method.cutmix.warmup_images=0"])
    (issue,) = info.value.issues
    assert issue.path == "method.cutmix" and "per-pixel logits" in issue.message
    with pytest.raises(SpecError) as info:
        load_spec("demo_unet", ["method.loss=wgan_gp"])
    assert "cutmix" in str(info.value) and "wgan_gp" in str(info.value)
