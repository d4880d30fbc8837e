"""`method.augment` (issue 29): DiffAugment and ADA on D's inputs, p's adaptation, resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from pipeline.methods import augment as A
from pipeline.spec import load_spec
from pipeline.train import loop

# a 1x2 RGB image: channel c, pixel j
TINY = torch.tensor([[[[0.0, 0.6]], [[0.3, 0.0]], [[0.6, 0.3]]]])


def _step(step=0, images_seen=0, all_sum=lambda t: t, rank=0, world_size=1):
    return SimpleNamespace(
        step=step, images_seen=images_seen, counting_flops=False, all_sum=all_sum, rank=rank, world_size=world_size
    )


def _options(**kw):
    return TypeAdapter(A.AugmentOptions).validate_python(kw)


# ----- options
def test_options_are_discriminated_on_kind_and_strict():
    assert isinstance(_options(kind="diffaugment"), A.DiffAugment)
    ada = _options(kind="ada", p=0.55, target=None)
    assert isinstance(ada, A.Ada) and ada.p == 0.55 and ada.target is None
    assert _options(kind="diffaugment", policy=" translation , cutout").policy == "translation,cutout"
    for bad in (
        {"kind": "diffaugment", "policy": "colour"},
        {"kind": "diffaugment", "ratio": 0.1},
        {"kind": "ada", "target": None},  # p 0 fixed: nothing to do
        {"kind": "ada", "interval": True},
        {"kind": "mixup"},
    ):
        with pytest.raises(ValidationError):
            _options(**bad)


# ----- DiffAugment
def test_diffaugment_colour_ops_against_hand_computed_values():
    offset, factor = torch.tensor([0.25]), torch.tensor([2.0])
    assert torch.allclose(A.brightness(TINY, offset), TINY + 0.25)
    # each pixel's channel mean is 0.3: (x - 0.3) * 2 + 0.3
    want = torch.tensor([[[[-0.3, 0.9]], [[0.3, -0.3]], [[0.9, 0.3]]]])
    assert torch.allclose(A.saturation(TINY, factor), want, atol=1e-6)
    # the image's mean is 0.3: (x - 0.3) * 0.5 + 0.3
    want = torch.tensor([[[[0.15, 0.45]], [[0.3, 0.15]], [[0.45, 0.3]]]])
    assert torch.allclose(A.contrast(TINY, torch.tensor([0.5])), want, atol=1e-6)


def test_diffaugment_translation_and_cutout_by_hand():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    moved = A.translate(x, torch.tensor([1]), torch.tensor([-1]))  # out[i, j] = x[i + 1, j - 1], zeros outside
    assert moved[0, 0].tolist() == [[0, 4, 5], [0, 7, 8], [0, 0, 0]]
    cut = A.cutout(x, torch.tensor([-1]), torch.tensor([1]), (2, 2))  # rows -1..0, columns 1..2
    assert cut[0, 0].tolist() == [[1, 0, 0], [4, 5, 6], [7, 8, 9]]


def test_diffaugment_at_zero_magnitude_is_the_identity():
    x = torch.randn(4, 3, 8, 8)
    zero = torch.zeros(4, dtype=torch.long)
    assert torch.equal(A.brightness(x, torch.zeros(4)), x)
    assert torch.allclose(A.saturation(x, torch.ones(4)), x, atol=1e-6)
    assert torch.allclose(A.contrast(x, torch.ones(4)), x, atol=1e-6)
    assert torch.equal(A.translate(x, zero, zero), x)
    assert torch.equal(A.cutout(x, zero + 3, zero + 3, (0, 0)), x)
    # the whole pipeline with zero translation and cutout sizes (colour has no magnitude of its own)
    aug = A.Augmenter(_options(kind="diffaugment", translation_ratio=0, cutout_ratio=0), seed=0)
    out = aug(x, _step())
    assert not torch.equal(aug(x, _step()), x)  # colour still applies
    aug = A.Augmenter(
        _options(kind="diffaugment", policy="translation,cutout", translation_ratio=0, cutout_ratio=0), seed=0
    )
    assert torch.equal(aug(x, _step()), x)
    assert out.shape == x.shape


def test_diffaugment_draws_every_op_at_its_sizes():
    aug = A.Augmenter(_options(kind="diffaugment", policy="cutout"), seed=1)
    out = aug(torch.ones(64, 1, 8, 8), _step())
    zeroed = (out == 0).flatten(1).sum(1)
    # a 4x4 square (half the side), clipped at the borders: at most 16 pixels, never none (the centre is inside)
    assert zeroed.max() == 16 and zeroed.min() > 0
    aug = A.Augmenter(_options(kind="diffaugment", policy="translation"), seed=1)
    out = aug(torch.ones(64, 1, 8, 8), _step())
    # shifts of at most 1 pixel (8 / 8) per axis: at most one row and one column of zeros
    assert (out == 0).flatten(1).sum(1).max() == 15


# ----- ADA
def test_ada_colour_matrices_against_hand_computed_values():
    n = 1
    assert torch.allclose(A.recolour(TINY, A._translate3d(torch.tensor([0.1]), n)), TINY + 0.1)
    assert torch.allclose(A.recolour(TINY, A._scale3d(torch.tensor([2.0]), n)), TINY * 2)  # about 0, not the mean
    # the Householder reflection about the luma axis: x - 2 mean(x) (both pixels' means are 0.3)
    flip = torch.eye(4) - 2 * torch.outer(A._LUMA, A._LUMA)
    assert torch.allclose(A.recolour(TINY, flip.expand(1, 4, 4)), TINY - 0.6, atol=1e-6)
    # a hue rotation by 120 degrees about the luma axis cycles the channels: (r, g, b) -> (b, r, g)
    hue = A.recolour(TINY, A._rotate_about_luma(torch.tensor([2 * math.pi / 3]), n))
    assert torch.allclose(hue, TINY[:, [2, 0, 1]], atol=1e-6)
    # saturation s keeps the luma component and scales the rest: DiffAugment's saturation at the same factor
    vv = torch.outer(A._LUMA, A._LUMA)
    saturated = A.recolour(TINY, (vv + (torch.eye(4) - vv) * 2.0).expand(1, 4, 4))
    assert torch.allclose(saturated, A.saturation(TINY, torch.tensor([2.0])), atol=1e-6)


def test_ada_geometric_ops_by_hand():
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(A.warp(x, A._scale2d(torch.tensor(-1.0), 1, 2)), x.flip(-1), atol=1e-5)
    quarter = A.warp(x, A._rotate2d(torch.full((2,), math.pi / 2), 2))
    assert torch.allclose(quarter, torch.rot90(x, 1, (-2, -1)), atol=1e-5) or torch.allclose(
        quarter, torch.rot90(x, -1, (-2, -1)), atol=1e-5
    )
    # one pixel to the right: out[:, j] = x[:, j - 1], the border reflected
    shifted = A.warp(x, A._translate2d(torch.tensor(-1.0), 0, 2))
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-5)
    assert torch.allclose(shifted[..., 0], x[..., 0], atol=1e-5)


def test_ada_at_p_zero_is_the_identity():
    x = torch.randn(4, 3, 8, 8)
    aug = A.Augmenter(_options(kind="ada", p=0.0), seed=0)
    assert torch.equal(aug(x, _step()), x)
    # and the transforms drawn at p 0, applied, are the identity up to rounding
    draws = A._Draws(torch.Generator().manual_seed(0), 4, 0, 1)
    g_inv, c = A.ada_transforms(A.ADA_PIPELINES["bgc"], 0.0, draws, (8, 8), 3)
    assert torch.allclose(g_inv, torch.eye(3).expand(4, 3, 3)) and torch.allclose(c, torch.eye(4).expand(4, 4, 4))
    assert torch.allclose(A.recolour(A.warp(x, g_inv), c), x, atol=1e-5)


def test_ada_applies_each_op_with_probability_p():
    draws = A._Draws(torch.Generator().manual_seed(0), 4000, 0, 1)
    g_inv, _ = A.ada_transforms(("xflip",), 0.5, draws, (8, 8), 3)
    flipped = (g_inv[:, 0, 0] < 0).float().mean()  # applied to half the samples, and then a flip half the time
    assert abs(flipped - 0.25) < 0.03


@pytest.mark.parametrize("options", [{"kind": "diffaugment"}, {"kind": "ada", "p": 0.8, "target": None}])
def test_gradients_flow_through_the_augmentation(options):
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    out = A.Augmenter(_options(**options), seed=0)(x, _step())
    (grad,) = torch.autograd.grad((out.tanh() * torch.randn_like(out)).sum(), x, create_graph=True)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    grad.square().sum().backward()  # R1 differentiates it twice


def test_ops_have_the_gradients_of_their_formulas():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([1, -1])
    assert torch.autograd.gradcheck(lambda v: A.translate(v, shift, shift), (x,))
    factors = torch.tensor([0.5, 1.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: A.saturation(A.contrast(v, factors), 2 * factors), (x,))
    g_inv = A._rotate2d(torch.tensor([0.3, -0.7]), 2)
    assert torch.autograd.gradcheck(lambda v: A.warp(v, g_inv), (x,))


def test_every_rank_draws_its_rows_of_one_global_draw():
    x = torch.randn(4, 3, 8, 8)
    one = A.Augmenter(_options(kind="diffaugment"), seed=5)(torch.cat([x, x]), _step())
    ranks = [A.Augmenter(_options(kind="diffaugment"), seed=5)(x, _step(rank=r, world_size=2)) for r in range(2)]
    assert torch.allclose(torch.cat(ranks), one, atol=1e-6)


def _ada_after(signs_per_step, *, p=0.5, steps=4, batch=32, all_sum=lambda t: t):
    aug = A.Augmenter(_options(kind="ada", p=p, target=0.6, interval=4, kimg=500), seed=0)
    for s in range(steps):
        aug.adapt(_step(step=s, images_seen=s * batch, all_sum=all_sum))
        aug.observe(torch.full((batch, 1), signs_per_step), _step())
    aug.adapt(_step(step=steps, images_seen=steps * batch, all_sum=all_sum))
    return aug.p


def test_p_rises_on_an_overfitting_d_and_falls_otherwise_at_the_papers_speed():
    step = 32 * 4 / (500 * 1000)  # batch x interval / (ada_kimg x 1000), by hand: 0.000256
    assert _ada_after(1.0) == pytest.approx(0.5 + step, abs=1e-12)  # every D(real) positive: 1 > 0.6
    assert _ada_after(-1.0) == pytest.approx(0.5 - step, abs=1e-12)
    assert _ada_after(-1.0, p=0.0001) == 0.0  # never below 0
    assert _ada_after(1.0, steps=3) == 0.5  # no adjustment before the interval's end
    # the statistic is summed over ranks: another rank's 4 x 32 negative signs outweigh these
    other = torch.tensor([-4 * 32 * 1.0, 4 * 32 * 2.0])  # its sum of signs and count (two outputs a sample)
    assert _ada_after(1.0, all_sum=lambda t: t + other) == pytest.approx(0.5 - step, abs=1e-12)


def test_fixed_p_does_not_move():
    aug = A.Augmenter(_options(kind="ada", p=0.55, target=None), seed=0)
    aug.observe(torch.ones(8, 1), _step())
    aug.adapt(_step(step=4, images_seen=128))
    assert aug.p == 0.55


def test_augmenter_state_resumes_exactly():
    aug = A.Augmenter(_options(kind="ada", p=0.3, target=0.6, interval=1, kimg=0.001), seed=0)
    x = torch.randn(4, 3, 8, 8)
    aug.adapt(_step(step=0))
    aug(x, _step())
    aug.observe(torch.ones(4, 1), _step())
    aug.adapt(_step(step=1, images_seen=4))
    aug.observe(torch.tensor([[1.0], [-1.0]]), _step())
    state = aug.state_dict()
    resumed = A.Augmenter(_options(kind="ada", p=0.3, target=0.6, interval=1, kimg=0.001), seed=0)
    resumed.load_state_dict(state)
    assert resumed.p == aug.p != 0.3
    assert torch.equal(resumed(x, _step()), aug(x, _step()))
    for a in (aug, resumed):
        a.adapt(_step(step=2, images_seen=8))
    assert resumed.p == aug.p


# ----- in training
FAST = [
    "train.batch_size=8",
    "train.log_every=1",
    "train.sample_every=100",
    "train.checkpoint_every=2",
    "eval.every=null",
]


def _runs(demo_shards, run_dir, *extra):
    return [f"data.shards={demo_shards}", f"run.dir={run_dir}", *FAST, *extra]


ADAPTING = "method.augment={kind: ada, p: 0.2, target: 0.6, interval: 1, kimg: 0.1}"


@pytest.mark.slow
def test_ada_p_is_logged_and_resumes_exactly(demo_shards, tmp_path, metrics):
    """A run with ADA (p moving every step), R1 and accumulation, stopped after step 3 (checkpoint at 2)
    and resumed, matches an uninterrupted run bitwise, p included."""
    extra = (ADAPTING, "method.r1_gamma=1.0", "train.batch_per_rank=4", "train.max_steps=5")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    loop.train(load_spec("demo", _runs(demo_shards, straight, *extra)))
    loop.train(load_spec("demo", _runs(demo_shards, broken, *extra)), stop_after=3)
    loop.train(load_spec("demo", _runs(demo_shards, broken, *extra)))
    a, b = metrics(straight), metrics(broken)
    ps = [r["augment_p"] for r in a]
    assert ps[0] == 0.2 and len(set(ps)) > 1  # p moved, by 8 images / 100 images per unit each step
    steps = [(p - 0.2) / 0.08 for p in ps]  # whole adjustments, or floored at 0
    assert all(p == 0 or abs(k - round(k)) < 1e-9 for p, k in zip(ps, steps, strict=True)), ps
    for ra, rb in zip(a, b, strict=True):
        assert (ra["loss_d"], ra["loss_g"], ra["d_real"], ra["augment_p"]) == (
            rb["loss_d"],
            rb["loss_g"],
            rb["d_real"],
            rb["augment_p"],
        )


@pytest.mark.parametrize(
    "spec_name, extra",
    [
        ("demo", ["method.augment={kind: diffaugment}", "method.r1_gamma=1.0", "train.batch_per_rank=4"]),
        ("demo", ["method.augment={kind: ada, p: 0.55, target: null}", "method.d_steps=2"]),
        ("progan_demo", ["method.augment={kind: diffaugment, policy: 'color,translation'}"]),
    ],
)
def test_demo_trains_with_augmentation(cli, demo_shards, tmp_path, metrics, spec_name, extra):
    run_dir = tmp_path / "run"
    result = cli("train", f"spec={spec_name}", *_runs(demo_shards, run_dir, "train.max_steps=2", *extra))
    assert result.code == 0, result.err
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss_d"]) and r["grad_norm_g"] > 0 for r in rows)
    assert ("augment_p" in rows[0]) == ("ada" in extra[0])


def test_augmentation_off_draws_nothing_and_changes_nothing():
    spec = load_spec("tiny_biggan").spec
    assert spec.method.augment is None and spec.method.build(spec).augment is None
    assert "augment" not in spec.method.build(spec).state_dict()


def test_flops_are_counted_with_augmentation_on():
    from pipeline.profile.flops import step_flops

    plain = step_flops(load_spec("tiny_biggan", ["compile.enabled=false"]), 2, 1)
    loaded = load_spec("tiny_biggan", ["compile.enabled=false", "method.augment={kind: ada, target: 0.6}"])
    assert step_flops(loaded, 2, 1) == plain  # the augmentation is not counted, and nothing fails on meta
