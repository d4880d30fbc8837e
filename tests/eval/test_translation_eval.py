"""The two-domain demo data (`pipeline.data.domains`) and the translation evaluation
(`pipeline.eval.translation`), on CPU: the shards and both classifiers are built once per module.

The evaluation is checked against known generators: an "oracle" pair that applies domain B's
rendering and its inverse exactly (up to JPEG), and one that outputs constant grey.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.data.dali import real_images
from pipeline.data.domains import BACKGROUND_B, DOMAIN_NUM_SAMPLES, DOMAINS, INK_B
from pipeline.eval.classifier import RECORD_FILE, build_domain_demo, domain_demo_ready
from pipeline.eval.translation import evaluate_translation, save_translation_grid, translation_grid


class OracleAB(nn.Module):
    """A's rendering (grey level a in [-1, 1]) -> B's: per channel BACKGROUND_B + g (INK_B - BACKGROUND_B)."""

    def forward(self, x):
        background, ink = (torch.tensor(c, dtype=x.dtype).view(1, 3, 1, 1) for c in (BACKGROUND_B, INK_B))
        grey = (x.mean(1, keepdim=True) + 1) / 2
        return (background + grey * (ink - background)) / 127.5 - 1


class OracleBA(nn.Module):
    """The inverse: the grey level whose rendering is closest to the pixel (least squares over channels)."""

    def forward(self, x):
        background, ink = (torch.tensor(c, dtype=x.dtype).view(1, 3, 1, 1) for c in (BACKGROUND_B, INK_B))
        pixel = (x + 1) * 127.5
        grey = ((pixel - background) * (ink - background)).sum(1, keepdim=True) / ((ink - background) ** 2).sum()
        return (2 * grey - 1).expand_as(x)


class Grey(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-ab")
    return out, build_domain_demo(out)


def images_of(shards_dir):
    return torch.cat([images for images, _ in real_images(shards_dir, resolution=32)])


def sources(shards_dir) -> list[str]:
    sidecars = [json.loads(path.read_text()) for path in sorted(shards_dir.glob("shard-*.json"))]
    return [source for sidecar in sidecars for _, _, source, *_ in sidecar["samples"]]


# ----- the data -----
def test_domains_are_the_same_digits_in_the_same_stored_order(domains):
    out, manifests = domains
    names = {domain: sources(out / domain) for domain in DOMAINS}
    assert names["a"] == names["b"] and len(set(names["a"])) == 1797  # paired, sample for sample
    labels = {domain: torch.cat([y for _, y in real_images(out / domain, resolution=32)]) for domain in DOMAINS}
    assert torch.equal(labels["a"], labels["b"])
    for domain in DOMAINS:
        assert manifests[domain]["num_samples"] == DOMAIN_NUM_SAMPLES[domain]
        assert len(manifests[domain]["shards"]) == 2
        counts = manifests[domain]["class_counts"]
        assert sorted(map(int, counts)) == list(range(10)) and min(counts.values()) >= 170


def test_domain_b_is_a_dark_digit_on_a_light_background(domains):
    out, _ = domains
    a, b = images_of(out / "a").float(), images_of(out / "b").float()
    assert b.mean() - a.mean() > 60  # A is mostly black, B mostly cream: 79 and 166 when written
    assert (a[:, 0] - a[:, 2]).abs().mean() < 2  # A is grey
    corner = b[:, :, :2, :2].mean((0, 2, 3))  # the corners hold no ink
    assert (corner - torch.tensor(BACKGROUND_B, dtype=torch.float)).abs().max() < 6


def test_ready_after_building_and_a_rebuild_keeps_everything(domains, tmp_path):
    out, manifests = domains
    assert domain_demo_ready(out)
    assert not domain_demo_ready(tmp_path)
    records = {domain: (out / domain / RECORD_FILE).stat().st_mtime_ns for domain in DOMAINS}
    assert build_domain_demo(out) == manifests
    assert {domain: (out / domain / RECORD_FILE).stat().st_mtime_ns for domain in DOMAINS} == records


def test_each_domain_has_an_accurate_classifier(domains):
    out, _ = domains
    for domain in DOMAINS:
        record = json.loads((out / domain / RECORD_FILE).read_text())
        assert record["held_out_accuracy"] >= 0.95, domain  # 0.983 on both when written


# ----- the evaluation -----
def test_the_oracle_keeps_the_digits_and_constant_grey_does_not(domains):
    out, _ = domains
    g_ab, g_ba = OracleAB().train(), OracleBA().eval()
    oracle = evaluate_translation(g_ab, g_ba, out / "a", out / "b", device="cpu")
    assert g_ab.training and not g_ba.training  # their modes are restored
    grey = evaluate_translation(Grey(), Grey(), out / "a", out / "b", device="cpu")
    for direction in ("A->B", "B->A"):
        good, bad = oracle[direction], grey[direction]
        assert good["content_accuracy"] >= 0.95 and good["fid"] < 2 and good["cycle_l1"] < 0.05
        assert bad["content_accuracy"] < 0.2 and bad["fid"] > 50 * good["fid"] + 50
        # untranslated images show the digit in the wrong rendering: a classifier of the other
        # domain hardly reads them, and their FID lies between the oracle's and grey's
        assert good["content_accuracy_untranslated"] < 0.4
        assert good["fid"] < good["fid_untranslated"] < bad["fid"]
        assert all(isinstance(value, float) for value in good.values())
    assert oracle["protocol"]["A->B"]["num_samples"] == DOMAIN_NUM_SAMPLES["a"]
    assert evaluate_translation(g_ab, g_ba, out / "a", out / "b", device="cpu", num_samples=100) != oracle


def test_evaluation_is_deterministic(domains):
    out, _ = domains
    runs = [evaluate_translation(OracleAB(), OracleBA(), out / "a", out / "b", num_samples=300) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["protocol"]["B->A"]["num_samples"] == 300


def test_translation_grid_rows_are_input_translated_cycled(domains, tmp_path):
    out, _ = domains
    images = images_of(out / "a")[:5].float() / 127.5 - 1
    grid = translation_grid(OracleAB(), OracleBA(), images)
    assert grid.shape == (3, 5, 3, 32, 32)
    assert torch.equal(grid[0], images)
    assert torch.allclose(grid[1], OracleAB()(images))
    assert torch.allclose(grid[2], images, atol=1e-5)
    path = save_translation_grid(OracleAB(), OracleBA(), images, tmp_path / "grid.png")
    width, height = Image.open(path).size  # tiles 2 pixels apart, the rows labelled in a margin
    assert height == 3 * 32 + 2 * 2 and width > 5 * 32 + 4 * 2
