"""Sampling: truncation, standing statistics, slerp, class interpolation, loading trained weights, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import SpecError
from pipeline.eval.sampling import (
    batch_norms,
    class_interpolation,
    generate,
    load_generator,
    sample_latents,
    scaled_normal,
    slerp,
    standing_stats,
    truncated_normal,
)
from pipeline.graph import build_network
from pipeline.spec import load_spec

TINY = ["generator.init=normal", "discriminator.init=normal"]  # orthogonal init's QR costs seconds on a CPU


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# ----- truncation -----
@pytest.mark.parametrize("threshold", [0.5, torch.tensor(1.0), torch.tensor(0.04)])
def test_truncated_normal_is_the_normal_conditioned_on_the_interval(threshold):
    t = float(threshold)
    z = truncated_normal((400_000,), threshold, generator=seeded())
    assert z.abs().max() <= t
    inside = 2 * normal_cdf(t) - 1
    # clipping would put the mass beyond the threshold (62% of it at 0.5) onto +-t
    edges = np.linspace(-t, t, 21)
    counts, _ = np.histogram(z.numpy(), bins=edges)
    expected = np.array([normal_cdf(b) - normal_cdf(a) for a, b in itertools.pairwise(edges)]) / inside
    np.testing.assert_allclose(counts / len(z), expected, atol=0.003)
    assert (z.abs() >= t * (1 - 1e-6)).float().mean() < 1e-4  # no pile-up at the threshold
    density = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    variance = 1 - 2 * t * density / inside  # of the normal truncated to [-t, t]
    assert z.std().item() == pytest.approx(math.sqrt(variance), rel=0.01)


def test_truncated_normal_takes_float_or_tensor_threshold_alike_and_none_is_the_normal():
    as_float = truncated_normal((64, 32), 0.7, generator=seeded(3))
    as_tensor = truncated_normal((64, 32), torch.tensor(0.7), generator=seeded(3))
    assert torch.equal(as_float, as_tensor)
    assert torch.equal(truncated_normal((64, 32), None, generator=seeded(3)), torch.randn(64, 32, generator=seeded(3)))
    with pytest.raises(ValueError):
        truncated_normal((4,), 0.0)


def test_scaled_normal_scales_the_standard_deviation_without_bounding_values():
    z = scaled_normal((400_000,), 0.3, generator=seeded())
    assert z.std().item() == pytest.approx(0.3, rel=0.01)
    assert z.abs().max() > 3 * 0.3
    assert torch.equal(
        sample_latents(8, 4, 0.3, mode="scale", generator=seeded(1)), 0.3 * torch.randn(8, 4, generator=seeded(1))
    )
    truncated = sample_latents(1000, 16, 0.3, mode="truncate", generator=seeded(1))
    assert truncated.shape == (1000, 16) and truncated.abs().max() <= 0.3


# ----- slerp -----
def test_slerp_follows_the_great_circle_of_unit_vectors():
    gen = seeded(5)
    a, b = torch.nn.functional.normalize(torch.randn(2, 128, dtype=torch.float64, generator=gen), dim=-1)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    path = slerp(a, b, t)
    assert path.shape == (11, 128)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(11, dtype=torch.float64))
    angle = torch.arccos(a @ b)
    torch.testing.assert_close(torch.arccos((path @ a).clamp(-1, 1)), t * angle)  # constant angular speed
    # the path stays in the plane of a and b
    basis = torch.linalg.qr(torch.stack([a, b], 1)).Q
    torch.testing.assert_close(path - path @ basis @ basis.T, torch.zeros_like(path))


def test_slerp_of_nearly_parallel_and_opposite_vectors_is_finite():
    a = torch.nn.functional.normalize(torch.randn(64, generator=seeded(2)), dim=0)
    b = torch.nn.functional.normalize(a + 1e-6 * torch.randn(64, generator=seeded(3)), dim=0)
    t = torch.linspace(0, 1, 5)
    near = slerp(a, b, t)
    torch.testing.assert_close(near.norm(dim=-1), torch.ones(5))
    assert torch.equal(near[0], a) and torch.equal(near[-1], b)
    assert torch.equal(slerp(a, a, t)[2], a)
    assert torch.isfinite(slerp(a, -a, t)).all()
    rows = slerp(a.expand(3, 1, 64), b.expand(3, 1, 64), t)  # batch of rows against steps
    assert rows.shape == (3, 5, 64) and torch.equal(rows[1], near)


# ----- standing statistics and class interpolation on a tiny generator -----
@pytest.fixture(scope="module")
def tiny_g():
    torch.manual_seed(0)
    return build_network(load_spec("tiny_biggan", TINY), "generator")


def test_standing_stats_are_the_average_batch_statistics_over_the_passes(tiny_g):
    norms = batch_norms(tiny_g)
    assert len(norms) == 7 and all(m.cross_replica for m in norms)  # 3 blocks x 2 CBN + the output BN
    first = tiny_g["up_8"].bn1.bn.bn
    for m in norms:  # stale statistics, as an EMA copy of G carries them
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
        m.num_batches_tracked.fill_(1000)
    seen_inputs, seen_z = [], []
    hooks = [
        first.register_forward_pre_hook(lambda m, args: seen_inputs.append(args[0].detach().clone())),
        tiny_g.register_forward_pre_hook(lambda m, args: seen_z.append(args[0].clone())),
    ]
    u_before = {k: v.clone() for k, v in tiny_g.state_dict().items() if k.endswith(("_u", "_v"))}
    params_before = [p.detach().clone() for p in tiny_g.parameters()]
    try:
        standing_stats(
            tiny_g, num_passes=3, batch_size=6, z_dim=120, num_classes=10, truncation=0.5, generator=seeded(1)
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen_inputs) == 3 and max(z.abs().max() for z in seen_z) <= 0.5
    batch_means = torch.stack([x.mean((0, 2, 3)) for x in seen_inputs])
    batch_vars = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen_inputs])
    torch.testing.assert_close(first.running_mean, batch_means.mean(0))
    torch.testing.assert_close(first.running_var, batch_vars.mean(0))
    assert all(m.num_batches_tracked.item() == 3 and m.momentum == 0.1 and m.cross_replica for m in norms)
    assert all(not (m.running_mean == 5.0).any() for m in norms)
    assert not any(m.training for m in tiny_g.modules())
    # only BatchNorm statistics change: not the weights, not spectral norm's vectors
    after = tiny_g.state_dict()
    assert all(torch.equal(after[k], v) for k, v in u_before.items())
    assert all(torch.equal(p, q) for p, q in zip(tiny_g.parameters(), params_before, strict=True))


def test_class_interpolation_goes_from_one_class_to_the_next_in_the_embedding(tiny_g):
    tiny_g.eval()
    strip = class_interpolation(tiny_g, [1, 4, 6], num_rows=2, num_steps=3, z_dim=120, generator=seeded(7))
    assert strip.shape == (2, 5, 3, 32, 32)  # 1 -> 4 in 3 steps, 4 -> 6 in 2 more
    z = sample_latents(2, 120, None, generator=seeded(7))
    for column, label in ((0, 1), (2, 4), (4, 6)):
        # batches of other sizes take other CPU kernels: equal up to float32 summation order
        torch.testing.assert_close(
            strip[:, column], generate(tiny_g, z, torch.tensor([label, label])), atol=1e-4, rtol=1e-3
        )
    halfway = strip[:, 1]
    assert (halfway - strip[:, 0]).abs().max() > 1e-3 and (halfway - strip[:, 2]).abs().max() > 1e-3
    assert not tiny_g["shared"]._forward_hooks  # the mixing hook is gone


# ----- trained weights: a run directory, its checkpoints and its export -----
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One step of tiny_biggan; an EMA with decay 0.5 from the start differs from G."""
    from pipeline.train.loop import train

    run_dir = tmp_path_factory.mktemp("sampling") / "run"
    train(
        load_spec(
            "tiny_biggan",
            [
                *TINY,
                "data.synthetic=true",
                f"run.dir={run_dir}",
                "train.batch_size=4",
                "train.max_steps=1",
                "train.ema.decay=0.5",
                "train.ema.start_images=0",
                "train.log_every=1",
                "train.sample_every=1",
                "train.checkpoint_every=1",
            ],
        )
    )
    return run_dir


def test_sampling_the_export_equals_sampling_the_runs_ema(tiny_run):
    from_run, from_export = load_generator(tiny_run), load_generator(tiny_run / "export")
    assert (from_run.ema, from_run.step, from_export.ema, from_export.step) == (True, 1, True, 1)
    assert from_run.weights.name == "ema-generator.safetensors" and "EMA of generator at step 1" in from_run.source
    images = []
    for gen in (from_run, from_export):
        standing_stats(
            gen.module,
            num_passes=2,
            batch_size=4,
            z_dim=gen.z_dim,
            num_classes=gen.num_classes,
            truncation=1.0,
            generator=seeded(1),
        )
        z = sample_latents(6, gen.z_dim, 1.0, generator=seeded(2))
        images.append(generate(gen.module, z, torch.arange(6)))
    assert torch.equal(images[0], images[1])
    # the EMA, not G: G's own weights sit in the DeepSpeed checkpoint and differ
    g_weights = torch.load(tiny_run / "checkpoints/step-00000001/G/ckpt/mp_rank_00_model_states.pt", weights_only=True)[
        "module"
    ]
    assert not torch.equal(g_weights["fc.bias"], from_run.module.state_dict()["fc.bias"])


def test_a_run_without_ema_samples_g(tiny_run, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    shutil.copytree(tiny_run / "checkpoints" / "step-00000001", ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    state["spec"]["train"]["ema"] = None
    (ckpt / "state.json").write_text(json.dumps(state))
    (ckpt / "ema-generator.safetensors").unlink()
    gen = load_generator(tmp_path / "run")
    assert not gen.ema and gen.step == 1 and "no EMA" in gen.source
    g_weights = torch.load(ckpt / "G/ckpt/mp_rank_00_model_states.pt", weights_only=True)["module"]
    loaded = gen.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in g_weights.items())


def test_bad_sources_are_user_errors(tiny_run, tmp_path):
    with pytest.raises(SpecError, match="is not a .safetensors file"):
        load_generator(tiny_run / "metrics.jsonl")
    (tmp_path / "generator.safetensors").write_bytes((tiny_run / "export/generator.safetensors").read_bytes())
    with pytest.raises(SpecError, match="spec.yaml is missing"):
        load_generator(tmp_path / "generator.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="holds no finished checkpoint"):
        load_generator(tmp_path / "empty")


# ----- the command line -----
def test_cli_sample_writes_grid_images_interpolation_and_protocol(cli, tiny_run, tmp_path):
    out = tmp_path / "samples"
    result = cli(
        "sample",
        tiny_run,
        "--out",
        out,
        "--classes",
        "0,3",
        "--num",
        "2",
        "--truncation",
        "0.8",
        "--standing-stats",
        "2",
        "--batch-size",
        "4",
        "--seed",
        "5",
        "--interpolate",
        "latent",
        "--steps",
        "3",
        "--gif",
    )
    assert result.code == 0, result.err
    grid = np.asarray(Image.open(out / "grid.png"))
    # rows = classes, columns = samples, 2 white pixels apart, each row labelled in a margin on the left
    margin = grid.shape[1] - (2 * 32 + 2)
    assert grid.shape[0] == 2 * 32 + 2 and margin > 0
    assert (grid[32:34, margin:] == 255).all() and (grid[:, margin + 32 : margin + 34] == 255).all()
    assert (grid[:, :margin] < 128).any()  # the labels' text
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["class0-000.png", "class0-001.png", "class3-000.png", "class3-001.png"]
    class3 = np.asarray(Image.open(out / "images" / "class3-000.png"))
    np.testing.assert_array_equal(grid[34:, margin : margin + 32], class3)
    assert np.asarray(Image.open(out / "interpolation-latent.png")).shape == (2 * 32 + 2, 3 * 32 + 4, 3)
    assert Image.open(out / "interpolation-latent.gif").n_frames == 4  # 3 steps forwards, 1 back
    record = json.loads((out / "samples.json").read_text())
    assert record["ema"] is True and record["step"] == 1 and record["seed"] == 5
    assert record["truncation"] == {"value": 0.8, "mode": "truncate"}
    assert record["standing_stats"]["num_passes"] == 2 and record["classes"] == [0, 3]


def test_cli_sample_of_a_missing_run_is_a_clear_error(cli, tmp_path):
    result = cli("sample", tmp_path / "nope")
    assert result.code == 2
    assert f"{tmp_path / 'nope'} does not exist" in result.err and "Traceback" not in result.err
    result = cli("sample", tmp_path, "--classes", "a,b")
    assert result.code == 2 and "--classes 'a,b' is not a list of class numbers" in result.err


def test_grids_have_gaps_and_a_gif_has_no_empty_tile(tmp_path):
    from PIL import Image

    from pipeline.images import GAP, save_gif, tile

    images = torch.rand(2, 3, 3, 4, 5) * 2 - 1
    grid = tile(images, gap=GAP)
    assert grid.shape == (3, 2 * 4 + GAP, 3 * 5 + 2 * GAP)
    assert torch.equal(grid[:, 4 + GAP :, 2 * (5 + GAP) :], images[1, 2])
    assert (grid[:, 4 : 4 + GAP] == 1).all()  # white between rows
    # 10 rows of an interpolation: 2 rows of 5 tiles, none of them blank
    save_gif(torch.zeros(10, 2, 3, 4, 4) - 1, tmp_path / "a.gif")
    frame = Image.open(tmp_path / "a.gif")
    assert frame.size == (5 * 4 + 4 * GAP, 2 * 4 + GAP)
