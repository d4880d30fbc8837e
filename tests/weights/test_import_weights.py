"""`import-weights FORMAT PATH --spec NAME --out DIR`: the export directory it writes (read by
`sample`), and every bad input a user error (exit 2) that leaves --out unwritten."""

from __future__ import annotations

import json

import pytest
import torch
from test_biggan_pytorch import CASES, fixture, random_state

from pipeline.eval.sampling import load_generator


@pytest.fixture
def checkpoint(tmp_path):
    fx = fixture(CASES[0])
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(random_state(fx["G"], 0), folder / "G.pth")
    torch.save(random_state(fx["G"], 1), folder / "G_ema.pth")
    torch.save(random_state(fx["D"], 2), folder / "D.pth")
    return folder, ["--spec", fx["spec"], *fx["overrides"]]


def test_import_writes_an_export_that_sample_reads(cli, checkpoint, tmp_path):
    folder, spec = checkpoint
    out = tmp_path / "out"
    result = cli("import-weights", "biggan-pytorch", str(folder), "--out", str(out), *spec)
    assert result.code == 0, result.err
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "discriminator.safetensors",
        "generator-train.safetensors",
        "generator.safetensors",
        "import.json",
        "spec.yaml",
    ]
    manifest = json.loads((out / "import.json").read_text())
    assert manifest["files"]["generator.safetensors"]["role"] == "G_ema" and manifest["missing"] == []
    loaded = load_generator(out)  # the EMA, as a run's export
    ema = torch.load(folder / "G_ema.pth")
    assert torch.equal(loaded.module.state_dict()["shared.weight"], ema["shared.weight"])


def test_a_subset_says_what_is_missing(cli, checkpoint, tmp_path):
    folder, spec = checkpoint
    (folder / "G.pth").unlink()
    (folder / "G_ema.pth").unlink()
    result = cli("import-weights", "biggan-pytorch", str(folder), "--out", str(tmp_path / "out"), *spec)
    assert result.code == 0, result.err
    assert "not in the source: G.pth, G_ema.pth" in result.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "discriminator.safetensors",
        "import.json",
        "spec.yaml",
    ]


def test_bad_inputs_are_user_errors_and_write_nothing(cli, checkpoint, tmp_path):
    folder, spec = checkpoint
    out = tmp_path / "out"

    def refused(*argv, match):
        result = cli("import-weights", *argv)
        assert result.code == 2, result.err
        assert match in result.err, result.err
        assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["keep.txt"])
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary left

    refused("biggan-pytorch", str(tmp_path / "nowhere"), "--out", str(out), *spec, match="does not exist")
    refused("nonsense", str(folder), "--out", str(out), *spec, match="unknown weights format")
    (folder / "D.pth").write_bytes(bytes(range(256)) * 4)  # random bytes
    refused("biggan-pytorch", str(folder), "--out", str(out), *spec, match="D.pth")
    torch.save([1, 2, 3], folder / "D.pth")
    refused("biggan-pytorch", str(folder), "--out", str(out), *spec, match="holds a list, not a state dict")
    torch.save(random_state(fixture(CASES[0])["D"]), folder / "D.pth")
    deep = ["--spec", "biggan_deep_128", *fixture(CASES[1])["overrides"]]
    refused("biggan-pytorch", str(folder), "--out", str(out), *deep, match="the spec's generator")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused("biggan-pytorch", str(folder), "--out", str(out), *spec, match="is not an empty folder")
    assert (out / "keep.txt").read_text() == "mine"


def test_a_folder_without_the_formats_file_is_refused(cli, tmp_path):
    result = cli("import-weights", "pretrained-biggan", str(tmp_path), "--out", str(tmp_path / "o"), "--spec", "demo")
    assert result.code == 2
    assert "holds none of the format's files (pytorch_model.bin)" in result.err
    assert not (tmp_path / "o").exists()
