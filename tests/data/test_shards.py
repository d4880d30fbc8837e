"""Writing WebDataset shards: formats, labels, shuffling, determinism, resuming and user errors."""

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import shards as shards_module
from pipeline.data.shards import build_shards, encode_image, write_samples
from pipeline.errors import SpecError

CLASSES = ["n01440764", "n01443537", "n01484850"]  # sorted: labels 0, 1, 2
CORRUPT = {"n01484850/notimage.jpg", "n01484850/truncated.jpg"}


def _picture(rng, w, h) -> np.ndarray:
    """A smooth colour gradient with a little noise: JPEG-friendly, different per image."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3) + np.stack([x * 3.0, y * 2.0, (x + y) * 1.5], axis=-1)
    return (base + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)


def make_source(root: Path) -> dict[str, tuple[int, int]]:
    """3 classes x 8 images (odd formats, 2 corrupt) plus files a build must ignore; {source: size}."""
    rng = np.random.default_rng(0)
    sizes = {}

    def save(rel, img, **kw):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        sizes[rel] = img.size

    for label, name in enumerate(CLASSES):
        for i in range(6 if label < 2 else 4):
            w, h = 40 + 4 * i + label, 30 + 3 * i
            if i % 2:
                w, h = h, w  # some portrait images
            save(f"{name}/rgb_{i}.jpg", Image.fromarray(_picture(rng, w, h)), quality=90)
    a, b, c = CLASSES
    save(f"{a}/png.png", Image.fromarray(_picture(rng, 44, 33)))
    save(f"{a}/gray.jpg", Image.fromarray(_picture(rng, 36, 40)).convert("L"))
    save(f"{b}/cmyk.jpg", Image.fromarray(_picture(rng, 50, 32)).convert("CMYK"))
    rgba = np.dstack([_picture(rng, 38, 34), np.full((34, 38), 255, np.uint8)])
    rgba[:, :10, 3] = 0  # a transparent strip: white once composited
    save(f"{b}/rgba.png", Image.fromarray(rgba, "RGBA"))
    save(f"{c}/small.jpg", Image.fromarray(_picture(rng, 16, 20)), quality=90)
    save(f"{c}/palette.png", Image.fromarray(_picture(rng, 40, 30)).convert("P"))
    good = io.BytesIO()
    Image.fromarray(_picture(rng, 60, 45)).save(good, "JPEG")
    (root / c / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / c / "notimage.jpg").write_text("this is not a JPEG\n")
    (root / c / "notes.txt").write_text("not an image suffix: ignored\n")
    (root / c / ".hidden.jpg").write_text("hidden: ignored\n")
    (root / "README.md").write_text("files directly in SRC are ignored\n")
    return sizes


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("images")
    return root, make_source(root)


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards")
    return out, build_shards(source[0], out, shard_size=5, seed=0, num_workers=2)


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def sidecars(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def written_sources(out: Path) -> list[str]:
    """Source paths in stored order, over all shards."""
    return [source for sc in sidecars(out) for _, _, source, *_ in sc["samples"]]


# --- what is written ------------------------------------------------------------------------------


def test_counts_classes_and_skipped(source, built):
    out, manifest = built
    assert manifest["num_samples"] == 22
    assert manifest["num_classes"] == 3
    assert manifest["classes"] == {name: i for i, name in enumerate(CLASSES)}
    assert manifest["class_counts"] == {"0": 8, "1": 8, "2": 6}
    assert {s["path"] for s in manifest["skipped"]} == CORRUPT
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert "truncated" in reasons["n01484850/truncated.jpg"].lower()
    assert "not an image" in reasons["n01484850/notimage.jpg"]
    assert sum(s["num_samples"] for s in manifest["shards"]) == 22
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{n:06d}.tar" for n in range(5)]  # 24 planned / 5
    assert manifest["options"] == {"shard_size": 5, "resolution": None, "seed": 0, "quality": 95, "csv": None}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.glob("*.tmp")) and not (out / ".build.lock").exists()


def test_every_sample_is_an_rgb_jpeg_with_its_label(source, built):
    out, manifest = built
    for entry, sidecar in zip(manifest["shards"], sidecars(out), strict=True):
        members = tar_members(out / entry["file"])
        assert [name for name, _ in members] == [
            f"{key}.{ext}" for key, *_ in sidecar["samples"] for ext in ("cls", "jpg")
        ]
        for (_cls_name, cls_bytes), (_jpg_name, jpg_bytes), (key, label, src, digest) in zip(
            members[::2], members[1::2], sidecar["samples"], strict=True
        ):
            assert cls_bytes == str(label).encode() and cls_bytes.isdigit()
            assert digest == hashlib.sha256(jpg_bytes).hexdigest()[:16]
            assert "." not in key and len(key) == shards_module.KEY_WIDTH
            with Image.open(io.BytesIO(jpg_bytes)) as img:
                assert (img.format, img.mode) == ("JPEG", "RGB")
                img.load()
                assert img.size == source[1][src]
            assert label == CLASSES.index(src.split("/")[0])
    assert sorted(written_sources(out)) == sorted(set(source[1]) - CORRUPT)


def test_conversions(built):
    out, _ = built
    stored = {
        src: data
        for sc, entry in zip(sidecars(out), built[1]["shards"], strict=True)
        for (_, _, src, *_), (_, data) in zip(sc["samples"], tar_members(out / entry["file"])[1::2], strict=True)
    }
    rgba = np.asarray(Image.open(io.BytesIO(stored["n01443537/rgba.png"])))
    assert rgba[:, :8].min() >= 245  # the transparent strip is white
    gray = np.asarray(Image.open(io.BytesIO(stored["n01440764/gray.jpg"]))).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 4  # still grey, now in three channels


def test_rgb_jpegs_are_copied_byte_for_byte(source, built):
    out, manifest = built
    stored = {
        src: data
        for sc, entry in zip(sidecars(out), manifest["shards"], strict=True)
        for (_, _, src, *_), (_, data) in zip(sc["samples"], tar_members(out / entry["file"])[1::2], strict=True)
    }
    for src in ("n01440764/rgb_0.jpg", "n01484850/small.jpg"):
        assert stored[src] == (source[0] / src).read_bytes()
    assert stored["n01440764/gray.jpg"] != (source[0] / "n01440764/gray.jpg").read_bytes()  # re-encoded


def test_index_files_and_checksums(built):
    out, manifest = built
    for entry, sidecar in zip(manifest["shards"], sidecars(out), strict=True):
        lines = (out / entry["index"]).read_text().splitlines()
        assert lines[0] == f"v1.2 {entry['num_samples']}"
        assert len(lines) == entry["num_samples"] + 1
        assert entry["sha256"] == sha256(out / entry["file"]) == sidecar["sha256"]
        assert entry["size"] == (out / entry["file"]).stat().st_size == sidecar["size"]
        assert entry["num_samples"] == sidecar["num_samples"] == len(sidecar["samples"])
        assert entry["class_counts"] == sidecar["class_counts"]


def test_shuffled_and_deterministic(source, built, tmp_path):
    out, manifest = built
    labels = [label for sc in sidecars(out) for _, label, *_ in sc["samples"]]
    assert labels != sorted(labels)  # not class-sorted
    again = build_shards(source[0], tmp_path / "again", shard_size=5, seed=0, num_workers=1)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    for entry in manifest["shards"]:
        assert (tmp_path / "again" / entry["file"]).read_bytes() == (out / entry["file"]).read_bytes()
    build_shards(source[0], tmp_path / "other", shard_size=5, seed=1)
    assert written_sources(tmp_path / "other") != written_sources(out)
    assert sorted(written_sources(tmp_path / "other")) == sorted(written_sources(out))


def test_resolution_downscales_the_shorter_side(source, tmp_path):
    manifest = build_shards(source[0], tmp_path, shard_size=100, resolution=24)
    assert manifest["options"]["resolution"] == 24
    (sidecar,) = sidecars(tmp_path)
    members = tar_members(tmp_path / manifest["shards"][0]["file"])[1::2]
    for (_, _, src, *_), (_, data) in zip(sidecar["samples"], members, strict=True):
        w0, h0 = source[1][src]
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.mode) == ("JPEG", "RGB")
        if min(w0, h0) <= 24:  # never upscaled, and an RGB JPEG left as it is
            assert img.size == (w0, h0)
            assert data == (source[0] / src).read_bytes()
        else:
            assert min(img.size) == 24
            assert abs(img.size[0] / img.size[1] - w0 / h0) < 0.05


def _jpeg(pixels: np.ndarray, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 6])  # 6: stored turned, shown upright
def test_a_jpeg_twice_the_resolution_is_decoded_at_reduced_size_then_resized_exactly(monkeypatch, orientation):
    # libjpeg's DCT scaling (PIL's draft) decodes 500x375 at 250x188 for a 128 result; the size is
    # still the one of the full image (171x128, where 250x188 would give 170x128)
    data = _jpeg(_picture(np.random.default_rng(1), 500, 375), orientation)
    reduced = Image.open(io.BytesIO(encode_image(data, resolution=128)))
    monkeypatch.setattr(shards_module, "REDUCED_DECODING", False)
    full = Image.open(io.BytesIO(encode_image(data, resolution=128)))
    upright = (171, 128) if orientation == 1 else (128, 171)
    assert reduced.size == full.size == upright
    difference = np.abs(np.asarray(reduced, np.float32) - np.asarray(full, np.float32))
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 3, (difference.mean(), difference.max())
    # below twice the resolution nothing changes: the same bytes as a full decode
    smaller = _jpeg(_picture(np.random.default_rng(2), 250, 200), orientation)
    monkeypatch.setattr(shards_module, "REDUCED_DECODING", True)
    kept = encode_image(smaller, resolution=128)
    monkeypatch.setattr(shards_module, "REDUCED_DECODING", False)
    assert kept == encode_image(smaller, resolution=128)


def test_an_rgb_jpeg_kept_as_it_is_is_still_validated_in_full(tmp_path):
    # checked at 1/8 scale, every coefficient is still entropy-decoded: a cut file fails as before
    data = _jpeg(_picture(np.random.default_rng(3), 400, 300))
    assert encode_image(data) == data
    for cut in (len(data) // 2, len(data) - 200):
        with pytest.raises(OSError, match="truncated"):
            encode_image(data[:cut])


# --- resuming -------------------------------------------------------------------------------------


def _stamp_old(out: Path) -> None:
    for path in out.iterdir():
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))


def test_restart_rewrites_only_unfinished_shards(source, built, tmp_path):
    reference_out, reference = built
    out = tmp_path / "shards"
    shutil.copytree(reference_out, out)
    _stamp_old(out)
    (out / "shard-000002.json").unlink()  # interrupted after writing the tar and index of shard 2
    (out / "shard-000002.tar.tmp").write_bytes(b"half a tar")  # and leftovers of an interrupted write
    (out / "shard-000004.json.tmp").write_text("{}")
    with open(out / "shard-000003.tar", "r+b") as f:  # a tar cut short under its sidecar
        f.truncate(1024)
    manifest = build_shards(source[0], out, shard_size=5, seed=0)
    assert manifest == reference
    changed = {p.name for p in out.iterdir() if p.stat().st_mtime_ns != 1_000_000_000}
    assert changed == {f"shard-00000{n}.{ext}" for n in (2, 3) for ext in ("tar", "idx", "json")} | {"manifest.json"}
    for path in reference_out.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert not list(out.glob("*.tmp"))


def test_an_interrupted_run_leaves_no_manifest_and_resumes(source, built, tmp_path, monkeypatch):
    write_json = shards_module._write_json
    calls = []

    def fail_on_third_sidecar(path, obj):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(shards_module, "_write_json", fail_on_third_sidecar)
    with pytest.raises(KeyboardInterrupt):
        build_shards(source[0], tmp_path, shard_size=5, seed=0)
    monkeypatch.undo()
    assert not (tmp_path / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.glob("shard-*.json")) == ["shard-000000.json", "shard-000001.json"]
    assert build_shards(source[0], tmp_path, shard_size=5, seed=0) == built[1]
    assert sha256(tmp_path / "shard-000004.tar") == sha256(built[0] / "shard-000004.tar")


def test_shards_of_another_build_are_an_error_unless_overwritten(source, built, tmp_path):
    shutil.copytree(built[0], tmp_path / "shards")
    with pytest.raises(SpecError) as err:
        build_shards(source[0], tmp_path / "shards", shard_size=5, seed=1)
    assert "other options" in str(err.value) and "seed 0 there, 1 now" in str(err.value)
    assert "overwrite" in err.value.issues[0].hint
    manifest = build_shards(source[0], tmp_path / "shards", shard_size=5, seed=1, overwrite=True)
    assert manifest["options"]["seed"] == 1 and len(sidecars(tmp_path / "shards")) == 5


def test_one_build_at_a_time(source, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with shards_module._Lock(tmp_path):
        err = _error(build_shards, source[0], tmp_path, shard_size=5)
    assert "another build is writing" in str(err)
    assert build_shards(source[0], tmp_path, shard_size=5)["num_samples"] == 22


# --- the shared core, CSV sources, user errors --------------------------------------------------


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_write_samples_from_memory(tmp_path):
    deep = Image.fromarray(np.full((12, 10), 65535, np.uint16))  # a 16-bit grey PNG
    assert deep.mode.startswith("I")
    exif = Image.Exif()
    exif[shards_module.EXIF_ORIENTATION] = 6  # stored landscape, shown portrait
    rotated = io.BytesIO()
    Image.new("RGB", (20, 10), "red").save(rotated, "JPEG", exif=exif)
    samples = [
        ("a", Image.new("RGB", (8, 8), "blue"), 0),
        ("b", b"junk", 1),  # alone in its shard: the shard is left out, not written empty
        ("c", _encoded(deep, "PNG"), 1),
        ("d", rotated.getvalue(), 0),
        ("e", _encoded(Image.new("LA", (6, 6), (0, 0)), "PNG"), 0),
    ]
    manifest = write_samples(samples, tmp_path, classes={"zero": 0, "one": 1}, source="memory", shard_size=1)
    assert manifest["num_samples"] == 4 and len(manifest["shards"]) == 4
    assert manifest["skipped"] == [{"path": "b", "reason": "not an image PIL can read (unknown format)"}]
    empty = [sc for sc in sidecars(tmp_path) if sc["file"] is None]
    assert len(empty) == 1 and empty[0]["skipped"][0][2] == "b"
    assert len(list(tmp_path.glob("*.tar"))) == len(list(tmp_path.glob("*.idx"))) == 4
    stored = {
        sc["samples"][0][2]: Image.open(io.BytesIO(tar_members(tmp_path / sc["file"])[1][1]))
        for sc in sidecars(tmp_path)
        if sc["file"]
    }
    assert np.asarray(stored["c"]).min() >= 250  # 65535 -> 255
    assert stored["d"].size == (10, 20) and "exif" not in stored["d"].info
    assert np.asarray(stored["e"]).max() >= 250  # transparent -> white
    assert encode_image(rotated.getvalue()) != rotated.getvalue()


def test_csv_source(source, tmp_path):
    rows = [
        "path,label",
        "n01440764/rgb_0.jpg,2",
        "n01443537/cmyk.jpg,0",
        "",
        "n01484850/small.jpg,1",
        "n01484850/truncated.jpg,1",
    ]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    manifest = build_shards(source[0], tmp_path / "out", csv=tmp_path / "list.csv", shard_size=2)
    assert manifest["num_samples"] == 3 and manifest["num_classes"] == 3
    assert manifest["classes"] == {"0": 0, "1": 1, "2": 2}
    assert manifest["options"]["csv"] == str((tmp_path / "list.csv").resolve())
    labels = {src: label for sc in sidecars(tmp_path / "out") for _, label, src, *_ in sc["samples"]}
    assert labels == {"n01440764/rgb_0.jpg": 2, "n01443537/cmyk.jpg": 0, "n01484850/small.jpg": 1}
    assert [s["path"] for s in manifest["skipped"]] == ["n01484850/truncated.jpg"]


def _error(call, *args, **kwargs) -> SpecError:
    with pytest.raises(SpecError) as err:
        call(*args, **kwargs)
    return err.value


def test_user_errors(source, tmp_path):
    err = _error(build_shards, tmp_path / "nowhere", tmp_path / "out")
    assert "does not exist" in str(err) and err.issues[0].hint
    (tmp_path / "empty").mkdir()
    assert "is empty" in str(_error(build_shards, tmp_path / "empty", tmp_path / "out"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.jpg")
    err = _error(build_shards, tmp_path / "flat", tmp_path / "out")
    assert "no class folders" in str(err) and "csv" in err.issues[0].hint
    (tmp_path / "flat" / "cat").mkdir()
    assert "holds no images" in str(_error(build_shards, tmp_path / "flat", tmp_path / "out"))
    err = _error(build_shards, source[0], source[0] / "shards")
    assert "inside the source folder" in str(err)
    (tmp_path / "file").write_text("")
    assert "not a folder" in str(_error(build_shards, source[0], tmp_path / "file"))
    err = _error(build_shards, source[0], tmp_path / "out", shard_size=0)
    assert err.issues[0].path == "shard_size"


def test_bad_csv_rows_are_named(source, tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text(
        "n01440764/rgb_0.jpg,0\nn01440764/rgb_1.jpg,tench\nn01440764/rgb_2.jpg\n"
        "missing.jpg,1\n../outside.jpg,1\nn01440764/rgb_0.jpg,0\n"
    )
    err = _error(build_shards, source[0], tmp_path / "out", csv=csv)
    assert [(i.line, i.file) for i in err.issues] == [(n, str(csv)) for n in (2, 3, 4, 5, 6)]
    messages = [i.message for i in err.issues]
    assert "label 'tench' is not an integer" in messages[0] and "folder" in err.issues[0].hint
    assert "1 field(s), expected 2" in messages[1]
    assert "missing.jpg is not a file" in messages[2]
    assert "not relative" in messages[3] and "listed twice (first at line 1)" in messages[4]
    assert "does not exist" in str(_error(build_shards, source[0], tmp_path / "out", csv=tmp_path / "none.csv"))


# --- the demo data ------------------------------------------------------------------------------


def test_demo_shards(tmp_path):
    from pipeline.data.demo import build_demo_shards, demo_shards_ready

    out = tmp_path / "demo"
    assert not demo_shards_ready(out)
    manifest = build_demo_shards(out)
    assert manifest["num_samples"] == 1797 and manifest["num_classes"] == 10
    assert manifest["classes"] == {str(d): d for d in range(10)}
    assert len(manifest["class_counts"]) == 10 and len(manifest["shards"]) == 4
    assert demo_shards_ready(out)
    for entry in manifest["shards"]:
        for name, data in tar_members(out / entry["file"]):
            if name.endswith(".jpg"):
                img = Image.open(io.BytesIO(data))
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
    (out / manifest["shards"][1]["file"]).unlink()
    assert not demo_shards_ready(out)


# --- hostile input: CSV -------------------------------------------------------------------------


def test_csv_labels_are_bounded_and_named_by_line(source, tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text("n01440764/rgb_0.jpg,0\nn01440764/rgb_1.jpg,1000000000\nn01440764/rgb_2.jpg," + "9" * 5000 + "\n")
    err = _error(build_shards, source[0], tmp_path / "out", csv=csv)  # a billion-entry class map would hang here
    assert [(i.file, i.line) for i in err.issues] == [(str(csv), 2), (str(csv), 3)]
    assert f"below {shards_module.MAX_CSV_CLASSES:,}" in err.issues[0].message
    assert "label 1000000000 is too large" in err.issues[0].message and "0..K-1" in err.issues[0].hint
    assert "99999999999999999999..." in err.issues[1].message
    csv.write_text("n01440764/rgb_0.jpg,٣\nn01440764/rgb_1.jpg,1_0\nn01440764/rgb_2.jpg,-0\n")
    err = _error(build_shards, source[0], tmp_path / "out", csv=csv)
    assert [i.line for i in err.issues] == [1, 2] and all("not an integer" in i.message for i in err.issues)
    largest = shards_module.MAX_CSV_CLASSES - 1
    csv.write_text(f"n01440764/rgb_0.jpg,0\nn01440764/rgb_1.jpg,{largest}\nn01440764/rgb_2.jpg,+007\n")
    samples, classes = shards_module.csv_samples(source[0], csv)
    assert [label for _, _, label in samples] == [0, largest, 7] and len(classes) == largest + 1


def test_csv_must_be_utf8(source, tmp_path):
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("path,label\nn01440764/rgb_0.jpg,0\ncafé/x.jpg,1\n".encode("latin-1"))
    err = _error(build_shards, source[0], tmp_path / "out", csv=csv)
    (issue,) = err.issues
    assert (issue.file, issue.line) == (str(csv), 3)
    assert "not UTF-8" in issue.message and "byte offset 36 (0xe9)" in issue.message and "iconv" in issue.hint
    csv.write_bytes(b"\xef\xbb\xbfn01440764/rgb_0.jpg,0\n\xff,1\n")  # a byte order mark is not counted twice
    issue = _error(build_shards, source[0], tmp_path / "out", csv=csv).issues[0]
    assert issue.line == 2 and "byte offset 25 (0xff)" in issue.message
    csv.write_bytes(b"\xef\xbb\xbfn01440764/rgb_0.jpg,0\n")
    assert [s[0] for s in shards_module.csv_samples(source[0], csv)[0]] == ["n01440764/rgb_0.jpg"]
    csv.write_bytes(b"n01440764/rgb_0.jpg,0\n" + b"x" * 200_000 + b",1\n")  # over the csv module's field limit
    issue = _error(build_shards, source[0], tmp_path / "out", csv=csv).issues[0]
    assert issue.line == 2 and "cannot parse the CSV" in issue.message


def test_cli_reports_a_bad_csv_without_a_traceback(source, tmp_path, cli):
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"n01440764/rgb_0.jpg,0\nn01440764/\xe9.jpg,1000000000\n")
    result = cli("shards", "build", source[0], tmp_path / "out", "--csv", csv)
    assert result.code == 2 and "Traceback" not in result.err
    assert f"{csv}:2: " in result.err and "not UTF-8" in result.err


# --- hostile input: shards check ----------------------------------------------------------------


@pytest.fixture
def checked(built, tmp_path) -> tuple[Path, dict, list[tuple[str, bytes]]]:
    """A private copy of the built shards, its manifest, and the members of its first shard.

    The first shard is made a full one (5 samples): the fixture swaps the manifest's order of shards.
    """
    out = tmp_path / "shards"
    shutil.copytree(built[0], out)
    manifest = json.loads(json.dumps(built[1]))
    full = next(i for i, s in enumerate(manifest["shards"]) if s["num_samples"] == 5)
    manifest["shards"].insert(0, manifest["shards"].pop(full))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, manifest, tar_members(out / manifest["shards"][0]["file"])


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _problems(report) -> list[tuple[str, str | None, str]]:
    return [(p["shard"], p["key"], p["problem"]) for p in report.problems]


def test_check_names_each_broken_sample_of_a_changed_shard(checked):
    from pipeline.data.check import check_shards

    out, manifest, members = checked
    first, second = manifest["shards"][0]["file"], manifest["shards"][1]["file"]
    assert check_shards(out).ok
    samples = {}  # key -> {ext: data}
    for name, data in members:
        samples.setdefault(name.split(".")[0], {})[name.split(".")[1]] = data
    k = sorted(samples)
    assert len(k) == 5
    bad = [
        (f"{k[0]}.jpg", samples[k[0]]["jpg"]),  # its .cls is missing
        (f"{k[1]}.cls", samples[k[1]]["cls"]),  # its .jpg is missing
        (f"{k[2]}.cls", b"two"),
        (f"{k[2]}.jpg", samples[k[2]]["jpg"]),
        (f"{k[3]}.cls", b"7"),  # 3 classes
        (f"{k[3]}.jpg", samples[k[3]]["jpg"]),
        (f"{k[4]}.cls", samples[k[4]]["cls"]),
        (f"{k[4]}.jpg", samples[k[4]]["jpg"][:40]),
        (f"{k[4]}.cls", samples[k[4]]["cls"]),  # the sample again: a duplicate key
        (f"{k[4]}.jpg", samples[k[4]]["jpg"]),
        ("999999999.cls", b"0"),
        ("999999999.jpg", samples[k[0]]["jpg"]),  # a sample the sidecar does not list
    ]
    _write_tar(out / first, bad)
    problems = _problems(check_shards(out))
    assert problems[0] == (first, None, "sha256 differs from the manifest: the file changed or is corrupt")
    by_key = {}
    for shard, key, problem in problems[1:]:
        assert shard == first
        by_key.setdefault(key, []).append(problem)
    assert by_key[k[0]] == [f"label {k[0]}.cls is missing (only {k[0]}.jpg is there)"]
    assert by_key[k[1]] == [f"image {k[1]}.jpg is missing (only {k[1]}.cls is there)"]
    assert by_key[k[2]] == ["label b'two' is not an integer of 1 to 8 digits"]
    assert by_key[k[3]] == ["label 7 is outside 0..2"]
    assert by_key[k[4]][0] == f"sample key occurs more than once in the shard (2 x {k[4]}.cls, 2 x {k[4]}.jpg)"
    assert by_key[k[4]][1].startswith("JPEG does not decode")
    assert by_key["999999999"] == ["sample not listed in the sidecar"]
    assert by_key[None] == ["1 samples read, manifest says 5"]  # only 999999999 is well-formed
    assert second not in {shard for shard, _, _ in problems}  # the other shards were checked and are fine


def test_check_survives_a_truncated_tar(checked, cli):
    from pipeline.data.check import check_shards

    out, manifest, members = checked
    first, last = manifest["shards"][0]["file"], manifest["shards"][-1]["file"]
    data = (out / first).read_bytes()
    with tarfile.open(out / first) as tar:
        cut = tar.getmember(members[5][0])  # the third sample's .jpg
    (out / first).write_bytes(data[: cut.offset_data + 100])
    with tarfile.open(out / last) as tar:  # and the last shard cut exactly after a member
        end = tar.getmembers()[-1]
    os.truncate(out / last, end.offset_data + 512 * ((end.size + 511) // 512))
    report = check_shards(out)
    problems = _problems(report)
    assert (first, None, f"the tar is truncated inside member {cut.name} (100 of {cut.size} bytes there)") in problems
    assert (
        first,
        cut.name[:-4],
        f"image {cut.name[:-4]}.jpg is missing (only {cut.name[:-4]}.cls is there)",
    ) in problems
    assert (first, None, "2 samples read, manifest says 5") in problems
    assert any(p[0] == last and "without its end-of-archive blocks" in p[2] for p in problems), problems
    assert report.num_samples == manifest["num_samples"] - 3  # all shards read, up to each cut
    result = cli("shards", "check", out)
    assert result.code == 2 and "Traceback" not in result.out + result.err


def test_check_names_a_corrupt_tar_header(checked):
    from pipeline.data.check import check_shards

    out, manifest, members = checked
    first = manifest["shards"][0]["file"]
    data = bytearray((out / first).read_bytes())
    with tarfile.open(out / first) as tar:
        victim = tar.getmember(members[4][0])
    data[victim.offset : victim.offset + 512] = b"junk" * 128
    (out / first).write_bytes(bytes(data))
    problems = _problems(check_shards(out))
    assert (
        first,
        None,
        f"unreadable data after member {members[3][0]} (byte {victim.offset}): a corrupt tar header",
    ) in problems
    (out / first).write_bytes(b"")
    assert (first, None, "not a readable tar file (empty file)") in _problems(check_shards(out))


def test_check_names_a_duplicate_key_in_a_shard_the_manifest_vouches_for(checked):
    """A shard rewritten with a duplicated sample, the manifest and index updated to match: no DALI needed."""
    from pipeline.data.check import check_shards
    from pipeline.data.shards import write_index

    out, manifest, members = checked
    first = manifest["shards"][0]["file"]
    _write_tar(out / first, members + members[:2])
    write_index(out / first)
    manifest["shards"][0]["sha256"] = sha256(out / first)
    (out / "manifest.json").write_text(json.dumps(manifest))
    key = members[0][0][:-4]
    problems = _problems(check_shards(out))
    assert problems[0] == (first, key, f"sample key occurs more than once in the shard (2 x {key}.cls, 2 x {key}.jpg)")
    assert all(p[0] == first for p in problems)


def test_check_reports_a_corrupt_sidecar(checked):
    from pipeline.data.check import check_shards

    out, manifest, _ = checked
    first, second = manifest["shards"][0]["file"], manifest["shards"][1]["file"]
    (out / first.replace(".tar", ".json")).write_text('{"samples": [')
    (out / second.replace(".tar", ".json")).write_text('{"samples": 3}')
    first_sidecar, second_sidecar = first.replace(".tar", ".json"), second.replace(".tar", ".json")
    assert _problems(check_shards(out)) == [
        (first, None, f"sidecar {first_sidecar} is not valid JSON (line 1: Expecting value): cannot check labels"),
        (second, None, f"sidecar {second_sidecar} has no list of [key, label, source] samples: cannot check labels"),
    ]


def test_check_rejects_a_bad_manifest(checked, cli):
    from pipeline.data.check import check_shards

    out, manifest, _ = checked
    path = out / "manifest.json"
    path.write_text('{"shards": [\n  {"file": }\n')
    err = _error(check_shards, out)
    assert (err.issues[0].file, err.issues[0].line) == (str(path), 2) and "not valid JSON" in err.issues[0].message
    assert "re-run the same build command" in err.issues[0].hint
    result = cli("shards", "check", out)
    assert result.code == 2 and f"{path}:2: not valid JSON" in result.err and "Traceback" not in result.err
    broken = {k: v for k, v in manifest.items() if k != "num_classes"}
    broken["shards"] = [{**manifest["shards"][0], "file": "../../etc/passwd"}, {"sha256": None}, 3]
    path.write_text(json.dumps(broken))
    assert [(i.path, i.message) for i in _error(check_shards, out).issues] == [
        ("num_classes", "missing"),
        ("shards[0].file", "is '../../etc/passwd'; it must be a file name in the shard folder"),
        ("shards[1].file", "missing"),
        ("shards[1].sha256", "is None; it must be a hex digest"),
        ("shards[1].num_samples", "missing"),
        ("shards[2]", "is 3; it must be an object with file, sha256 and num_samples"),
    ]
    path.write_text("[]")
    assert "holds a JSON list, not an object" in str(_error(check_shards, out))
