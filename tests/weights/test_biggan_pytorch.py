"""BigGAN-PyTorch checkpoints into the biggan specs (pipeline/weights/biggan_pytorch.py).

The fixtures hold the key names and shapes of the authors' G and D at a small width, as their
code builds them (written by benchmarks/fidelity_biggan_pytorch.py, which also compares the
converted networks with theirs in float64: docs/fidelity.md). Here random tensors of exactly those
keys and shapes must convert into complete state dicts of our networks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.blocks.layers import BuildContext
from pipeline.errors import SpecError
from pipeline.graph import build_network
from pipeline.spec import load_spec
from pipeline.weights.biggan_pytorch import convert, sn_vectors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "weights"
CASES = ["biggan_pytorch_biggan_128_ch8.json", "biggan_pytorch_biggan_deep_128_ch8.json"]


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def random_state(keys: list, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        t = torch.randn(shape, generator=gen) * 0.1
        if key.endswith("u0"):
            t = torch.nn.functional.normalize(t, dim=1)
        elif key.endswith("sv0"):
            t = torch.ones(shape)
        elif key.endswith("stored_var"):
            t = torch.rand(shape, generator=gen) + 0.5
        state[key] = t
    return state


@pytest.fixture(scope="module", params=CASES)
def case(request):
    fx = fixture(request.param)
    return fx, load_spec(fx["spec"], fx["overrides"])


def test_every_key_of_theirs_fills_every_key_of_ours(case):
    fx, loaded = case
    states = {"G": random_state(fx["G"]), "G_ema": random_state(fx["G"], 1), "D": random_state(fx["D"], 2)}
    converted = convert(states, loaded)
    nets = {n: build_network(loaded, n, "meta", compile=False) for n in ("generator", "discriminator")}
    for role, network in (("G", "generator"), ("G_ema", "generator"), ("D", "discriminator")):
        nets[network].load_state_dict(converted[role], strict=True, assign=True)  # every key, every shape
        assert all(v.dtype == torch.float32 or k.endswith("num_batches_tracked") for k, v in converted[role].items())
    # values land where the mapping says, raw (spectral norm's weight is stored unnormalised)
    g, theirs = converted["G"], states["G"]
    assert torch.equal(g["shared.weight"], theirs["shared.weight"])
    assert torch.equal(g["fc.parametrizations.weight.original"], theirs["linear.weight"])
    first = "up_8" if "up_8.conv1.bias" in g else "up_to_attn.0"
    assert torch.equal(g[f"{first}.bn1.bn.bn.running_var"], theirs["blocks.0.0.bn1.stored_var"])
    assert torch.equal(g[f"{first}.bn1.bn.gain.parametrizations.weight.original"], theirs["blocks.0.0.bn1.gain.weight"])
    assert torch.equal(g["rgb.bn.weight"], theirs["output_layer.0.gain"])
    assert torch.equal(g["rgb.conv.bias"], theirs["output_layer.2.bias"])
    gamma = next(k for k in theirs if k.endswith("gamma"))
    assert g["attn.gamma"].shape == (1,) and g["attn.gamma"].item() == theirs[gamma].item()
    d = converted["D"]
    assert torch.equal(d["head.embed.parametrizations.weight.original"], states["D"]["embed.weight"])


def test_spectral_norm_state_is_one_power_iteration_from_u0_by_hand():
    # W = diag(2, 1), u0 = (1, 1)/sqrt 2: v1 = normalize(Wᵀ u0) = (2, 1)/sqrt 5,
    # u1 = normalize(W v1) = (4, 1)/sqrt 17, sigma = u1ᵀ W v1 = 17 / sqrt 85 = sqrt(17/5)
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    u0 = torch.tensor([[1.0, 1.0]], dtype=torch.float64) / math.sqrt(2)
    u, v = sn_vectors(weight, u0, 1e-12)
    assert torch.allclose(v, torch.tensor([2.0, 1.0], dtype=torch.float64) / math.sqrt(5), atol=1e-15)
    assert torch.allclose(u, torch.tensor([4.0, 1.0], dtype=torch.float64) / math.sqrt(17), atol=1e-15)
    # our layer in eval mode divides by uᵀ W v with those vectors: their sigma, not the true 2
    layer = BuildContext(num_classes=0, image_channels=3, sn=True, meta=False).linear(2, 2, bias=False).double()
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(weight)
        layer.parametrizations.weight[0]._u.copy_(u)
        layer.parametrizations.weight[0]._v.copy_(v)
    layer.eval()
    assert torch.allclose(layer.weight, weight / math.sqrt(17 / 5), atol=1e-15)


def _biggan(states):
    fx = fixture(CASES[0])
    return convert(states, load_spec(fx["spec"], fx["overrides"]))


def test_missing_extra_and_misshapen_keys_are_user_errors():
    keys = fixture(CASES[0])["G"]
    state = random_state(keys)
    del state["blocks.1.0.conv2.bias"]
    with pytest.raises(SpecError, match=r"G\.pth: has no key 'blocks\.1\.0\.conv2\.bias'"):
        _biggan({"G": state})
    state = random_state(keys)
    state["blocks.1.0.conv2.u1"] = torch.zeros(1, 64)
    with pytest.raises(SpecError, match=r"(?s)1 key\(s\) .*blocks\.1\.0\.conv2\.u1.*num_G_SVs"):
        _biggan({"G": state})
    state = random_state(keys)
    state["blocks.2.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
    with pytest.raises(SpecError, match=r"blocks\.2\.0\.conv1\.weight has shape \(32, 64, 1, 1\), but the spec's"):
        _biggan({"G": state})
    state = random_state(keys)
    del state["blocks.1.0.conv2.u0"]
    with pytest.raises(
        SpecError, match=r"blocks\.1\.0\.conv2 is not spectrally normalised, the spec's up_16\.conv2 is"
    ):
        _biggan({"G": state})
    with pytest.raises(SpecError, match="D.pth: holds a list, not a state dict"):
        _biggan({"D": [1, 2]})
    with pytest.raises(SpecError, match="not a state dict of tensors"):
        _biggan({"D": {"itr": 5}})


def test_a_checkpoint_of_another_architecture_is_refused():
    deep = fixture(CASES[1])
    with pytest.raises(SpecError, match=r"holds a network of .* parts .* the spec's generator"):
        _biggan({"G": random_state(deep["G"])})
