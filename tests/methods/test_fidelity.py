"""Each method's step against its authors' code, without that code: values derived by hand from the
authors' formulas on tiny fixed tensors, run through the method's own objectives. Each test names
the file and function it follows; docs/fidelity.md lists what else was compared and how."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from pipeline.blocks import REGISTRY
from pipeline.blocks.layers import BuildContext
from pipeline.graph import analyze_spec
from pipeline.methods.unet_gan import cutmix_mask
from pipeline.spec.load import load_spec


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def step_inputs(nets, real, y_real, z, y_drawn, step=0):
    """A stand-in for the loop's StepInputs: one fixed real batch and fixed latents."""
    return SimpleNamespace(
        nets=nets,
        micro=real.shape[0],
        step=step,
        images_seen=10**9,
        counting_flops=False,
        next=lambda stream: (real, y_real),
        latents=lambda n: (z, y_drawn),
        mixed=contextlib.nullcontext,
    )


class CountingUnetD(torch.nn.Module):
    """A U-Net-shaped D with no weights: enc = the image's mean, dec = its first channel plus that
    mean (so the decoder looks beyond each pixel and the consistency term is not zero)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        mean = x.mean(dim=(1, 2, 3))
        return mean[:, None], x[:, :1] + mean[:, None, None, None]


def label_generator(z, y):
    """Images of value y - 1 everywhere: the fakes tell which labels G was given."""
    return (y.to(z.dtype) - 1.0)[:, None, None, None].expand(-1, 3, 2, 2)


# ----- U-Net GAN: boschresearch/unetgan at 37adcf0
def unet_run(*overrides):
    spec = load_spec("demo_unet", ["method.loss=non_saturating", *overrides], check_graphs=False).spec
    return spec.method.build(spec)


def test_a_cutmix_round_is_one_forward_of_real_fake_and_mix_with_only_the_cutmix_terms():
    # train_fns.py:GAN_training_function with --full_batch_mixup --consistency_loss_and_augmentation:
    # on a mixed round skip_normal_real_fake_loss drops the plain terms, so D_loss = mean(BCE(D_mixed,
    # target_map) per sample + BCE(D_middle_mixed, 0)) + mse(D_mixed, D_real M + D_fake (1 - M)).
    # BigGAN.py:G_D.forward: gy = dy (the fakes take the real labels), one D call over the three.
    run = unet_run()
    real, y_real = torch.full((1, 3, 2, 2), 2.0), torch.tensor([1])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # real at the top left
    run.cutmix_step, run.cutmix_mask = 0, mask  # this step is a CutMix round with this mask
    D = CountingUnetD()
    nets = {"generator": label_generator, "discriminator": D}
    losses, logs = run.d_objective(step_inputs(nets, real, y_real, torch.zeros(1, 4), torch.tensor([3])))
    # the fake is y_real - 1 = 0 everywhere (with the drawn label 3 it would be 2);
    # mixed = [[2, 0], [0, 0]]: enc 0.5, dec mixed + 0.5; dec real = 2 + 2, dec fake = 0
    decoder = (softplus(-2.5) + 3 * softplus(0.5)) / 4  # BCE against M: logit 2.5 real, three 0.5 fake
    encoder = softplus(0.5)  # the mix called fake
    consistency = ((2.5 - 4.0) ** 2 + 3 * 0.5**2) / 4  # dec(mix) - mix(dec real, dec fake)
    assert D.calls == 1
    assert math.isclose(losses["D"].item(), decoder + encoder + consistency, rel_tol=1e-6)
    assert math.isclose(logs["consistency"].item(), consistency, rel_tol=1e-6)


def test_the_celeba_script_adds_the_cutmix_terms_to_the_plain_losses():
    # train_celeba.sh: --unet_mixup --consistency_loss_and_augmentation without --full_batch_mixup:
    # every D step is mixed and D_loss = 0.5 (real terms) + 0.5 (fake terms) + mix_loss + consistency
    run = unet_run("method.cutmix.full_batch=false")
    real, y_real = torch.full((1, 3, 2, 2), 2.0), torch.tensor([1])
    D = CountingUnetD()
    nets = {"generator": label_generator, "discriminator": D}
    step = step_inputs(nets, real, y_real, torch.zeros(1, 4), torch.tensor([3]))
    mask = run._cutmix_round(step, real)
    assert mask is not None  # no coin: every step mixes
    losses, _ = run.d_objective(step)
    # plain: real enc 2 and dec 4 (target 1); fake (labels y_real) enc 0 and dec 0 (target 0)
    plain = 0.5 * (softplus(-2.0) + softplus(0.0)) + 0.5 * (softplus(-4.0) + softplus(0.0))
    mixed = mask * 2.0
    mean = mixed.mean().item()
    dec = mixed[0, 0] + mean
    decoder = (mask[0, 0] * F.softplus(-dec) + (1 - mask[0, 0]) * F.softplus(dec)).mean().item()
    consistency = ((dec - mask[0, 0] * 4.0) ** 2).mean().item()
    assert math.isclose(losses["D"].item(), plain + decoder + softplus(mean) + consistency, rel_tol=1e-6)


def test_one_cutmix_coin_and_one_set_of_masks_per_step():
    # train.py draws target_map and train_fns.py draws use_mixup_in_this_round once per iteration,
    # for every D step and accumulation of it
    run = unet_run("method.cutmix.warmup_images=0", "method.cutmix.max_probability=1.0")
    real = torch.zeros(2, 3, 8, 8)
    first = run._cutmix_round(SimpleNamespace(step=5, counting_flops=False, images_seen=0, micro=2), real)
    state = run.cutmix_rng.get_state()
    again = run._cutmix_round(SimpleNamespace(step=5, counting_flops=False, images_seen=64, micro=2), real)
    assert torch.equal(first, again) and torch.equal(run.cutmix_rng.get_state(), state)  # nothing drawn
    run._cutmix_round(SimpleNamespace(step=6, counting_flops=False, images_seen=128, micro=2), real)
    assert not torch.equal(run.cutmix_rng.get_state(), state)
    run.load_state_dict(run.state_dict())  # a resumed run draws the next step's round anew
    assert run.cutmix_step is None


def test_clipped_boxes_follow_the_authors_cutmix():
    # mixup.py:CutMix and random_boundingbox: lam ~ Beta(1, 1); w = int(size sqrt(1 - lam)); a centre
    # drawn with randint(size); the box [c - w // 2, c + w // 2) clipped to the image is fake
    # (map = 0 there); the whole map inverted when rand > 0.5
    n, size = 64, 8
    mask, ratio = cutmix_mask(n, size, size, generator=torch.Generator().manual_seed(7))
    draws = torch.rand(n, 4, generator=torch.Generator().manual_seed(7))
    for k in range(n):
        lam, u_row, u_col, coin = draws[k].tolist()
        w = int(size * math.sqrt(1.0 - lam))
        row, col = int(u_row * size), int(u_col * size)
        expected = torch.ones(size, size)
        expected[max(row - w // 2, 0) : min(row + w // 2, size), max(col - w // 2, 0) : min(col + w // 2, size)] = 0
        if coin > 0.5:
            expected = 1 - expected
        assert torch.equal(mask[k, 0], expected), k
        assert math.isclose(ratio[k].item(), 1 - lam if coin > 0.5 else lam, rel_tol=1e-6)


def test_a_clipped_box_worked_by_hand():
    # lam 0.75 -> w = int(8 sqrt(0.25)) = 4, w // 2 = 2; centre (row 1, col 6) -> the fake box is rows
    # [max(1 - 2, 0), 1 + 2) = [0, 3) and cols [4, min(8, 8)) = [4, 8): 12 pixels; coin 0.2: not inverted
    draws = torch.tensor([[0.75, 1.5 / 8, 6.5 / 8, 0.2]])
    with mock.patch("torch.rand", return_value=draws):
        mask, ratio = cutmix_mask(1, 8, 8)
    expected = torch.ones(8, 8)
    expected[0:3, 4:8] = 0
    assert torch.equal(mask[0, 0], expected) and mask.sum() == 64 - 12 and math.isclose(ratio.item(), 0.75)


def test_pixel_head_is_the_authors_last_layer():
    # BigGAN.py:Unet_Discriminator: last_layer = nn.Conv2d(ch, 1, kernel_size=1) (no spectral norm),
    # out = last_layer(h) + sum(embed(y) * h) with the SN embedding, h the decoder's raw output
    node = REGISTRY["pixel_head"].model_validate({"kind": "pixel_head", "in": "h", "y": "y"})
    ctx = BuildContext(num_classes=3, image_channels=3, sn=True, meta=False)
    head = node.build({"in": (2, 2, 2), "y": ()}, ctx.for_node(node))
    assert not parametrize.is_parametrized(head.conv) and parametrize.is_parametrized(head.embed)
    with torch.no_grad():
        head.conv.weight.copy_(torch.tensor([1.0, -2.0]).view(1, 2, 1, 1))
        head.conv.bias.fill_(0.5)
    h = torch.tensor([[[[-1.0, 2.0], [0.0, 3.0]], [[1.0, -1.0], [0.5, 0.0]]]])
    y = torch.tensor([2])
    e = head.embed(y)[0]
    expected = 1.0 * h[0, 0] - 2.0 * h[0, 1] + 0.5 + e[0] * h[0, 0] + e[1] * h[0, 1]  # negatives kept: no ReLU
    assert torch.allclose(head(h, y)[0, 0], expected, atol=1e-6)


# ----- CycleGAN / CSGAN: junyanz/pytorch-CycleGAN-and-pix2pix, KishanKancharagunta/CSGAN
def cycle_run(*overrides):
    spec = load_spec("csgan_demo", list(overrides), check_graphs=False).spec
    return spec.method.build(spec)


def cycle_nets():
    # G_AB halves, G_BA doubles; each D scores an image by its mean
    judge = lambda x: x.mean(dim=(1, 2, 3))[:, None]  # noqa: E731
    return {"G_AB": lambda x: 0.5 * x, "G_BA": lambda x: 2.0 * x, "D_A": judge, "D_B": judge}


def cycle_step(nets, a, b):
    streams = {"a": (a, None), "b": (b, None)}
    return SimpleNamespace(nets=nets, micro=a.shape[0], next=streams.get, mixed=contextlib.nullcontext)


def test_cyclegan_generator_adversarial_term_is_the_plain_mse():
    # models/cycle_gan_model.py:backward_G: loss_G_A = criterionGAN(netD_A(fake_B), True), with
    # models/networks.py:GANLoss('lsgan') = nn.MSELoss() against 1, no 1/2
    run = cycle_run("method.lambda_cycle=0", "method.lambda_cs=0")
    a, b = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 0.25)
    losses, _ = run.g_objective(cycle_step(cycle_nets(), a, b))
    # D_B(G_AB(a)) = 0.5, D_A(G_BA(b)) = 0.5: (0.5 - 1)^2 + (0.5 - 1)^2
    assert math.isclose(losses["G"].item(), 0.5, rel_tol=1e-6)


def test_cyclegan_discriminators_halve_the_sum_of_their_terms():
    # models/cycle_gan_model.py:backward_D_basic: (MSE(D(real), 1) + MSE(D(fake), 0)) * 0.5
    run = cycle_run("method.history=0")
    a, b = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 0.25)
    nets = cycle_nets()
    run.g_objective(cycle_step(nets, a, b))
    losses, _ = run.d_objective(cycle_step(nets, a, b))
    # D_A: real a = 1, fake G_BA(b) = 0.5; D_B: real b = 0.25, fake G_AB(a) = 0.5
    assert math.isclose(losses["D_A"].item(), 0.5 * ((1 - 1) ** 2 + 0.5**2), rel_tol=1e-6)
    assert math.isclose(losses["D_B"].item(), 0.5 * ((0.25 - 1) ** 2 + 0.5**2), rel_tol=1e-6)


@pytest.mark.parametrize("loss", ["non_saturating", "wgan_gp"])
def test_cyclegan_other_criteria(loss):
    # GANLoss('vanilla') = BCEWithLogits, ('wgangp') = -mean for real, +mean for fake (no drift)
    run = cycle_run(f"method.loss={loss}", "method.history=0")
    a, b = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 0.25)
    nets = cycle_nets()
    run.g_objective(cycle_step(nets, a, b))
    losses, _ = run.d_objective(cycle_step(nets, a, b))
    # D_B: real b = 0.25, fake G_AB(a) = 0.5
    expected = 0.5 * (softplus(-0.25) + softplus(0.5)) if loss == "non_saturating" else 0.5 * (-0.25 + 0.5)
    assert math.isclose(losses["D_B"].item(), expected, rel_tol=1e-6)


def test_csgan_generator_step_by_hand():
    # KishanKancharagunta/CSGAN csgan.py:backward_G: lambda_A |rec_A - real_A| + lambda_B |rec_B - real_B|
    # + CS weight (|fake_A - rec_A.detach()| + |fake_B - rec_B.detach()|) + the adversarial MSEs
    run = cycle_run("method.lambda_cycle=10", "method.lambda_cs=30")  # the authors' weights
    a, b = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 0.25)
    losses, logs = run.g_objective(cycle_step(cycle_nets(), a, b))
    # fake_b = 0.5, fake_a = 0.5; rec_a = G_BA(0.5) = 1.0, rec_b = G_AB(0.5) = 0.25
    cycle = abs(1.0 - 1.0) + abs(0.25 - 0.25)
    synthesized = abs(0.5 - 1.0) + abs(0.5 - 0.25)
    adversarial = (0.5 - 1) ** 2 + (0.5 - 1) ** 2
    assert math.isclose(logs["loss_cs"].item(), synthesized, rel_tol=1e-6)
    assert math.isclose(losses["G"].item(), adversarial + 10 * cycle + 30 * synthesized, rel_tol=1e-6)


# ----- SAGAN: brain-research/self-attention-gan at ad9612e
def test_class_bn_is_sagans_per_class_gain_and_bias():
    # ops.py:ConditionalBatchNorm: BN without affine, then * gamma[y] + beta[y], gamma initialised
    # to 1 and beta to 0, no spectral norm
    node = REGISTRY["biggan_up"].model_validate(
        {"kind": "biggan_up", "in": "h", "cond": "y", "norm": "class_bn", "out_channels": 2}
    )
    ctx = BuildContext(num_classes=3, image_channels=3, sn=True, meta=False)
    block = node.build({"in": (2, 2, 2), "cond": ()}, ctx.for_node(node))
    norm = block.bn1.bn
    assert not parametrize.is_parametrized(norm.gain) and not parametrize.is_parametrized(norm.bias)
    assert torch.equal(norm.gain.weight, torch.zeros(3, 2)) and torch.equal(norm.bias.weight, torch.zeros(3, 2))
    with torch.no_grad():
        norm.gain.weight[1] = torch.tensor([1.0, -0.5])  # gamma[1] = (2, 0.5)
        norm.bias.weight[1] = torch.tensor([0.25, 3.0])
    x = torch.tensor([[[[1.0]], [[4.0]]], [[[3.0]], [[0.0]]]])  # 2 samples, 2 channels, 1x1
    # batch statistics per channel: means (2, 2), biased variances (1, 4): normalised +-1 (eps 1e-5)
    out = norm(x, torch.tensor([1, 1]))
    s0, s1 = 1 / math.sqrt(1 + 1e-5), 2 / math.sqrt(4 + 1e-5)
    expected = torch.tensor([[-2 * s0 + 0.25, 0.5 * s1 + 3.0], [2 * s0 + 0.25, -0.5 * s1 + 3.0]])
    assert torch.allclose(out.view(2, 2), expected, atol=1e-6)


def test_xavier_init_zeroes_biases_as_sagans_code():
    # ops.py: every conv and linear bias starts at 0 (tf.zeros_initializer)
    ctx = BuildContext(num_classes=3, image_channels=3, init="xavier", meta=False)
    assert torch.equal(ctx.conv(4, 8, 3).bias, torch.zeros(8))
    assert torch.equal(ctx.linear(4, 8).bias, torch.zeros(8))


@pytest.mark.parametrize(
    ("name", "g_params", "d_params"),
    [
        # SAGAN's generator_test / discriminator_test counted from the code's layer shapes
        ("sagan_128", 42_078_852, 39_463_618),
        # unetgan's Unet_Discriminator(D_ch=64, D_attn='0', 1000 classes): 32,569,667 parameters, of
        # which its `linear` (64 -> 1, 65 parameters) is never called in forward
        ("unet_d_128", None, 32_569_602),
    ],
)
def test_parameter_counts_equal_the_authors(name, g_params, d_params):
    plans = analyze_spec(load_spec(name, check_graphs=False))
    if g_params is not None:
        assert plans["generator"].params == g_params
    assert plans["discriminator"].params == d_params


@pytest.mark.integration
def test_cyclegan_learning_rate_decays_linearly_to_zero(tmp_path):
    # models/networks.py:get_scheduler('linear'): constant for n_epochs, then linearly to 0 over
    # n_epochs_decay; counted here in the run's real images (an a and a b image per pair)
    from pipeline.methods.cycle import LrDecay
    from pipeline.train import loop

    decay = LrDecay(constant_images=100, decay_images=200)
    assert [decay.factor(n) for n in (0, 100, 200, 300, 400)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    synthetic = ["data.streams.a.shards=null", "data.streams.b.shards=null"]
    synthetic += ["data.streams.a.synthetic=true", "data.streams.b.synthetic=true"]
    loaded = load_spec(
        "csgan_demo",
        [
            *synthetic,
            "train.batch_size=2",
            f"run.dir={tmp_path}",
            "method.lr_decay={constant_images: 4, decay_images: 8}",
        ],
    )
    trainer = loop.Trainer(loaded, resume=False)
    rates = []
    for _ in range(4):  # each step reads 2 a and 2 b images: steps start at 0, 4, 8, 12 images
        trainer.run_step()
        rates.append((trainer.lrs["lr_g"], trainer.lrs["lr_d_a"], trainer.lrs["lr_d_b"]))
    assert [r[0] / 2e-4 for r in rates] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert all(r[0] == r[1] == r[2] for r in rates)


def test_the_logged_generator_loss_includes_the_identity_term():
    # csgan.py:backward_G: loss_G adds loss_idt_A + loss_idt_B (lambda_identity x lambda x |G(x) - x|)
    run = cycle_run("method.lambda_cycle=10", "method.lambda_cs=0", "method.lambda_identity=0.5")
    a, b = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 0.25)
    losses, logs = run.g_objective(cycle_step(cycle_nets(), a, b))
    # identity: |G_BA(a) - a| = |2 - 1| = 1, |G_AB(b) - b| = |0.125 - 0.25| = 0.125; weight 0.5 x 10
    adversarial, identity = (0.5 - 1) ** 2 + (0.5 - 1) ** 2, 1.125
    assert math.isclose(losses["G"].item(), adversarial + 5 * identity, rel_tol=1e-6)
    assert logs["loss_g"].item() == losses["G"].item()


# ----- ProGAN: tkarras/progressive_growing_of_gans at 2504c3f
def test_progan_d_block_pools_before_its_second_activation():
    # networks.py:D_paper with fused_scale=True (the default): act(apply_bias(conv2d_downscale2d(x))),
    # the fused conv equal to a 3x3 conv then a 2x2 average pool. One channel whose second conv gives
    # [[-1, 1], [1, 1]]: lrelu(mean) = lrelu(0.5) = 0.5; pooling after the activation would give
    # (-0.2 + 3) / 4 = 0.7 (fused_scale=False, act_after_pool: false)
    for act_after_pool, expected in ((True, 0.5), (False, 0.7)):
        node = REGISTRY["progan_down"].model_validate(
            {"kind": "progan_down", "in": "x", "out_channels": 1, "act_after_pool": act_after_pool}
        )
        block = node.build({"in": (1, 2, 2)}, BuildContext(num_classes=0, image_channels=3, meta=False))
        block.conv1, block.conv2.conv = torch.nn.Identity(), torch.nn.Identity()  # the convs' output given
        assert block(torch.tensor([[[[-1.0, 1.0], [1.0, 1.0]]]])).item() == pytest.approx(expected)


def test_progan_critic_loss_by_hand():
    # loss.py:D_wgangp_acgan: D(fake) - D(real) + lambda (||grad D(x_hat)|| - 1)^2 + eps_drift D(real)^2,
    # lambda 10, eps_drift 0.001. A linear critic w = (1.8, 2.4) has ||grad|| = 3 everywhere: GP = 4;
    # real (1, 0) scores 1.8, fake (0, -1) scores -2.4
    from pipeline.methods.losses import get_loss
    from pipeline.methods.regularizers import gradient_penalty

    w = torch.tensor([1.8, 2.4], dtype=torch.float64)
    real, fake = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    critic = lambda x, y: (x * w).sum(1, keepdim=True)  # noqa: E731
    loss = get_loss("wgan_gp").d(critic(real, None), critic(fake, None)) + 10 * gradient_penalty(
        critic, real, fake, None
    )
    assert loss.item() == pytest.approx(35.80324, abs=1e-9)
