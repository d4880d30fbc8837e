"""The shard files read without DALI: a shard set (its .tar files, their DALI index files and
manifest.json, as `find_shards` resolves them), the label format (a `.cls` member holds up to
CLS_WIDTH ASCII digits; `parse_labels` reads them padded), a shard's sidecar, and a walk of a tar
with Python's tarfile that finds every well-formed sample and what is wrong with the rest. The DALI
input pipeline (`pipeline.data.dali`) and `shards check` (`pipeline.data.check`) both read shards
through this module, which imports neither of them.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.shards import sample_digest
from pipeline.errors import user_error

CLS_WIDTH = 8  # digits of a label, padded with zero bytes; labels up to 99,999,999


@dataclass(frozen=True)
class ShardSet:
    tars: list[Path]
    indexes: list[Path]
    manifest: dict | None = None
    root: Path | None = None
    path: str = "data.shards"  # the spec path (or option) that named them, for messages

    @property
    def num_samples(self) -> int | None:
        return self.manifest["num_samples"] if self.manifest else None


def find_shards(where: str | os.PathLike, *, what: str = "data.shards") -> ShardSet:
    """Resolve a directory (with manifest.json), a .tar file or a glob into shards with index files."""
    where = str(where)
    path = Path(where)
    root: Path | None
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        root = path
    elif any(ch in where for ch in "*?["):
        tars = sorted(Path(p) for p in glob.glob(where) if p.endswith(".tar"))
        root = tars[0].parent if tars else None
    elif path.is_file():
        tars, root = [path], path.parent
    else:
        tars, root = [], None
    if not tars:
        raise user_error(
            f"no .tar shards match {where!r}",
            path=what,
            hint="build shards with `python -m pipeline shards build SRC OUT` (or `just demo-data` for "
            "the demo), or point data.shards at a directory or glob of .tar files",
        )
    indexes = [t.with_suffix(".idx") for t in tars]
    missing = [t.name for t, i in zip(tars, indexes, strict=True) if not i.exists()]
    if missing:
        raise user_error(
            f"{len(missing)} shard(s) have no DALI index file, e.g. {missing[0]} "
            f"(expected {Path(missing[0]).with_suffix('.idx')} beside it)",
            path=what,
            hint=f"create them with `python -m pipeline shards index {root}`; without them DALI "
            "infers each index at start-up, slowly",
        )
    manifest = None
    if root is not None and (root / "manifest.json").exists():
        manifest = json.loads((root / "manifest.json").read_text())
    return ShardSet(tars, indexes, manifest, root, what)


def parse_labels(cls_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels from zero-padded ASCII digits, (B, CLS_WIDTH) uint8 -> (labels int64, valid bool)."""
    present = cls_bytes != 0
    digits = cls_bytes.astype(np.int64) - ord("0")
    length = present.sum(1)
    # digits must be contiguous from the start, 1 to CLS_WIDTH of them, each 0-9
    contiguous = present[:, :1].all(1) & (present.cumprod(1).sum(1) == length)
    valid = contiguous & (length > 0) & ((digits >= 0) & (digits <= 9) | ~present).all(1)
    powers = 10 ** np.clip(length[:, None] - 1 - np.arange(CLS_WIDTH)[None, :], 0, None)
    labels = np.where(present, digits * powers, 0).sum(1)
    return np.where(valid, labels, -1), valid


# --- the sidecars --------------------------------------------------------------------------------


def read_sidecar(path: Path) -> tuple[dict[str, int] | None, dict[str, str], str | None]:
    """({key: label} of a shard's sidecar, {key: digest} where it records them, None), or
    (None, {}, why it cannot be used)."""
    if not path.is_file():
        return None, {}, f"sidecar {path.name} is missing: cannot check keys and labels"
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))["samples"]
        expected, digests = {}, {}
        for key, label, *rest in samples:
            if not isinstance(key, str) or not isinstance(label, int):
                raise TypeError
            expected[key] = label
            if len(rest) > 1 and isinstance(rest[1], str):
                digests[key] = rest[1]
    except json.JSONDecodeError as exc:
        return None, {}, f"sidecar {path.name} is not valid JSON (line {exc.lineno}: {exc.msg}): cannot check labels"
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None, {}, f"sidecar {path.name} has no list of [key, label, source] samples: cannot check labels"
    return expected, digests, None


def damaged_samples(contents: TarContents, digests: dict[str, str]) -> list[str]:
    """Keys whose JPEG bytes (read by a walk with `decode`) differ from the digest the sidecar recorded."""
    return [key for key, digest in contents.digests.items() if key in digests and digests[key] != digest]


# --- walking a tar with Python -------------------------------------------------------------------


@dataclass
class TarContents:
    """What a walk of one tar found: its well-formed samples and what is wrong with the rest."""

    # (key, label) in tar order of the samples with one .jpg and one .cls holding a label in range
    samples: list[tuple[str, int]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)  # every key with a .jpg or .cls member
    digests: dict[str, str] = field(default_factory=dict)  # key -> sample_digest of its JPEG (walks with decode)
    problems: list[tuple[str | None, str]] = field(default_factory=list)  # (key or None, problem)


def walk_tar(tar: Path, num_classes: int, *, decode: bool) -> TarContents:
    """Every sample of a tar shard, read with Python's tarfile; with `decode`, each JPEG decoded by PIL.

    Robust to anything in the file: a truncated tar or a corrupt header ends the walk with a problem
    naming the last member read, and the samples before it are still checked.
    """
    contents = TarContents()
    try:
        with tarfile.open(tar, mode="r:") as archive:
            members, labels, broken = _read_members(archive, tar, contents.problems, contents.digests, decode=decode)
    except tarfile.ReadError as exc:  # raised by open only: the walk itself reports and stops
        contents.problems.append((None, f"not a readable tar file ({exc})"))
        return contents
    for key, by_ext in members.items():
        contents.keys.add(key)
        counts = {ext: len(found) for ext, found in by_ext.items()}
        if max(counts.values()) > 1:
            listed = ", ".join(f"{n} x {key}.{ext}" for ext, n in sorted(counts.items()))
            contents.problems.append((key, f"sample key occurs more than once in the shard ({listed})"))
        if "jpg" not in by_ext:
            contents.problems.append((key, f"image {key}.jpg is missing (only {key}.cls is there)"))
        if key in broken:
            contents.problems.append((key, f"JPEG does not decode ({broken[key]})"))
        if "cls" not in by_ext:
            contents.problems.append((key, f"label {key}.cls is missing (only {key}.jpg is there)"))
            continue
        text = labels[key]
        if isinstance(text, int) or not re.fullmatch(rb"[0-9]{1,%d}" % CLS_WIDTH, text):
            shown = f"of {text} bytes" if isinstance(text, int) else repr(text)
            contents.problems.append((key, f"label {shown} is not an integer of 1 to {CLS_WIDTH} digits"))
            continue
        label = int(text)
        if label >= num_classes:
            contents.problems.append((key, f"label {label} is outside 0..{num_classes - 1}"))
        elif "jpg" in by_ext and max(counts.values()) == 1:
            contents.samples.append((key, label))
    return contents


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of a regular file's member (tarfile gives no file object for any other kind)."""
    f = archive.extractfile(member)
    assert f is not None, f"{member.name} is not a regular file"  # the caller checked isreg()
    return f.read()


def _read_members(archive: tarfile.TarFile, tar: Path, problems: list, digests: dict, *, decode: bool):
    """Members of the .jpg and .cls files by key and extension, the label bytes, and JPEGs that fail.

    Problems of the tar itself (truncated, a corrupt header, a member that is not a file) are
    appended to `problems`; the walk stops at the first one that leaves the rest unreadable.
    """
    members: dict[str, dict[str, list[tarfile.TarInfo]]] = {}  # key -> ext -> members, keys in tar order
    labels: dict[str, bytes | int] = {}  # the bytes of a .cls, or its size when too long to be a label
    broken: dict[str, str] = {}  # key -> why its JPEG does not decode
    size = tar.stat().st_size
    last = None
    while True:
        try:
            member = archive.next()
        except tarfile.ReadError:
            problems.append((None, f"the tar is truncated after member {last}"))
            break
        if member is None:
            end = _end_problem(tar, archive.offset, size, last)
            if end:
                problems.append((None, end))
            break
        if member.offset_data + member.size > size:
            present = max(0, size - member.offset_data)
            problems.append(
                (None, f"the tar is truncated inside member {member.name} ({present} of {member.size} bytes there)")
            )
            break
        last = member.name
        key, _, ext = _split_member(member.name)
        if ext not in ("jpg", "cls"):
            continue  # DALI reads only these; other members are allowed
        if not member.isreg():
            problems.append((key, f"member {member.name} is not a regular file"))
            continue
        members.setdefault(key, {}).setdefault(ext, []).append(member)
        if ext == "cls" and key not in labels:
            # a label is at most CLS_WIDTH digits: a larger member is not read into memory
            labels[key] = _read(archive, member) if member.size <= CLS_WIDTH else member.size
        elif ext == "jpg" and decode and key not in broken:
            data = _read(archive, member)
            digests.setdefault(key, sample_digest(data))
            reason = _undecodable(data)
            if reason:
                broken[key] = reason
    return members, labels, broken


def _split_member(name: str) -> tuple[str, str, str]:
    """(key, ".", extension) as WebDataset splits a member name: at the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext


def _end_problem(tar: Path, offset: int, size: int, last: str | None) -> str | None:
    """Why the bytes after the last member are not a tar's end (two or more zero blocks), or None."""
    if size - offset < 2 * tarfile.BLOCKSIZE:
        return f"the tar ends after member {last} without its end-of-archive blocks: it is truncated"
    with open(tar, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 20), b""):
            if block.strip(b"\0"):
                return f"unreadable data after member {last} (byte {offset}): a corrupt tar header"
    return None


def _undecodable(data: bytes) -> str | None:
    """Why PIL cannot decode a JPEG, or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for broken files
        return f"{type(exc).__name__}: {exc}"
    return None
