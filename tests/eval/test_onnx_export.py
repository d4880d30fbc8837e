"""ONNX export of a trained generator: the model onnxruntime runs gives torch's images for the
same inputs at any batch size, conditional or not; bad requests are refused without a file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import SpecError
from pipeline.eval.onnx_export import OnnxRequest, export_onnx
from pipeline.eval.sampling import load_generator, sample_latents
from pipeline.graph import build_network
from pipeline.runs import Run
from pipeline.spec import load_spec

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOLERANCE = 1e-4  # float32: torch's own error against float64 is of the order of 1e-5 here
REQUEST = OnnxRequest(standing_passes=2, batch_size=8)  # the spec's 16 passes cost seconds


def write_export(root, spec_name: str):
    """RUN/export/ as a finished run writes it, holding random weights (orthogonal init is slow
    on a CPU: normal instead). Attention's gain starts at 0; set, so that attention counts."""
    torch.manual_seed(0)
    loaded = load_spec(spec_name, ["generator.init=normal"] if spec_name != "csgan_demo" else [])
    spec = loaded.spec
    networks = {}
    for name in spec.method.exports(spec):
        net = build_network(loaded, name)
        with torch.no_grad():
            for key, p in net.named_parameters():
                if key.endswith("gamma"):
                    p.fill_(0.5)
        networks[name] = net
    return Run(root).write_export(networks, spec.resolved())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {name: write_export(root / name, name) for name in ("demo", "dcgan_demo")}


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_a_conditional_generator_gives_torchs_images_at_other_batch_sizes(exports, tmp_path):
    gen = load_generator(exports["demo"])
    out = tmp_path / "demo.onnx"
    record = export_onnx(gen, out, REQUEST)
    assert record["conditional"] and record["max_abs_diff"] < TOLERANCE
    s = session(out)
    inputs = [(i.name, i.shape, i.type) for i in s.get_inputs()]
    assert inputs == [("z", ["batch", 64], "tensor(float)"), ("y", ["batch"], "tensor(int64)")]
    assert [(o.name, o.shape, o.type) for o in s.get_outputs()] == [("image", ["batch", 3, 32, 32], "tensor(float)")]
    rng = torch.Generator().manual_seed(7)
    for n in (5, 1):  # exported at a batch of 2
        z = sample_latents(n, 64, None, generator=rng)
        y = torch.randint(10, (n,), generator=rng)
        got = s.run(None, {"z": z.numpy(), "y": y.numpy()})[0]
        with torch.no_grad():
            want = gen.module(z, y).numpy()  # the generator with the standing statistics export measured
        diff = np.abs(got - want).max()
        print(f"demo, batch {n}: max |onnx - torch| = {diff:.2e}")
        assert got.shape == (n, 3, 32, 32) and diff < TOLERANCE
        assert got.min() >= -1 and got.max() <= 1
    # the class input is read: another class, another image
    z = np.repeat(sample_latents(1, 64, None, generator=rng).numpy(), 2, 0)
    two = s.run(None, {"z": z, "y": np.array([0, 1])})[0]
    assert np.abs(two[0] - two[1]).max() > 1e-3


def test_an_unconditional_generator_takes_z_alone_and_the_protocol_is_recorded(exports, tmp_path):
    import onnx

    gen = load_generator(exports["dcgan_demo"])
    norm = next(m for m in gen.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    before = norm.running_var.clone()
    out = tmp_path / "dcgan.onnx"
    record = export_onnx(gen, out, OnnxRequest(truncation=0.5, standing_passes=2, batch_size=8, seed=4))
    assert not torch.equal(norm.running_var, before)  # measured, then frozen into the graph
    assert not record["conditional"] and record["max_abs_diff"] < TOLERANCE
    s = session(out)
    assert [(i.name, i.shape) for i in s.get_inputs()] == [("z", ["batch", 100])]
    z = sample_latents(7, 100, 0.5, generator=torch.Generator().manual_seed(3))
    got = s.run(None, {"z": z.numpy()})[0]
    with torch.no_grad():
        want = gen.module(z, None).numpy()
    diff = np.abs(got - want).max()
    print(f"dcgan_demo, batch 7: max |onnx - torch| = {diff:.2e}")
    assert got.shape == (7, 3, 32, 32) and diff < TOLERANCE
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["truncation"] == "0.5" and meta["truncation_mode"] == "truncate"
    assert meta["standing_stats"] == "2 passes of 8, seed 5" and meta["labels"] == "none (unconditional)"
    assert meta["image"] == "image: float32 [N, 3, 32, 32] (NCHW), in [-1, 1]"
    assert meta["latent"] == "z: float32 [N, 100], normal, truncated (truncate at 0.5) by the caller"


def test_the_model_draws_what_sample_draws_for_the_same_latents(cli, exports, tmp_path):
    """`export` and `sample` with the same --truncation, --standing-stats, --batch-size and --seed
    measure the same statistics: the ONNX model, fed sample's latents, gives sample's PNGs."""
    from PIL import Image

    options = ("--truncation", "0.5", "--standing-stats", "2", "--batch-size", "8", "--seed", "2")
    result = cli("export", exports["demo"], "--onnx", tmp_path / "g.onnx", *options)
    assert result.code == 0, result.err
    result = cli("sample", exports["demo"], "--out", tmp_path / "s", "--classes", "1,6", "--num", "2", *options)
    assert result.code == 0, result.err
    z = sample_latents(4, 64, 0.5, generator=torch.Generator().manual_seed(2))  # sample's latents: --seed
    images = session(tmp_path / "g.onnx").run(None, {"z": z.numpy(), "y": np.array([1, 1, 6, 6])})[0]
    pixels = (images.transpose(0, 2, 3, 1) + 1) * 127.5
    for i, name in enumerate(["class1-000", "class1-001", "class6-000", "class6-001"]):
        png = np.asarray(Image.open(tmp_path / "s" / "images" / f"{name}.png"), dtype=np.float32)
        assert np.abs(pixels[i] - png).max() <= 0.5 + 1e-3  # PNG's rounding, nothing more


# ----- refusals: nothing written, nothing lost -----
def test_cli_exports_and_refuses_to_overwrite_without_force(cli, exports, tmp_path):
    out = tmp_path / "g.onnx"
    args = ("export", exports["dcgan_demo"], "--onnx", out, "--standing-stats", "2", "--batch-size", "4")
    result = cli(*args)
    assert result.code == 0, result.err
    assert "onnxruntime (CPU) against torch" in result.out and "z float32 [N, 100] (unconditional)" in result.out
    first = out.read_bytes()
    result = cli(*args)
    assert result.code == 2 and f"{out} exists" in result.err and "--force" in result.err
    assert out.read_bytes() == first
    result = cli(*args, "--force", "--seed", "3")
    assert result.code == 0, result.err
    assert out.read_bytes() != first  # other standing statistics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # no temporary file left


def test_cli_bad_requests_are_user_errors(cli, exports, tmp_path):
    result = cli("export", exports["demo"], "--onnx", tmp_path / "missing" / "g.onnx")
    assert result.code == 2 and f"{tmp_path / 'missing'} is not a directory" in result.err
    result = cli("export", tmp_path / "nope", "--onnx", tmp_path / "g.onnx")
    assert result.code == 2 and "does not exist" in result.err
    (tmp_path / "empty").mkdir()
    result = cli("export", tmp_path / "empty", "--onnx", tmp_path / "g.onnx")
    assert result.code == 2 and "holds no finished checkpoint" in result.err
    result = cli("export", exports["demo"], "--onnx", tmp_path / "g.onnx", "--truncation", "-1")
    assert result.code == 2 and "--truncation" in result.err
    result = cli("export", exports["demo"], "--onnx", tmp_path)
    assert result.code == 2 and "is a directory" in result.err
    assert "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_an_image_to_image_run_is_refused(tmp_path):
    gen = load_generator(write_export(tmp_path / "cycle", "csgan_demo"))
    with pytest.raises(SpecError, match="translates images"):
        export_onnx(gen, tmp_path / "g.onnx", REQUEST)
    assert not (tmp_path / "g.onnx").exists()


def test_a_failed_export_leaves_the_old_file_and_no_temporary(exports, tmp_path, monkeypatch):
    out = tmp_path / "g.onnx"
    out.write_bytes(b"an earlier export")

    def fail(*args, **kwargs):
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="the exporter failed"):
        export_onnx(load_generator(exports["dcgan_demo"]), out, OnnxRequest(standing_passes=0, force=True))
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]
