"""`compile:` in a spec: compiled networks give eager's outputs and keep eager's state-dict keys."""

import pytest
import torch

from pipeline.graph import build_network
from pipeline.spec import load_spec


@pytest.mark.slow
def test_compiled_tiny_spec_equals_eager():
    compiled_spec = load_spec("tiny_biggan", ["compile.enabled=true"])
    eager_spec = load_spec("tiny_biggan")
    torch.manual_seed(0)
    g, d = build_network(compiled_spec, "generator"), build_network(compiled_spec, "discriminator")
    torch.manual_seed(0)
    g_ref, d_ref = build_network(eager_spec, "generator"), build_network(eager_spec, "discriminator")
    assert list(g.state_dict()) == list(g_ref.state_dict())
    assert list(d.state_dict()) == list(d_ref.state_dict())
    assert not any("_orig_mod" in k for k in g.state_dict())

    z, y = torch.randn(4, compiled_spec.spec.latent.z_dim), torch.randint(0, 10, (4,))
    img, img_ref = g(z, y), g_ref(z, y)  # train mode: batch statistics and one SN power iteration
    assert torch.allclose(img, img_ref, atol=1e-4)
    logits, logits_ref = d(img.detach(), y), d_ref(img_ref.detach(), y)
    assert torch.allclose(logits, logits_ref, atol=1e-4)
    # the buffers the forward updated (BN running stats, SN vectors) agree too
    for (name, a), b in zip(g.state_dict().items(), g_ref.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), name
