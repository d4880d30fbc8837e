"""TF-Hub BigGAN-deep weights as pytorch-pretrained-biggan 0.1.1 publishes them: the package's own
model (random weights, built from its config) against the generator of our `*_tfhub` spec holding
the converted weights, image for image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_pretrained_biggan import BigGAN, BigGANConfig
from pytorch_pretrained_biggan.convert_tf_to_pytorch import BigGAN128, BigGAN256, BigGAN512
from pytorch_pretrained_biggan.model import BigGANBatchNorm

from pipeline.errors import SpecError
from pipeline.eval.sampling import load_generator
from pipeline.graph import NetworkPlan, analyze_network, instantiate
from pipeline.spec import load_spec
from pipeline.weights import pretrained_biggan as tfhub

RELEASED = {128: BigGAN128, 256: BigGAN256, 512: BigGAN512}  # the package's configs of the three releases
TRUNCATIONS = [1.0, 0.47]  # 1.0: a row of statistics; 0.47: between two rows, which the package interpolates


def small_config(resolution: int, ch: int = 8, z_dim: int = 16, num_classes: int = 10) -> BigGANConfig:
    """A released config at a small width: its layers and attention as released."""
    released = RELEASED[resolution]
    return BigGANConfig(
        output_dim=resolution,
        z_dim=z_dim,
        class_embed_dim=z_dim,
        channel_width=ch,
        num_classes=num_classes,
        layers=released.layers,
        attention_layer_position=released.attention_layer_position,
        eps=released.eps,
        n_stats=released.n_stats,
    )


def overrides(config: BigGANConfig) -> list[str]:
    """The overrides that give the shipped `*_tfhub` spec the config's width, latent and classes."""
    ch, at = config.channel_width, config.attention_layer_position
    outs = [ch * out for _, _, out in config.layers]
    ups = [str(up).lower() for up, _, _ in config.layers]
    return [
        f"latent.z_dim={config.z_dim}",
        f"data.num_classes={config.num_classes}",
        f"generator.nodes.shared.embedding_dim={config.z_dim}",
        f"generator.nodes.fc.out_features={4 * 4 * 16 * ch}",
        f"generator.nodes.h.shape=[{16 * ch}, 4, 4]",
        f"generator.nodes.up_to_attn.each.out_channels={outs[:at]}",
        f"generator.nodes.up_to_attn.each.upsample=[{', '.join(ups[:at])}]",
        f"generator.nodes.up_from_attn.each.out_channels={outs[at:]}",
        f"generator.nodes.up_from_attn.each.upsample=[{', '.join(ups[at:])}]",
        f"generator.nodes.rgb.conv_channels={ch}",
    ]


def our_spec(config: BigGANConfig):
    return load_spec(f"biggan_deep_{config.output_dim}_tfhub", overrides(config))


def latents(config: BigGANConfig, n: int, seed: int, truncation: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents as TF-Hub's are drawn at a truncation, truncation x (N(0, 1) within [-2, 2]) (clipped
    here, not redrawn: any values do), and class labels."""
    gen = torch.Generator().manual_seed(seed)
    z = truncation * torch.randn(n, config.z_dim, generator=gen).clamp(-2, 2)
    y = torch.randint(config.num_classes, (n,), generator=gen)
    return z, y


@torch.no_grad()
def package_model(config: BigGANConfig, seed: int = 0) -> BigGAN:
    """The package's BigGAN with random weights made to look trained: spectral norm's u and v
    after power iterations (as `convert_tf_to_pytorch.py` prepares them), attention switched on,
    and per-truncation BatchNorm statistics near each layer's real ones (all 51 rows differ), so
    that images are neither saturated nor blind to which row is used."""
    torch.manual_seed(seed)
    model = BigGAN(config)
    for module in model.modules():
        if hasattr(module, "weight_orig"):
            mat = module.weight_orig.flatten(1)
            for _ in range(10):
                module.weight_v.copy_(F.normalize(mat.t() @ module.weight_u, dim=0, eps=config.eps))
                module.weight_u.copy_(F.normalize(mat @ module.weight_v, dim=0, eps=config.eps))
        if hasattr(module, "gamma"):
            module.gamma.fill_(0.7)
    model.generator.bn.weight.uniform_(0.5, 1.5)
    model.generator.bn.bias.normal_(0.0, 0.2)

    def calibrate(module: BigGANBatchNorm, args: tuple) -> None:
        x, n = args[0], module.running_means.shape[0]
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
        module.running_means.copy_(mean + 0.1 * var.sqrt() * torch.randn(n, mean.numel()))
        module.running_vars.copy_(var * torch.empty(n, var.numel()).uniform_(0.8, 1.25))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, BigGANBatchNorm)]
    z, y = latents(config, 4, seed + 1)
    model.eval()(z, F.one_hot(y, config.num_classes).float(), 1.0)
    for hook in hooks:
        hook.remove()
    return model


_PLANS: list[tuple[object, NetworkPlan]] = []  # each loaded spec's generator, analysed once (a second each)


def our_generator(loaded, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    plan = next((plan for spec, plan in _PLANS if spec is loaded), None)
    if plan is None:
        plan = analyze_network(loaded, "generator")
        _PLANS.append((loaded, plan))
    module = instantiate(loaded, plan, "meta")
    module.load_state_dict(weights, assign=True, strict=True)
    return module.eval()


@torch.no_grad()
def differences(model: BigGAN, loaded, truncations: list[float], n: int = 2) -> dict[float, dict[str, float]]:
    """Per truncation, the largest |our image - the package's| in float32 and in float64, and the
    package's own float32 rounding (|its float32 image - its float64 image|); our generator is
    converted at that truncation."""
    config, out = model.config, {}
    for truncation in truncations:
        z, y = latents(config, n, seed=7, truncation=truncation)
        one_hot = F.one_hot(y, config.num_classes)
        images = {}
        for dtype in (torch.float32, torch.float64):
            model.to(dtype)  # the package's statistics are interpolated in this precision, so convert from it
            ours = our_generator(loaded, tfhub.convert(model.state_dict(), loaded, truncation=truncation)["G"])
            theirs = model(z.to(dtype), one_hot.to(dtype), truncation)
            images[dtype] = theirs, ours(z.to(dtype), y)
            assert images[dtype][1].dtype == theirs.dtype == dtype
            assert images[dtype][1].shape == theirs.shape == (n, 3, config.output_dim, config.output_dim)
        theirs32, ours32 = images[torch.float32]
        theirs64, ours64 = images[torch.float64]
        # the comparison means something: images neither saturated nor constant
        assert theirs64.std() > 0.1 and (theirs64.abs() < 0.95).double().mean() > 0.5
        out[truncation] = {
            "float32": (ours32 - theirs32).abs().max().item(),
            "float64": (ours64 - theirs64).abs().max().item(),
            "package float32 rounding": (theirs32.double() - theirs64).abs().max().item(),
        }
    model.float()
    return out


def assert_same_images(diffs: dict[float, dict[str, float]]) -> None:
    """Equal to rounding in float64; in float32 within 1e-5, or within twice the package's own
    float32 rounding where a random network's conditioning makes that larger (no float32
    implementation can be closer to the package than the package is to its exact images)."""
    for truncation, diff in diffs.items():
        assert diff["float64"] < 1e-12, (truncation, diff)
        assert diff["float32"] < max(1e-5, 2 * diff["package float32 rounding"]), (truncation, diff)


@pytest.fixture(scope="module")
def small_128():
    config = small_config(128)
    return package_model(config), our_spec(config)


def test_converted_generator_draws_the_packages_images(small_128):
    diffs = differences(*small_128, TRUNCATIONS)
    print(f"128 at ch 8: max |ours - package| per truncation: {diffs}")
    assert_same_images(diffs)


@torch.no_grad()
def test_the_statistics_of_another_truncation_give_other_images(small_128):
    """So the comparison above sees which statistics the converter picks."""
    model, loaded = small_128
    z, y = latents(model.config, 2, seed=3, truncation=0.4)
    theirs = model(z, F.one_hot(y, model.config.num_classes).float(), 0.4)
    ours = our_generator(loaded, tfhub.convert(model.state_dict(), loaded, truncation=0.5)["G"])(z, y)
    assert (ours - theirs).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [256, 512])
def test_converted_generator_at_256_and_512(resolution):
    config = small_config(resolution, ch=4)
    diffs = differences(package_model(config), our_spec(config), [0.47])
    print(f"{resolution} at ch 4: max |ours - package|: {diffs}")
    assert_same_images(diffs)


@pytest.mark.slow
def test_converted_generator_at_the_released_128_width():
    config = RELEASED[128]
    diffs = differences(package_model(config), load_spec("biggan_deep_128_tfhub"), [0.47])
    print(f"released 128 config: max |ours - package|: {diffs}")
    assert_same_images(diffs)


def test_statistics_are_picked_as_the_package_picks_them():
    table = torch.arange(51.0).unsqueeze(1)  # row i holds i
    assert tfhub.stats_at(table, 1.0).item() == 50.0
    assert tfhub.stats_at(table, 0.4).item() == 20.0
    # between rows 23 and 24 at 0.47 (23.5 steps), weighed half and half
    assert tfhub.stats_at(table, 0.47).item() == pytest.approx(23.5)
    # the package weighs the lower row by the fraction past it: 0.462 is 23.1 steps, 23 * 0.1 + 24 * 0.9
    assert tfhub.stats_at(table, 0.462).item() == pytest.approx(23.9)
    with pytest.raises(SpecError, match="outside"):
        tfhub.stats_at(table, 0.0)


@pytest.mark.parametrize("resolution", [128, 256, 512])
def test_the_shipped_specs_hold_the_released_generators_exactly(resolution):
    """Every key of the released architecture maps onto the shipped spec's generator with its shape
    (both built on the meta device: no weights allocated)."""
    with torch.device("meta"):
        state = BigGAN(RELEASED[resolution]).state_dict()
    loaded = load_spec(f"biggan_deep_{resolution}_tfhub")
    ours = tfhub.convert(state, loaded)["G"]
    expected = instantiate(loaded, analyze_network(loaded, "generator"), "meta").state_dict()
    assert list(ours) == list(expected)
    assert all(ours[k].shape == v.shape for k, v in expected.items())
    assert tfhub.spec_name(state) == f"biggan_deep_{resolution}_tfhub"
    their_params = sum(p.numel() for p in BigGAN(RELEASED[resolution]).to("meta").parameters())
    assert analyze_network(loaded, "generator").params == their_params


# ----- what the converter refuses -----
@pytest.fixture(scope="module")
def meta_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return BigGAN(RELEASED[128]).state_dict()


def test_a_missing_or_unexpected_key_is_named(meta_state):
    loaded = load_spec("biggan_deep_128_tfhub")
    state = dict(meta_state)
    del state["generator.layers.3.conv_2.weight_v"]
    state["generator.layers.3.extra"] = torch.zeros(1)
    with pytest.raises(SpecError) as err:
        tfhub.convert(state, loaded)
    assert "generator.layers.3.extra" in str(err.value) and "generator.layers.3.conv_2.weight_v" in str(err.value)


def test_weights_of_another_size_are_refused(meta_state):
    with torch.device("meta"):
        state_512 = BigGAN(RELEASED[512]).state_dict()
    with pytest.raises(SpecError, match="10 blocks, attention after block 8; the weights have 14"):
        tfhub.convert(state_512, load_spec("biggan_deep_128_tfhub"))
    with pytest.raises(SpecError, match="biggan_deep_128_tfhub"):
        tfhub.convert(meta_state, load_spec("biggan_deep_128"))  # BigGAN-PyTorch's, not TF-Hub's


def test_a_spec_with_embedding_first_is_refused(meta_state):
    loaded = load_spec("biggan_deep_128_tfhub", ["generator.nodes.cond.in=[shared, z]"])
    with pytest.raises(SpecError, match=r"\[z, class embedding\]"):
        tfhub.convert(meta_state, loaded)


def test_check_reads_the_file_or_its_folder(tmp_path):
    state = BigGAN(small_config(128, ch=4)).state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    for path in (tmp_path, tmp_path / "pytorch_model.bin"):
        read = tfhub.check(path)
        assert list(read) == list(state) and all(torch.equal(read[k], v) for k, v in state.items())
    torch.save({"model": [1, 2]}, tmp_path / "other.bin")
    with pytest.raises(SpecError, match="not a state dict"):
        tfhub.check(tmp_path / "other.bin")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(SpecError, match="not pytorch-pretrained-biggan"):
        tfhub.check(tmp_path / "other.bin")
    with pytest.raises(SpecError, match="does not exist"):
        tfhub.check(tmp_path / "missing")


@torch.no_grad()
def test_import_weights_writes_an_export_that_draws_the_packages_images(small_128, cli, tmp_path):
    """The command end to end: the package's file in, an export out that `sample` and `eval` load
    (statistics of truncation 1.0, the default), the same images as the package's forward."""
    model, _ = small_128
    source = tmp_path / "biggan-deep-128"
    source.mkdir()
    torch.save(model.state_dict(), source / tfhub.WEIGHTS_NAME)
    out = tmp_path / "out"
    args = ["import-weights", "pretrained-biggan", source, "--out", out, "--spec", "biggan_deep_128_tfhub"]
    result = cli(*args, *overrides(model.config))
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["generator.safetensors", "import.json", "spec.yaml"]
    z, y = latents(model.config, 3, seed=11)
    ours = load_generator(out).module(z, y).double()
    one_hot = F.one_hot(y, model.config.num_classes)
    theirs32 = model(z, one_hot.float(), 1.0).double()
    theirs64 = model.double()(z.double(), one_hot.double(), 1.0)
    model.float()
    # as close to the exact images as the package's own float32 forward is (assert_same_images)
    assert (ours - theirs64).abs().max() < max(1e-5, 2 * (theirs32 - theirs64).abs().max().item())
