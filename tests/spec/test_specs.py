"""Every shipped spec validates and builds; the BigGAN family matches the published reference."""

import json
import re

import pytest
import torch

from pipeline.graph import analyze_spec, build_network
from pipeline.spec import load_spec

# shared/REFERENCE.md: parameters (exact) and forward GFLOP per image (within 1%), BigGAN-PyTorch.
REFERENCE = {
    "biggan_128": ((70_433_988, 42.45), (87_982_370, 21.94)),
    "biggan_deep_128": ((50_244_484, 18.07), (34_590_210, 18.52)),
    "biggan_deep_256": ((55_736_708, 58.96), (38_247_426, 60.61)),
    "biggan_deep_128_ch32": ((6_821_860, 1.42), (2_551_170, 1.43)),
}


def test_every_spec_validates_on_meta(shipped_spec):
    loaded = load_spec(shipped_spec, check_graphs=False)
    plans = analyze_spec(loaded)
    spec = loaded.spec
    d, roles = spec.data, spec.method.networks(spec)
    assert set(plans) == set(roles)  # every network the method trains, analyzed
    for name, need in roles.items():  # images out of generators (a GAN's or a translation's)
        if need.role == "generator":
            assert plans[name].output_shapes[0] == (d.channels, d.resolution, d.resolution)
        else:
            assert plans[name].output_shapes[0][0] == 1  # one logit, or a 1-channel patch map
    for plan in plans.values():
        assert plan.params > 0 and plan.flops_per_image > 0
        # analysis never allocates weights: every tensor it built lives on the meta device
        for module in plan.modules.values():
            assert all(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def header_claims(path) -> tuple[list[int], list[str]]:
    """The parameter counts (integers written with thousands separators) and GFLOP/img figures
    in the sentences of a spec's leading comment that speak of parameters or FLOPs."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    sentences = re.split(r"(?<=\.)\s+", " ".join(lines))
    counted = [s for s in sentences if re.search(r"param|GFLOP", s, re.IGNORECASE)]
    params = [int(n.replace(",", "")) for s in counted for n in re.findall(r"\b\d{1,3}(?:,\d{3})+\b", s)]
    gflops = [g for s in counted for g in re.findall(r"\b(\d+\.\d+)(?: and \d+\.\d+)? GFLOP", s)]
    gflops += [g for s in counted for g in re.findall(r"\b\d+\.\d+ and (\d+\.\d+) GFLOP", s)]
    return params, gflops


def test_header_numbers_are_what_validate_reports(shipped_spec, root):
    params, gflops = header_claims(root / "specs" / f"{shipped_spec}.yaml")
    if not params and not gflops:
        pytest.skip("its header states no parameter count or FLOPs")
    plans = analyze_spec(load_spec(shipped_spec, check_graphs=False)).values()
    counts = {p.params for p in plans} | {s.params for p in plans if p.growth for s in p.growth.stages}
    for n in params:
        assert n in counts, f"specs/{shipped_spec}.yaml's header says {n:,} parameters; validate: {sorted(counts)}"
    figures = {f"{p.flops_per_image / 1e9:.2f}" for p in plans}
    for g in gflops:
        assert g in figures, f"specs/{shipped_spec}.yaml's header says {g} GFLOP/img; validate: {sorted(figures)}"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_biggan_family_matches_reference(name):
    plans = analyze_spec(load_spec(name, check_graphs=False))
    for which, (params, gflops) in zip(("generator", "discriminator"), REFERENCE[name], strict=True):
        plan = plans[which]
        assert plan.params == params, which
        # The reference counted at batch 2 in train mode, where spectral norm's power iteration
        # (a per-forward cost, not a per-image one) adds half of its FLOPs to each image.
        assert abs(plan.flops_per_image / 1e9 / gflops - 1) < 0.02, which  # convs and matmuls alone
        measured = (plan.flops_per_image + plan.sn_flops_per_forward / 2) / 1e9
        assert abs(measured / gflops - 1) < 0.01, (which, measured, gflops)


def test_validate_json_cli(cli):
    result = cli("validate", "spec=biggan_deep_256", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["name"] == "biggan_deep_256"
    assert report["generator"]["params"] == 55_736_708
    assert report["generator"]["output_shape"] == [3, 256, 256]
    assert report["discriminator"]["params"] == 38_247_426
    assert report["discriminator"]["output_shape"] == [1]
    assert report["generator"]["flops_per_image"] > 5e10


def test_validate_table_cli(cli):
    result = cli("validate", "tiny_biggan_deep")
    assert result.code == 0, result.err
    for text in ("generator", "discriminator", "up_to_attn[3]", "biggan_deep_up", "3x32x32", "total"):
        assert text in result.out


def test_schema_cli(cli, tmp_path):
    out = tmp_path / "spec.schema.json"
    assert cli("schema", "-o", out).code == 0
    schema = json.loads(out.read_text())
    assert {"generator", "discriminator", "data", "latent", "train", "compile"} <= set(schema["properties"])
    text = out.read_text()
    assert "biggan_deep_up" in text and "Spectral norm" in text


def test_tiny_spec_builds_and_runs_on_cpu():
    loaded = load_spec("tiny_biggan_deep")
    torch.manual_seed(0)
    g = build_network(loaded, "generator")
    d = build_network(loaded, "discriminator")
    z, y = torch.randn(4, loaded.spec.latent.z_dim), torch.randint(0, 10, (4,))
    img = g(z, y)
    assert img.shape == (4, 3, 32, 32) and img.abs().max() <= 1
    assert d(img, y).shape == (4, 1)
    # the state-dict keys are the node names of the YAML
    assert {k.split(".")[0] for k in g.state_dict()} == {"shared", "fc", "up_to_attn", "attn", "up_from_attn", "rgb"}
    # orthogonal init of the linear (rows orthonormal) beneath spectral norm
    w = g["fc"].parametrizations.weight.original
    gram = w.T @ w  # 256 x 256: columns orthonormal since out_features > in_features
    assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-4)
