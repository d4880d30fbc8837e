"""README's "Train on your own images", end to end through the CLI, on generated images: a folder of
class folders -> `shards build` -> a spec copied from specs/demo.yaml with its data keys changed ->
`validate` -> `train` (the feature classifier of its evaluation trained on demand) -> `sample` ->
`eval`; and the refusals that leave nothing behind."""

from __future__ import annotations

import json
import math
import re

import pytest

from pipeline.eval.classifier import MIN_IMAGES

# three classes told apart by colour and shape, as a person's folders might be
SHAPES = {
    "circles": ((220, 40, 40), "ellipse"),
    "squares": ((40, 200, 60), "rectangle"),
    "triangles": ((40, 60, 220), ""),
}


def write_image_folder(root, num_per_class: int = 20, size: int = 40, classes=SHAPES) -> None:
    """ROOT/CLASS/N.png|jpg: a filled shape of the class's colour at a random place and size, half
    PNG and half JPEG, on a dark background."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for name, (colour, shape) in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(num_per_class):
            image = Image.new("RGB", (size, size), (rng.randint(0, 40),) * 3)
            draw = ImageDraw.Draw(image)
            side = rng.randint(size // 3, size // 2)
            x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            if shape:
                getattr(draw, shape)((x, y, x + side, y + side), fill=colour)
            else:
                draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=colour)
            image.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def own_spec(root, tmp_path, shards, num_classes: int) -> str:
    """specs/demo.yaml with the keys README's walkthrough changes: data.shards and data.num_classes
    (data.resolution stays 32: the images are 40px, built at --resolution 32)."""
    text = (root / "specs" / "demo.yaml").read_text()
    text, n_shards = re.subn(r"(?m)^  shards: .*$", f"  shards: {shards}", text)
    text, n_classes = re.subn(r"(?m)^  num_classes: .*$", f"  num_classes: {num_classes}", text)
    assert n_shards == n_classes == 1, "specs/demo.yaml changed: update README's walkthrough and this test"
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


TINY = [
    "train.max_steps=2",
    "train.batch_size=8",
    "train.log_every=1",
    "eval.every=2",
    "eval.num_samples=30",
    "eval.standing_stats=1",
]


@pytest.mark.slow
def test_train_on_your_own_images(cli, root, tmp_path, metrics):
    write_image_folder(tmp_path / "images")
    shards = tmp_path / "shards"

    result = cli("shards", "build", tmp_path / "images", shards, "--resolution", "32")
    assert result.code == 0, result.err
    manifest = json.loads((shards / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["num_classes"]) == (60, 3)
    assert manifest["classes"] == {"circles": 0, "squares": 1, "triangles": 2}

    spec = own_spec(root, tmp_path, shards, num_classes=3)
    result = cli("validate", spec)
    assert result.code == 0, result.err
    assert "`train` has what it needs" in result.out
    assert f"first trains the feature classifier on {shards}" in result.out

    run_dir = tmp_path / "runs" / "mine"
    result = cli("train", f"spec={spec}", f"run.dir={run_dir}", *TINY)
    assert result.code == 0, result.err
    assert f"training the feature classifier (eval.features: demo) on {shards}: 60 images of 3 classes" in result.err
    assert re.search(r"feature classifier trained in [\d.]+ s, held-out accuracy [\d.]+% \(12 images\)", result.err)
    record = json.loads((shards / "classifier.json").read_text())
    assert record["num_held_out"] == 12 and record["held_out_accuracy"] > 0.5  # distinct colours: easy
    scores = [r for r in metrics(run_dir) if "fid" in r]
    assert [r["step"] for r in scores] == [0, 2]
    assert all(math.isfinite(r["fid"]) and r["eval_protocol"]["feature_net_input_size"] == 32 for r in scores)
    assert (run_dir / "export" / "generator.safetensors").is_file()
    assert "last evaluation, step 2: FID" in result.err

    # the classifier is kept: validate no longer announces it, and the next run trains none
    assert "first trains the feature classifier" not in cli("validate", spec).out

    result = cli("sample", run_dir, "--num", "2", "--out", tmp_path / "samples")
    assert result.code == 0, result.err
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 3 * 2

    result = cli("eval", run_dir, "--num", "30")
    assert result.code == 0, result.err
    written = json.loads(next((run_dir / "eval").glob("step-00000002-*.json")).read_text())
    assert math.isfinite(written["results"][0]["fid"])


def test_a_refused_run_leaves_nothing_behind(cli, root, tmp_path):
    """Shards of one class: validate says the evaluation cannot work and how to switch it off; train
    refuses before anything is built and writes no run directory."""
    write_image_folder(tmp_path / "images", num_per_class=MIN_IMAGES, classes={"only": SHAPES["circles"]})
    shards = tmp_path / "shards"
    assert cli("shards", "build", tmp_path / "images", shards).code == 0
    spec = own_spec(root, tmp_path, shards, num_classes=1)

    result = cli("validate", spec)
    assert result.code == 0, result.err
    assert "eval.features: the feature classifier of eval.features=demo learns to tell the classes" in result.out
    assert "switch evaluation during training off: eval.every=0" in result.out

    run_dir = tmp_path / "runs" / "mine"
    result = cli("train", f"spec={spec}", f"run.dir={run_dir}", *TINY)
    assert result.code == 2
    assert "they hold 1 class" in result.err and "eval.every=0" in result.err
    assert not run_dir.exists()
    assert not (shards / "classifier.safetensors").exists()


def test_a_run_refused_after_it_began_removes_the_directory_it_made(demo_shards, tmp_path, monkeypatch):
    """A refusal raised once the run directory exists (here: opening the data) removes it, when this
    call made it and nothing was logged; an existing run directory is kept."""
    from pipeline.errors import SpecError, user_error
    from pipeline.spec import load_spec
    from pipeline.train import loop

    def refuse(*args, **kwargs):
        raise user_error("refused for the test")

    monkeypatch.setattr(loop, "open_streams", refuse)
    run_dir = tmp_path / "run"
    spec = load_spec("demo", [f"data.shards={demo_shards}", f"run.dir={run_dir}", "eval.every=0"])
    with pytest.raises(SpecError, match="refused for the test"):
        loop.train(spec)
    assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(SpecError):
        loop.train(spec)
    assert (run_dir / "notes.txt").read_text() == "mine"
