"""WebDataset shards for DALI: shuffled, checksummed, indexed and resumable.

`build_shards(SRC, OUT)` turns an image folder (one sub-folder per class, or any folder and a CSV
of `path,label`) into tar shards; `write_samples` is the one mechanism underneath, also used by the
embedded demo data (`pipeline.data.demo`).

What OUT holds once a build has finished:

    shard-000000.tar    samples KEY.cls (the label as ASCII digits, no newline) and KEY.jpg (RGB JPEG)
    shard-000000.idx    its DALI index, written by DALI's own `wds2idx.IndexCreator`
    shard-000000.json   its sidecar, written last: the shard is finished when it exists (see below)
    ...
    manifest.json       written when every shard is finished

KEY is the sample's position in the shuffled order, zero-padded to KEY_WIDTH digits ("000001234"),
so keys are unique, contain no dots, and those of one shard are increasing. A sample that turned
out to be unreadable keeps its key and position: it leaves a gap, and the shards written around it
do not change. Labels are 0..K-1.

A sidecar (`shard-NNNNNN.json`) holds:

    format_version  FORMAT_VERSION
    file, index     "shard-NNNNNN.tar", "shard-NNNNNN.idx" (both null when every sample of the shard was skipped)
    size            bytes of the tar (0 without one)
    sha256          hex digest of the tar (null without one)
    num_samples     samples in the tar
    options         {shard_size, resolution, seed, quality}
    class_counts    {"label": n} for the labels present, label keys as strings, in label order
    samples         [[key, label, source, digest], ...] in tar order; source is the path relative to SRC,
                    digest `sample_digest` of the JPEG's bytes (absent in shards written before it existed)
    skipped         [[key, label, source, reason], ...] the shard's samples that could not be read

manifest.json holds:

    format_version  FORMAT_VERSION
    source          the absolute path of SRC (or a description, for samples from code)
    options         {shard_size, resolution, seed, quality, csv} (csv: absolute path or null)
    num_samples     samples written, over all shards
    num_classes     K
    classes         {class name: label}, every class
    class_counts    {"label": n} for the labels present (a class whose every image was skipped is absent)
    shards          [{file, index, sidecar, num_samples, size, sha256, class_counts}, ...] in shard order;
                    shards with no sample left are omitted
    skipped         [{path, reason}, ...] sorted by path

Resuming: a shard counts as finished when its sidecar parses, carries this build's options and
exactly the samples this build assigns to it, its tar exists with the size the sidecar records,
and its index file exists. The tar's sha256 is not recomputed (that is `shards check`). Files are
written to `NAME.tmp` and renamed, tar first, then index, then sidecar, so an interrupted run
leaves either a finished shard or one that is rebuilt, and temporary files are never read as
shards. Shard membership is decided before any image is decoded, so it does not depend on which
images are corrupt, and a restart reproduces the same shards byte for byte.
"""

from __future__ import annotations

import csv as csv_module
import fcntl
import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import Issue, SpecError, user_error

FORMAT_VERSION = 1
KEY_WIDTH = 9  # digits of a sample key: up to a billion samples
SHARD_STEM = "shard-{:06d}"
TMP_SUFFIX = ".tmp"
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
MAX_ISSUES = 20  # user errors listed before "... and N more"
# A CSV's labels must lie below this: it makes K = largest label + 1 classes, and a stray huge
# number (a file size, an id) would otherwise make millions of empty ones.
MAX_CSV_CLASSES = 100_000
EXIF_ORIENTATION = 0x0112

# Tar members carry fixed metadata so that the same input gives the same bytes and checksum.
TAR_MTIME, TAR_MODE = 0, 0o644

# A source image: a path to an image file, its encoded bytes, or a decoded PIL image.
Payload = str | os.PathLike | bytes | Image.Image
Log = Callable[[str], None]


# --- sources ------------------------------------------------------------------------------------------


def build_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None,
    shard_size: int = 1000,
    resolution: int | None = None,
    seed: int = 0,
    quality: int = 95,
    num_workers: int | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> dict:
    """Write the images under SRC as shuffled WebDataset shards in OUT; returns the manifest.

    SRC is either a folder with one sub-folder per class (ImageNet's train layout: class names
    sorted give labels 0..K-1; images anywhere below a class folder, recognised by their suffix,
    IMAGE_SUFFIXES; files directly in SRC and hidden files are ignored), or, with `csv`, any folder
    and a CSV file of `path,label` rows: paths relative to SRC, labels integers >= 0 (class names
    are not accepted: put each class in its own folder instead). An optional header row
    `path,label` is skipped. K is the largest label + 1, at most MAX_CSV_CLASSES. The CSV must be UTF-8.

    Images are stored as RGB JPEG: an RGB JPEG that needs no resize (and no EXIF rotation) is
    copied byte for byte; anything else is converted (transparency composited on white, EXIF
    orientation applied) and encoded at `quality`. With `resolution`, images whose shorter side is
    longer are downscaled (Lanczos) so that it equals `resolution`; smaller ones are kept as they
    are. Unreadable images are skipped and listed in the manifest.

    Re-running the same command resumes: finished shards are kept (see the module docstring).
    OUT holding shards of a different build is an error unless `overwrite`, which deletes them.
    """
    src = Path(src)
    if csv is None:
        samples, classes = folder_samples(src, out=Path(out))
    else:
        samples, classes = csv_samples(src, csv)
    return write_samples(
        samples,
        out,
        classes=classes,
        source=str(src.resolve()),
        shard_size=shard_size,
        resolution=resolution,
        seed=seed,
        quality=quality,
        csv=None if csv is None else str(Path(csv).resolve()),
        num_workers=num_workers,
        overwrite=overwrite,
        log=log,
    )


def _check_source_dir(src: Path) -> None:
    if not src.exists():
        raise user_error(
            f"source folder {src} does not exist",
            file=str(src),
            hint="give the folder that holds the images (e.g. ILSVRC/Data/CLS-LOC/train)",
        )
    if not src.is_dir():
        raise user_error(
            f"source {src} is not a folder",
            file=str(src),
            hint="give a folder of class sub-folders, or a folder and csv= listing path,label rows",
        )


def _visible(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".")


def folder_samples(
    src: str | os.PathLike, *, out: Path | None = None
) -> tuple[list[tuple[str, Path, int]], dict[str, int]]:
    """(source, path, label) of every image under SRC's class folders, and {class name: label}."""
    src = Path(src)
    _check_source_dir(src)
    with os.scandir(src) as it:
        class_dirs = sorted(e.name for e in it if _visible(e) and e.is_dir())
    if out is not None and out.resolve().is_relative_to(src.resolve()):
        raise user_error(
            f"the output folder {out} lies inside the source folder {src}",
            file=str(src),
            hint="its shards would be read as a class of images; write them somewhere else",
        )
    if not class_dirs:
        has_files = any(True for _ in src.iterdir())
        raise user_error(
            f"{src} has no class folders" if has_files else f"source folder {src} is empty",
            file=str(src),
            hint="put each class's images in a sub-folder named after the class "
            "(as in ImageNet's train folder), or pass csv= with path,label rows",
        )
    classes = {name: label for label, name in enumerate(class_dirs)}
    samples: list[tuple[str, Path, int]] = []
    issues: list[Issue] = []
    for name in class_dirs:
        found = []
        for root, dirs, files in os.walk(src / name):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [
                Path(root, f)
                for f in files
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
            ]
        if not found:
            issues.append(
                Issue(
                    f"class folder {name!r} holds no images",
                    file=str(src / name),
                    hint="remove the folder, or add its images (suffixes: " + " ".join(sorted(IMAGE_SUFFIXES)) + ")",
                )
            )
        samples += [(p.relative_to(src).as_posix(), p, classes[name]) for p in sorted(found)]
    _raise_issues(issues)
    return samples, classes


def csv_samples(src: str | os.PathLike, csv: str | os.PathLike) -> tuple[list[tuple[str, Path, int]], dict[str, int]]:
    """(source, path, label) of every row of a `path,label` CSV (paths relative to SRC), and the classes."""
    src, csv = Path(src), Path(csv)
    _check_source_dir(src)
    hint_row = "each row is path,label: a path relative to the source folder and an integer class label >= 0"
    samples: list[tuple[str, Path, int]] = []
    issues: list[Issue] = []
    seen: dict[str, int] = {}  # path -> line
    reader = csv_module.reader(io.StringIO(_read_csv_text(csv), newline=""))
    try:
        for row in reader:
            if len(issues) > MAX_ISSUES:
                break
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if not samples and not issues and not seen and [c.strip().lower() for c in row] == ["path", "label"]:
                continue  # header
            where: _Where = {"file": str(csv), "line": line}
            if len(row) != 2:
                issues.append(Issue(f"row has {len(row)} field(s), expected 2 (path,label)", **where, hint=hint_row))
                continue
            rel, label_text = row[0].strip(), row[1].strip()
            label = _csv_label(label_text)
            if isinstance(label, tuple):  # (message, hint)
                issues.append(Issue(label[0], **where, hint=label[1]))
                continue
            posix = PurePosixPath(rel.replace("\\", "/"))
            if not rel or posix.is_absolute() or ".." in posix.parts:
                issues.append(Issue(f"path {rel!r} is not relative to the source folder", **where, hint=hint_row))
                continue
            name = posix.as_posix()
            if name in seen:
                issues.append(
                    Issue(f"{name} is listed twice (first at line {seen[name]})", **where, hint="list each image once")
                )
                continue
            seen[name] = line
            path = src / name
            if not path.is_file():
                issues.append(
                    Issue(
                        f"{name} is not a file in {src}",
                        **where,
                        hint="paths are relative to the source folder given with the CSV",
                    )
                )
                continue
            samples.append((name, path, label))
    except csv_module.Error as exc:  # e.g. a field over the csv module's size limit
        issues.append(Issue(f"cannot parse the CSV: {exc}", file=str(csv), line=reader.line_num, hint=hint_row))
    _raise_issues(issues)
    if not samples:
        raise user_error(f"CSV file {csv} lists no images", file=str(csv), hint=hint_row)
    num_classes = max(label for _, _, label in samples) + 1
    return samples, {str(label): label for label in range(num_classes)}


def _read_csv_text(csv: Path) -> str:
    """The text of a UTF-8 CSV (a byte order mark is dropped); a user error naming the line otherwise."""
    try:
        data = csv.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise user_error(
            f"CSV file {csv} does not exist",
            file=str(csv),
            hint="give a CSV of path,label rows, paths relative to the source folder",
        ) from None
    except OSError as exc:
        raise user_error(
            f"cannot read CSV file {csv}: {exc.strerror}", file=str(csv), hint="give a file you can read"
        ) from None
    body = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = len(data) - len(body) + exc.start
        raise user_error(
            f"the CSV is not UTF-8: byte offset {offset} (0x{data[offset]:02x}), on this line, is not valid UTF-8",
            file=str(csv),
            line=data.count(b"\n", 0, offset) + 1,
            hint=f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {csv.name} > utf8-{csv.name} for a Latin-1 file",
        ) from None


class _Where(TypedDict):
    """Where in a CSV an issue lies (Issue's `file` and `line`)."""

    file: str
    line: int


def _csv_label(text: str) -> int | tuple[str, str]:
    """The label of a valid CSV label, or (message, hint); never converts a huge number."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        return (
            f"label {text!r} is not an integer",
            "labels are class numbers 0..K-1; to name classes, put each class's "
            "images in a folder named after it and leave out the CSV",
        )
    if text.startswith("-") and text.strip("-0"):
        return (f"label {text} is negative", "labels are class numbers 0..K-1")
    digits = text.lstrip("+-").lstrip("0")
    if len(digits) > len(str(MAX_CSV_CLASSES)) or int(digits or "0") >= MAX_CSV_CLASSES:
        shown = digits if len(digits) <= 20 else digits[:20] + "..."
        return (
            f"label {shown} is too large: a CSV's labels must be below {MAX_CSV_CLASSES:,} "
            "(the classes are 0..largest label)",
            "number the classes 0..K-1 without gaps (is this column a class number?)",
        )
    return int(digits or "0")


def _raise_issues(issues: list[Issue]) -> None:
    if not issues:
        return
    shown = issues[:MAX_ISSUES]
    if len(issues) > MAX_ISSUES:
        shown.append(Issue(f"... and more problems after these {MAX_ISSUES}"))
    raise SpecError(shown)


# --- images -------------------------------------------------------------------------------------------


def encode_image(payload: Payload, *, resolution: int | None = None, quality: int = 95) -> bytes:
    """RGB JPEG bytes of one image; raises (OSError, ValueError, ...) when it cannot be read.

    Encoded RGB JPEGs that need neither a resize nor an EXIF rotation come back unchanged.
    """
    data = None
    if isinstance(payload, Image.Image):
        img = payload
    else:
        data = bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else Path(payload).read_bytes()
        img = Image.open(io.BytesIO(data))
    orientation = _orientation(img) if data is not None else 1
    turned = orientation in _SWAPS_SIDES
    size = None  # (width, height) to resize to
    if resolution is not None and min(img.size) > resolution:
        size = _shorter_side_to(img.size[::-1] if turned else img.size, resolution)
    copy = data is not None and img.format == "JPEG" and img.mode == "RGB" and size is None
    copy = copy and orientation not in _ORIENTATION
    if img.format == "JPEG" and REDUCED_DECODING:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT, skipping most of the inverse DCT and
        # colour work; every coefficient is still entropy-decoded, so a truncated or corrupt file
        # fails as in a full decode
        if copy:  # the pixels are only checked: the file is stored as it is
            img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
        elif size is not None and resolution is not None and min(img.size) >= 2 * resolution:
            # at least the final size, then the exact resize
            img.draft(None, size[::-1] if turned else size)
    img.load()  # decode: a truncated or corrupt file fails here, not later inside DALI
    if copy and data is not None:  # copy implies data
        return data
    rgb = _to_rgb(img)
    if orientation in _ORIENTATION:
        # DALI's decoder applies EXIF orientation and PIL-based readers do not: store upright pixels
        rgb = rgb.transpose(_ORIENTATION[orientation])
    if size is not None:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# Decode JPEGs at reduced size where the pixels allow (see encode_image); benchmarks switch it off
# to measure what it gives (benchmarks/shards.py --levers).
REDUCED_DECODING = True


def _shorter_side_to(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is `resolution`."""
    w, h = size
    scale = resolution / min(w, h)
    return (resolution, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), resolution)


# EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose does)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # the orientations whose upright image is the stored one turned


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 -- unreadable EXIF: the pixels are what they are
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels of any mode: transparency composited on white, 16-bit grey scaled to 8 bits."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.asarray(img.convert("I") if img.mode != "I" else img, dtype=np.int64)
        if grey.max(initial=0) > 255:
            grey = np.rint(grey.clip(0, 65535) / 257)
        return Image.fromarray(grey.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _clean_reason(exc: BaseException) -> str:
    """Why an image was skipped, without object addresses (the manifest must not vary between runs)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can read (unknown format)"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _encode_or_reason(payload: Payload, resolution: int | None, quality: int) -> tuple[bytes | None, str | None]:
    try:
        return encode_image(payload, resolution=resolution, quality=quality), None
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, ...) on corrupt files
        return None, _clean_reason(exc)


# --- shards -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    key: str
    label: int
    source: str
    payload: Payload


def shuffled_order(names: list[str], seed: int) -> list[int]:
    """A permutation of range(len(names)) given by a keyed hash of (seed, name).

    It depends on nothing but the seed and the names: not on Python's or NumPy's generators, whose
    streams may change between versions, nor on the order in which the source was listed.
    """
    salt = f"{seed}\0".encode()
    ranks = [hashlib.blake2b(salt + name.encode("utf-8", "surrogatepass"), digest_size=8).digest() for name in names]
    return sorted(range(len(names)), key=ranks.__getitem__)


def write_samples(
    samples: Iterable[tuple[str, Payload, int]],
    out: str | os.PathLike,
    *,
    classes: Mapping[str, int],
    source: str,
    shard_size: int = 1000,
    resolution: int | None = None,
    seed: int = 0,
    quality: int = 95,
    csv: str | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> dict:
    """Shuffle (source name, image, label) samples with `seed` and write them as shards in OUT.

    The image is a path, encoded bytes or a PIL image (see `encode_image`); source names must be
    unique (they key the shuffle and are recorded in the sidecars); labels are 0..len(classes)-1.
    `csv` is only recorded in the manifest's options. Images are decoded and encoded by
    `num_workers` threads (default: the usable CPUs); the output does not depend on that number.
    Returns the manifest (also written to OUT/manifest.json).
    """
    log = log or (lambda message: None)
    options = _check_options(shard_size=shard_size, resolution=resolution, seed=seed, quality=quality)
    samples = list(samples)
    _check_samples(samples, classes)
    order = shuffled_order([name for name, _, _ in samples], seed)
    planned = [
        _Planned(f"{pos:0{KEY_WIDTH}d}", int(samples[i][2]), samples[i][0], samples[i][1])
        for pos, i in enumerate(order)
    ]
    plan = [planned[start : start + shard_size] for start in range(0, len(planned), shard_size)]

    out = _prepare_out(Path(out))
    with _Lock(out):
        _remove_ours(out, temporary_only=not overwrite)
        sidecars = _finished_shards(out, plan, options)
        todo = [n for n in range(len(plan)) if n not in sidecars]
        if todo:
            (out / MANIFEST).unlink(missing_ok=True)  # a manifest must never describe shards being rewritten
        log(
            f"{out}: {len(planned):,} samples in {len(plan)} shards of {shard_size}; "
            f"{len(plan) - len(todo)} already finished"
        )
        workers = num_workers if num_workers is not None else len(os.sched_getaffinity(0))
        # Threads, not processes: PIL releases the GIL while it decodes, resizes and encodes, so
        # threads scale over cores without pickling images or forking a process that holds torch.
        pool = ThreadPoolExecutor(max(1, workers)) if workers > 1 else None
        try:
            begun, images = time.perf_counter(), 0
            for count, n in enumerate(todo, 1):
                started = time.perf_counter()
                sidecars[n] = _write_shard(out, n, plan[n], options, pool)
                images += len(plan[n])
                now = time.perf_counter()
                rate = images / (now - begun)
                left = sum(len(plan[m]) for m in todo[count:]) / rate
                log(
                    f"{sidecars[n]['file'] or SHARD_STEM.format(n)}: {sidecars[n]['num_samples']} samples, "
                    f"{len(sidecars[n]['skipped'])} skipped ({count}/{len(todo)}, {now - started:.1f} s; "
                    f"{rate:,.0f} images/s, {_clock(left)} left)"
                )
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)  # on an interrupt, do not finish the shard's images first
        manifest = _manifest(sidecars, len(plan), classes=classes, source=source, options={**options, "csv": csv})
        if manifest["num_samples"] == 0:
            reasons = sorted({s["reason"] for s in manifest["skipped"]})
            raise user_error(
                f"none of the {len(planned)} images could be read",
                file=source,
                hint="reasons: " + "; ".join(reasons[:5]),
            )
        _write_json(out / MANIFEST, manifest)
    return manifest


def _clock(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def _check_options(*, shard_size, resolution, seed, quality) -> dict:
    issues = []

    def need(ok: bool, name: str, value, what: str) -> None:
        if not ok:
            issues.append(Issue(f"{name} is {value!r}; it must be {what}", path=name))

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    need(is_int(shard_size) and shard_size >= 1, "shard_size", shard_size, "an integer >= 1")
    need(
        resolution is None or (is_int(resolution) and resolution >= 1),
        "resolution",
        resolution,
        "an integer >= 1 (the shorter side in pixels) or None",
    )
    need(is_int(seed), "seed", seed, "an integer")
    need(is_int(quality) and 1 <= quality <= 100, "quality", quality, "an integer in 1..100 (JPEG quality)")
    _raise_issues(issues)
    return {"shard_size": shard_size, "resolution": resolution, "seed": seed, "quality": quality}


def _check_samples(samples: list, classes: Mapping[str, int]) -> None:
    if not samples:
        raise user_error("no samples to write", hint="the source holds no images")
    if sorted(classes.values()) != list(range(len(classes))):
        raise user_error(f"class labels must be 0..{len(classes) - 1}, each once; got {sorted(classes.values())[:10]}")
    names = Counter(name for name, _, _ in samples)
    twice = [name for name, n in names.items() if n > 1]
    if twice:
        raise user_error(
            f"{len(twice)} sample source name(s) occur more than once, e.g. {twice[0]!r}",
            hint="each sample needs its own source name",
        )
    bad = [
        (name, label)
        for name, _, label in samples
        if not isinstance(label, (int, np.integer)) or not 0 <= label < len(classes)
    ]
    if bad:
        raise user_error(f"{len(bad)} label(s) outside 0..{len(classes) - 1}, e.g. {bad[0][1]!r} for {bad[0][0]!r}")


def _prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise user_error(
            f"output {out} exists and is not a folder",
            file=str(out),
            hint="give a new or existing folder for the shards",
        ) from None
    except OSError as exc:
        raise user_error(
            f"cannot create output folder {out}: {exc.strerror}", file=str(out), hint="give a folder you can write to"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise user_error(f"output folder {out} is not writable", file=str(out), hint="give a folder you can write to")
    return out


class _Lock:
    """An exclusive lock on OUT for the duration of a build; the kernel drops it if the process dies."""

    def __init__(self, out: Path):
        self.path = out / ".build.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise user_error(
                f"another build is writing to {self.path.parent}",
                file=str(self.path.parent),
                hint="wait for it to finish, or write to another folder",
            ) from None
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


_OUR_FILE = re.compile(r"^(shard-\d{6}\.(tar|idx|json)|manifest\.json)(\.tmp)?$")


def _remove_ours(out: Path, *, temporary_only: bool) -> None:
    """Delete leftovers of an interrupted run (NAME.tmp), or with `overwrite` every file a build writes."""
    for path in out.iterdir():
        match = _OUR_FILE.match(path.name)
        if match and (match.group(3) or not temporary_only):
            path.unlink()


def _finished_shards(out: Path, plan: list[list[_Planned]], options: dict) -> dict[int, dict]:
    """{shard number: sidecar} of the shards in OUT that this build can keep; an error for foreign ones."""
    finished, foreign = {}, []
    for path in sorted(out.glob("shard-*.json")):
        match = re.fullmatch(r"shard-(\d{6})\.json", path.name)
        if not match:
            continue
        n = int(match.group(1))
        try:
            sidecar = json.loads(path.read_text())
            members = sorted([tuple(s[:3]) for s in sidecar["samples"]] + [tuple(s[:3]) for s in sidecar["skipped"]])
            same_build = sidecar["format_version"] == FORMAT_VERSION and sidecar["options"] == options
            diff = ", ".join(
                f"{k} {sidecar['options'].get(k)!r} there, {v!r} now"
                for k, v in options.items()
                if sidecar["options"].get(k) != v
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a sidecar this code wrote: the shard is rebuilt and the file replaced
        if not same_build:
            foreign.append(f"{path.name} was written with other options ({diff or 'another format version'})")
        elif n >= len(plan):
            foreign.append(f"{path.name} is beyond the {len(plan)} shards of this build")
        elif members != sorted((p.key, p.label, p.source) for p in plan[n]):
            foreign.append(f"{path.name} lists other samples than this build assigns to it (has the source changed?)")
        elif _shard_files_complete(out, sidecar):
            finished[n] = sidecar
        if len(foreign) > MAX_ISSUES:
            break
    if foreign:
        raise SpecError(
            [
                Issue(
                    f"{out} holds shards of another build: {text}",
                    file=str(out),
                    hint="write to a new folder, delete the old shards, or rebuild them all with overwrite=True",
                )
                for text in foreign[:MAX_ISSUES]
            ]
        )
    return finished


def _shard_files_complete(out: Path, sidecar: dict) -> bool:
    if sidecar["file"] is None:
        return sidecar["num_samples"] == 0
    tar = out / sidecar["file"]
    return tar.is_file() and tar.stat().st_size == sidecar["size"] and (out / sidecar["index"]).is_file()


def sample_digest(jpeg: bytes) -> str:
    """A sample's fingerprint in its sidecar: the first 16 hex digits of the SHA-256 of its JPEG bytes,
    so that damage to a shard can be traced to the samples it hit."""
    return hashlib.sha256(jpeg).hexdigest()[:16]


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it (tarfile needs write and tell)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_shard(out: Path, n: int, members: list[_Planned], options: dict, pool) -> dict:
    stem = SHARD_STEM.format(n)
    tar_path, tar_tmp = out / f"{stem}.tar", out / f"{stem}.tar{TMP_SUFFIX}"

    def encode(member: _Planned) -> tuple[bytes | None, str | None]:
        return _encode_or_reason(member.payload, options["resolution"], options["quality"])

    results = pool.map(encode, members) if pool is not None else map(encode, members)

    samples: list[list[Any]] = []  # [key, label, source, digest]
    skipped: list[list[Any]] = []  # [key, label, source, reason]
    expected_index: list[list[tuple]] = []
    # tarfile rather than webdataset's TarWriter: full control of each header (USTAR, fixed mtime,
    # owner and mode) for byte-identical shards, our bytes written as they are with no encoder in
    # between, and shard boundaries decided by the plan rather than by a writer that rolls over.
    with open(tar_tmp, "wb") as f:
        writer = _HashingWriter(f)
        # (writing needs only write and tell; typeshed's _Fileobj protocol asks for read and seek too)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
            for member, (jpeg, reason) in zip(members, results, strict=True):
                if jpeg is None:
                    skipped.append([member.key, member.label, member.source, reason])
                    continue
                line = []
                for ext, data in (("cls", str(member.label).encode("ascii")), ("jpg", jpeg)):
                    name = f"{member.key}.{ext}"
                    line.append((ext, tar.offset + tarfile.BLOCKSIZE, len(data), name))  # USTAR: one header block
                    tar.addfile(_tar_member(name, len(data)), io.BytesIO(data))
                expected_index.append(line)
                samples.append([member.key, member.label, member.source, sample_digest(jpeg)])
        f.flush()
        os.fsync(f.fileno())

    sidecar: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "file": None,
        "index": None,
        "size": 0,
        "sha256": None,
        "num_samples": len(samples),
        "options": options,
        "class_counts": _counts(label for _, label, *_ in samples),
        "samples": samples,
        "skipped": skipped,
    }
    if samples:
        os.replace(tar_tmp, tar_path)
        index = write_index(tar_path, expected=expected_index)
        sidecar.update(file=tar_path.name, index=index.name, size=writer.size, sha256=writer.sha256.hexdigest())
    else:  # every sample of the shard was skipped; wds2idx rejects an empty tar, and DALI would too
        tar_tmp.unlink()
        for stale in (tar_path, tar_path.with_suffix(".idx")):
            stale.unlink(missing_ok=True)
    _write_json(out / f"{stem}.json", sidecar)
    return sidecar


def write_index(
    tar: str | os.PathLike, idx: str | os.PathLike | None = None, *, expected: list[list[tuple]] | None = None
) -> Path:
    """Write DALI's index of a tar shard (default: beside it, .idx) with DALI's `wds2idx`; returns its path.

    `wds2idx` lists the tar with GNU tar and ignores tar's exit status, so the result is checked:
    the header's sample count against the lines, and, with `expected` (per sample, its
    (ext, data offset, size, member name) tuples), every entry.
    """
    from wds2idx import IndexCreator

    tar = Path(tar)
    idx = Path(idx) if idx is not None else tar.with_suffix(".idx")
    tmp = idx.with_name(idx.name + TMP_SUFFIX)
    try:
        with IndexCreator(str(tar), str(tmp), verbose=False) as creator:
            creator.create_index()
    except ValueError as exc:  # "Webdataset Tar File empty"
        tmp.unlink(missing_ok=True)
        raise user_error(
            f"cannot index {tar}: {exc}", file=str(tar), hint="a shard must hold at least one file"
        ) from None
    lines = tmp.read_text().splitlines()
    header = lines[0].split() if lines else []
    problem = None
    if len(header) != 2 or header[0] != IndexCreator.index_file_version or int(header[1]) != len(lines) - 1:
        problem = f"header {lines[:1]} does not match its {max(len(lines) - 1, 0)} sample line(s)"
    elif expected is not None:
        want = [" ".join(" ".join(map(str, c)) for c in sample) for sample in expected]
        wrong = [(i, got, exp) for i, (got, exp) in enumerate(zip_longest(lines[1:], want)) if got != exp]
        if wrong:
            problem = "entry {} is {!r}, expected {!r}".format(*wrong[0])
    if problem:
        tmp.unlink()
        raise RuntimeError(f"wds2idx wrote a wrong index for {tar}: {problem}")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, idx)
    return idx


def _counts(labels: Iterable[int]) -> dict[str, int]:
    counts = Counter(labels)
    return {str(label): counts[label] for label in sorted(counts)}


def _manifest(
    sidecars: dict[int, dict], num_shards: int, *, classes: Mapping[str, int], source: str, options: dict
) -> dict:
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    totals: Counter[int] = Counter()
    for n in range(num_shards):
        sidecar = sidecars[n]
        skipped += [{"path": source_name, "reason": reason} for _, _, source_name, reason in sidecar["skipped"]]
        totals.update({int(k): v for k, v in sidecar["class_counts"].items()})
        if sidecar["file"] is not None:
            shards.append(
                {
                    "file": sidecar["file"],
                    "index": sidecar["index"],
                    "sidecar": f"{SHARD_STEM.format(n)}.json",
                    "num_samples": sidecar["num_samples"],
                    "size": sidecar["size"],
                    "sha256": sidecar["sha256"],
                    "class_counts": sidecar["class_counts"],
                }
            )
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "options": options,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_classes": len(classes),
        "classes": dict(sorted(classes.items(), key=lambda item: item[1])),
        "class_counts": _counts(totals.elements()),
        "shards": shards,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
    }


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out: str | os.PathLike) -> dict | None:
    """The manifest of a finished build in OUT, or None when there is none or a shard it lists is missing.

    Cheap: it checks that each listed tar exists with its recorded size and has its index file, not checksums.
    """
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            return None
        for shard in manifest["shards"]:
            tar = out / shard["file"]
            if not tar.is_file() or tar.stat().st_size != shard["size"] or not (out / shard["index"]).is_file():
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest
