"""`compile:` in a spec: compiled networks give eager's outputs and keep eager's state-dict keys;
regional compilation shares one compiled graph between identical blocks and never recompiles once
training runs."""

import pytest
import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from pipeline.blocks.biggan import DeepDBlock
from pipeline.graph import build_network
from pipeline.spec import load_spec
from pipeline.train.loop import Trainer


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["regional", "whole"])
def test_compiled_tiny_spec_equals_eager(scope):
    compiled_spec = load_spec("tiny_biggan", ["compile.enabled=true", f"compile.scope={scope}"])
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


def test_channels_last_runs_the_feature_maps_channels_last_and_equals_nchw():
    nets = {}
    for layout in (True, False):
        loaded = load_spec("tiny_biggan", [f"compile.channels_last={layout}"])
        torch.manual_seed(0)
        nets[layout] = build_network(loaded, "generator")
    seen = []
    nets[True]["up_16"].register_forward_hook(lambda m, i, out: seen.append(out))
    z, y = torch.randn(4, loaded.spec.latent.z_dim), torch.randint(0, 10, (4,))
    img, img_nchw = nets[True](z, y), nets[False](z, y)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert img.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(img, img_nchw, atol=1e-5)
    # the weights keep their layout (DeepSpeed broadcasts them as bytes, which needs a contiguous last dim)
    assert all(p.is_contiguous() for p in nets[True].parameters())


def test_regional_compilation_shares_identical_blocks_and_never_recompiles_in_steady_state(tmp_path):
    """Recompilations are dynamo's decision (its guards), made before any backend runs: aot_eager
    traces what inductor would be given without generating kernels, in seconds. D's last three
    blocks are identical (64 -> 64 channels at 8x8, no pooling)."""
    loaded = load_spec(
        "tiny_biggan_deep",
        [
            "compile.enabled=true",
            "compile.backend=aot_eager",
            "data.synthetic=true",
            "train.batch_size=4",
            "method.d_steps=1",
            "discriminator.nodes.down_from_attn.each.out_channels=[64,64,64,64]",
            "discriminator.nodes.down_from_attn.each.downsample=[true,false,false,false]",
            f"run.dir={tmp_path}",
        ],
    )
    torch._dynamo.reset()
    trainer = Trainer(loaded, resume=False)
    for _ in range(2):
        trainer.run_step()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        trainer.run_step()
    assert counters["stats"]["unique_graphs"] == graphs  # steady state: no recompilation
    # D's six blocks have four structures-and-shapes (16 -> 32 pooled, 32 -> 32, 32 -> 64 pooled,
    # 64 -> 64 three times), each called two ways: in D's step (its weights need gradients) and in
    # G's (D frozen, its input needs them)
    assert len(_debug_get_cache_entry_list(DeepDBlock.forward.__code__)) == 4 * 2
