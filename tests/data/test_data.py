"""The DALI input pipeline and `shards check`, on CPU, from a generated image folder."""

from __future__ import annotations

import io
import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.check import check_shards
from pipeline.data.dali import DaliLoader, build_pipeline, loader_from_spec, part_size
from pipeline.data.shard_files import find_shards
from pipeline.data.shards import build_shards, write_index
from pipeline.errors import SpecError
from pipeline.spec import load_spec

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """3 classes x 10 images of mixed formats, plus a corrupt file; shards of 8 samples."""
    src = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        folder = src / f"class_{c}"
        folder.mkdir()
        for i in range(10):
            pixels = rng.integers(0, 255, (36 + i, 44, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            if i == 0:
                img.save(folder / f"{i}.png")
            elif i == 1:
                img.convert("L").save(folder / f"{i}.jpg")
            elif i == 2:
                img.convert("CMYK").save(folder / f"{i}.jpg")
            else:
                img.save(folder / f"{i}.jpg", quality=90)
    (src / "class_0" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path_factory.mktemp("shards")
    manifest = build_shards(src, out, shard_size=8, seed=0)
    assert manifest["num_samples"] == 30 and len(manifest["skipped"]) == 1
    return out


def expected_labels(root) -> dict[str, int]:
    labels = {}
    for sidecar in sorted(root.glob("*.json")):
        if sidecar.name != "manifest.json":
            labels |= {key: label for key, label, *_ in json.loads(sidecar.read_text())["samples"]}
    return labels


def read_keys(pipe, count: int) -> list[tuple[str, int]]:
    """(key, label) of the next `count` samples of a pipeline."""
    from pipeline.data.shard_files import parse_labels

    out = []
    while len(out) < count:
        _, cls = pipe.run()
        labels, _ = parse_labels(cls.as_array())
        out += [(cls[i].source_info().rsplit(":", 1)[1].split(".")[0], int(labels[i])) for i in range(len(cls))]
    return out[:count]


def test_round_trip_labels_counts_and_values(shard_dir):
    shards = find_shards(shard_dir)
    pipe = build_pipeline(shards, batch_size=7, resolution=16, shuffle=False)
    epoch = pipe.reader_meta("reader")["epoch_size"]
    assert epoch == 30
    samples = read_keys(pipe, epoch)
    assert dict(samples) == expected_labels(shard_dir)  # every key once, each with its label
    assert len({k for k, _ in samples}) == 30
    loader = DaliLoader(shards, batch_size=5, resolution=24, num_classes=NUM_CLASSES, flip=True, seed=1)
    x, y = next(loader)
    assert x.shape == (5, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert set(y.tolist()) <= set(range(NUM_CLASSES))


def test_bf16_output(shard_dir):
    loader = DaliLoader(
        find_shards(shard_dir), batch_size=4, resolution=16, num_classes=NUM_CLASSES, dtype=torch.bfloat16
    )
    assert next(loader)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("crop", ["center", "random", "random_resized"])
def test_crops(shard_dir, crop):
    loader = DaliLoader(find_shards(shard_dir), batch_size=4, resolution=20, num_classes=NUM_CLASSES, crop=crop)
    assert next(loader)[0].shape == (4, 3, 20, 20)


def test_load_size_squashes_the_whole_image_before_the_crop(tmp_path):
    # CycleGAN's resize_and_crop: the image resized to load_size x load_size (aspect ratio not kept),
    # then cropped; without it the shorter side is resized and the crop cuts the longer one
    src = tmp_path / "images" / "class_0"
    src.mkdir(parents=True)
    pixels = np.full((20, 40, 3), 255, dtype=np.uint8)
    pixels[:, :10] = 0  # the left quarter black
    Image.fromarray(pixels).save(src / "0.png")
    build_shards(src.parent, tmp_path / "shards", shard_size=8, seed=0)
    shards = find_shards(tmp_path / "shards")
    squashed, _ = next(DaliLoader(shards, batch_size=1, resolution=20, num_classes=1, load_size=20))
    cropped, _ = next(DaliLoader(shards, batch_size=1, resolution=20, num_classes=1))
    assert squashed.shape == cropped.shape == (1, 3, 20, 20)
    assert (squashed[0, :, :, :4] < -0.9).all() and (squashed[0, :, :, 6:] > 0.9).all()
    assert (cropped > 0.9).all()  # the center crop keeps columns 10-29: all white


def test_deterministic_by_seed(shard_dir):
    shards = find_shards(shard_dir)

    def batches(seed):
        loader = DaliLoader(
            shards, batch_size=6, resolution=16, num_classes=NUM_CLASSES, flip=True, seed=seed, shuffle_buffer=16
        )
        return [next(loader) for _ in range(4)]

    a, b, c = batches(3), batches(3), batches(4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(a, c, strict=True))


def test_two_ranks_see_disjoint_parts_covering_the_dataset(shard_dir):
    shards = find_shards(shard_dir)
    parts = []
    for rank in range(2):
        pipe = build_pipeline(shards, batch_size=4, resolution=16, shuffle=False, shard_id=rank, num_shards=2)
        epoch = part_size(pipe.reader_meta("reader")["epoch_size"], rank, 2)
        parts.append({k for k, _ in read_keys(pipe, epoch)})
    assert parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == set(expected_labels(shard_dir))
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_restored_position_gives_identical_batches(shard_dir):
    shards = find_shards(shard_dir)
    loader = DaliLoader(
        shards, batch_size=4, resolution=16, num_classes=NUM_CLASSES, flip=True, seed=5, shuffle_buffer=8
    )
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    following = [next(loader) for _ in range(5)]  # runs past the end of the epoch of 30
    resumed = DaliLoader(
        shards, batch_size=4, resolution=16, num_classes=NUM_CLASSES, flip=True, seed=5, shuffle_buffer=8, state=state
    )
    for (x, y), (x2, y2) in zip(following, (next(resumed) for _ in range(5)), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize(("parts", "ranks"), [(2, 1), (1, 2), (2, 4)])
def test_parts_shared_over_another_number_of_ranks_continue_every_part_exactly(shard_dir, parts, ranks):
    """A run read in PARTS parts (its first number of ranks), resumed on RANKS ranks from a checkpoint
    of its readers: together the ranks read exactly what the parts would have read (augmented alike),
    past the end of the epoch: no sample repeated or skipped."""
    from pipeline.data.parts import PartsLoader

    shards, global_batch = find_shards(shard_dir), 8

    def make(part, batch, state):
        return DaliLoader(
            shards,
            batch,
            16,
            NUM_CLASSES,
            flip=True,
            seed=5,
            shuffle_buffer=8,
            rank=part,
            world_size=parts,
            state=state,
        )

    before = [make(p, global_batch // parts, None) for p in range(parts)]
    for loader in before:
        for _ in range(2):
            next(loader)
    positions = {p: loader.state_dict() for p, loader in enumerate(before)}
    expected = [[next(loader) for _ in range(4)] for loader in before]  # 32 samples, past the epoch of 30
    readers = [PartsLoader(make, parts, r, ranks, global_batch // ranks, positions) for r in range(ranks)]
    for step in range(4):
        x, y = (torch.cat(t) for t in zip(*(next(reader) for reader in readers), strict=True))
        x_expected, y_expected = (torch.cat(t) for t in zip(*(e[step] for e in expected), strict=True))
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected), step
    assert all(reader.state_dict().keys() <= set(range(parts)) for reader in readers)


def test_parts_that_ranks_cannot_share_are_refused_naming_both_numbers():
    from pipeline.data.parts import share

    with pytest.raises(SpecError, match="read in 2 parts .* which 3 ranks cannot share") as caught:
        share(2, 0, 3, 8)
    assert "divides 2 or is a multiple of it" in caught.value.issues[0].format()
    with pytest.raises(SpecError, match="micro-batch of 3 per rank does not split into 2"):
        share(4, 0, 2, 3)
    assert share(4, 1, 2, 8) == ([2, 3], 4, None)
    assert share(2, 3, 4, 8) == ([1], 16, slice(8, 16))


# ----- errors a user will make -----
def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(path)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_no_shards_match(tmp_path):
    with pytest.raises(SpecError, match="no .tar shards match"):
        find_shards(tmp_path / "nothing-*.tar")


def test_missing_dali_names_the_extras_to_install(shard_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    with pytest.raises(SpecError) as info:
        build_pipeline(find_shards(shard_dir), batch_size=2, resolution=32)
    text = str(info.value)
    assert "needs NVIDIA DALI" in text
    assert all(extra in text for extra in ("'.[cuda13]'", "'.[cuda12]'", "'.[cpu]'"))


def test_missing_index_files(tmp_path):
    write_tar(tmp_path / "a.tar", [("k1.jpg", jpeg()), ("k1.cls", b"1")])
    (tmp_path / "a.idx").unlink()
    with pytest.raises(SpecError) as info:
        find_shards(tmp_path)
    assert "no DALI index file" in str(info.value) and "shards index" in str(info.value)


def test_non_integer_and_out_of_range_labels_name_shard_and_key(tmp_path):
    write_tar(tmp_path / "a.tar", [("k1.jpg", jpeg()), ("k1.cls", b"1"), ("k2.jpg", jpeg()), ("k2.cls", b"cat")])
    shards = find_shards(tmp_path)
    with pytest.raises(SpecError) as info:
        next(DaliLoader(shards, batch_size=2, resolution=16, num_classes=3, shuffle=False))
    assert "sample 'k2'" in str(info.value) and "a.tar" in str(info.value) and "'cat'" in str(info.value)
    with pytest.raises(SpecError, match="sample 'k1' .* has label '1', not an integer in 0..0"):
        next(DaliLoader(shards, batch_size=2, resolution=16, num_classes=1, shuffle=False))
    skipping = DaliLoader(shards, batch_size=2, resolution=16, num_classes=3, shuffle=False, on_bad_sample="skip")
    x, y = next(skipping)
    assert y.tolist() == [1] and x.shape[0] == 1 and skipping.skipped == 1


def test_missing_cls_is_an_error_or_a_counted_skip(tmp_path):
    write_tar(
        tmp_path / "a.tar",
        [("k1.jpg", jpeg()), ("k1.cls", b"2"), ("k2.jpg", jpeg()), ("k3.jpg", jpeg()), ("k3.cls", b"0")],
    )
    shards = find_shards(tmp_path)
    failed = r"readers.webdataset failed: Underful sample .*a\.idx.* \(shard a\.tar\)"
    with pytest.raises(SpecError, match=failed) as info:
        DaliLoader(shards, batch_size=2, resolution=16, num_classes=3, shuffle=False)
    assert "lacks its .jpg or .cls" in str(info.value)
    loader = DaliLoader(shards, batch_size=2, resolution=16, num_classes=3, shuffle=False, on_bad_sample="skip")
    assert loader.epoch_size == 2  # k2 skipped, never labelled 0
    assert sorted(next(loader)[1].tolist()) == [0, 2]


def test_batch_larger_than_dataset(shard_dir):
    with pytest.raises(SpecError, match="larger than this rank's 30 samples"):
        DaliLoader(find_shards(shard_dir), batch_size=31, resolution=16, num_classes=NUM_CLASSES)


def test_loader_from_spec_and_resolution_warning(shard_dir, copy_shards, tmp_path):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    spec = load_spec("tiny_biggan", [f"data.shards={shard_dir}", "data.num_classes=3", "train.batch_size=4"]).spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = next(loader_from_spec(spec))
    assert x.shape == (4, 3, 32, 32)
    small = copy_shards(shard_dir, tmp_path / "small")
    manifest["options"]["resolution"] = 16
    (small / "manifest.json").write_text(json.dumps(manifest))
    spec = load_spec("tiny_biggan", [f"data.shards={small}", "data.num_classes=3", "train.batch_size=4"]).spec
    with pytest.warns(UserWarning, match="larger than the shards' stored resolution 16"):
        loader_from_spec(spec)
    with pytest.raises(SpecError, match="data.shards: not set"):
        loader_from_spec(load_spec("tiny_biggan").spec)


# ----- shards check -----
def test_check_passes_on_good_shards(shard_dir, cli):
    report = check_shards(shard_dir)
    assert report.ok and report.num_samples == 30, report.problems
    result = cli("shards", "check", shard_dir, "--json")
    assert result.code == 0 and json.loads(result.out)["ok"]


def test_check_names_corrupt_shard_and_key(shard_dir, copy_shards, tmp_path, cli):
    bad = copy_shards(shard_dir, tmp_path / "bad")
    first = json.loads((bad / "manifest.json").read_text())["shards"][0]["file"]
    samples = json.loads((bad / first.replace(".tar", ".json")).read_text())
    victim = samples["samples"][2][0]
    # overwrite the middle of one sample's JPEG inside the tar
    data = bytearray((bad / first).read_bytes())
    with tarfile.open(bad / first) as tar:
        member = tar.getmember(f"{victim}.jpg")
    start = member.offset_data + 2
    data[start : start + 400] = b"\xff" * 400
    (bad / first).write_bytes(bytes(data))
    result = cli("shards", "check", bad, "--json")
    assert result.code == 2
    problems = json.loads(result.out)["problems"]
    assert {
        "shard": first,
        "key": None,
        "problem": "sha256 differs from the manifest: the file changed or is corrupt",
    } in problems
    assert any(p["key"] == victim and "does not decode" in p["problem"] for p in problems), problems


def test_check_names_wrong_labels(shard_dir, copy_shards, tmp_path, cli):
    bad = copy_shards(shard_dir, tmp_path / "labels")
    first = json.loads((bad / "manifest.json").read_text())["shards"][0]["file"]
    sidecar = bad / first.replace(".tar", ".json")
    samples = json.loads(sidecar.read_text())
    key, label = samples["samples"][3][:2]
    samples["samples"][3][1] = (label + 1) % NUM_CLASSES
    sidecar.write_text(json.dumps(samples))
    report = check_shards(bad)
    assert report.problems == [
        {"shard": first, "key": key, "problem": f"label {label}, sidecar says {(label + 1) % NUM_CLASSES}"}
    ]
