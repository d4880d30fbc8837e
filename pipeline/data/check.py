"""`shards check`: read every sample back and compare with the manifest.

Checks, per shard: the file's sha256, its index file, its structure (walked with Python's
tarfile: every sample has one KEY.jpg and one KEY.cls holding an integer label below the
manifest's num_classes, no key occurs twice, the tar is not truncated), the sample keys and labels
against its sidecar, and the totals against manifest.json. JPEGs are decoded by DALI when the
shard is intact (checksum, index and structure good) and one by one with PIL otherwise, since a
corrupt JPEG can crash DALI's decoder outright (seen: a segfault). Every problem names the shard
and, where there is one, the sample key; a broken shard never stops the check of the others.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.dali import build_pipeline
from pipeline.data.shard_files import ShardSet, TarContents, damaged_samples, parse_labels, read_sidecar, walk_tar
from pipeline.errors import Issue, SpecError, user_error
from pipeline.safe_files import sha256

CHECK_RESOLUTION = 16  # images are decoded in full, then shrunk: the check is about reading, not pixels
CHECK_BATCH = 64
MAX_MANIFEST_ISSUES = 20
MANIFEST_HINT = (
    "manifest.json is written by `python -m pipeline shards build` once every shard is finished; "
    "re-run the same build command to rewrite it (finished shards are kept)"
)


@dataclass
class Report:
    root: str
    num_samples: int = 0
    num_shards: int = 0
    problems: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str, problem: str, key: str | None = None) -> None:
        self.problems.append({"shard": shard, "key": key, "problem": problem})

    def as_dict(self) -> dict:
        return {
            "root": self.root,
            "ok": self.ok,
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "problems": self.problems,
        }


# --- the manifest --------------------------------------------------------------------------------


def load_manifest(root: Path) -> dict:
    """manifest.json of ROOT, checked for the keys `check` reads; a user error naming the file otherwise."""
    path = root / "manifest.json"
    if not path.is_file():
        raise user_error(
            f"no manifest.json in {root}",
            hint="check reads shards written by `python -m pipeline shards "
            "build` (or `just demo-data`); give the directory they were written to",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise user_error(f"not valid JSON: {exc.msg}", file=str(path), line=exc.lineno, hint=MANIFEST_HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise user_error(f"cannot read the manifest: {exc}", file=str(path), hint=MANIFEST_HINT) from None
    issues = _manifest_issues(manifest)
    if issues:
        shown = issues[:MAX_MANIFEST_ISSUES]
        raise SpecError([Issue(text, path=key, file=str(path), hint=MANIFEST_HINT) for key, text in shown])
    return manifest


def _manifest_issues(manifest) -> list[tuple[str, str]]:
    """(key path, problem) for each required key of a manifest that is missing or of the wrong type."""

    def is_count(value, minimum: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    if not isinstance(manifest, dict):
        return [("", f"holds a JSON {type(manifest).__name__}, not an object")]
    issues = []
    for key, ok, what in (
        ("num_samples", is_count(manifest.get("num_samples")), "an integer >= 0"),
        ("num_classes", is_count(manifest.get("num_classes"), 1), "an integer >= 1"),
        ("class_counts", isinstance(manifest.get("class_counts"), dict), "an object of label: count"),
        ("shards", isinstance(manifest.get("shards"), list), "a list of shard entries"),
    ):
        if key not in manifest:
            issues.append((key, "missing"))
        elif not ok:
            issues.append((key, f"is {manifest[key]!r}; it must be {what}"))
    shards = manifest.get("shards")
    for i, entry in enumerate(shards if isinstance(shards, list) else []):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            issues.append((where, f"is {entry!r}; it must be an object with file, sha256 and num_samples"))
            continue
        for key, ok, what in (
            ("file", _is_file_name(entry.get("file")), "a file name in the shard folder"),
            ("sha256", isinstance(entry.get("sha256"), str), "a hex digest"),
            ("num_samples", is_count(entry.get("num_samples")), "an integer >= 0"),
            ("index", entry.get("index") is None or _is_file_name(entry["index"]), "a file name in the shard folder"),
        ):
            if key not in entry and key != "index":
                issues.append((f"{where}.{key}", "missing"))
            elif not ok:
                issues.append((f"{where}.{key}", f"is {entry[key]!r}; it must be {what}"))
    return issues


def _is_file_name(value) -> bool:
    """A plain name of a file beside the manifest: a manifest must not point the check elsewhere."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


# --- reading through DALI ------------------------------------------------------------------------


def read_shard(tar: Path, index: Path) -> list[tuple[str, int, bool]]:
    """(key, label, label is an integer) of every sample of one shard, in stored order, through DALI."""
    shard = ShardSet([tar], [index])
    pipe = build_pipeline(shard, batch_size=CHECK_BATCH, resolution=CHECK_RESOLUTION, shuffle=False, num_threads=2)
    total = pipe.reader_meta("reader")["epoch_size"]
    out: list[tuple[str, int, bool]] = []
    while len(out) < total:
        _, cls = pipe.run()
        labels, valid = parse_labels(cls.as_array())
        for i in range(len(cls)):
            member = cls[i].source_info().rsplit(":", 1)[1]
            out.append((member.rsplit(".", 1)[0], int(labels[i]), bool(valid[i])))
    return out[:total]  # the last batch runs into the next epoch


# --- the check -----------------------------------------------------------------------------------


def check_shards(root: str | Path) -> Report:
    root = Path(root)
    manifest = load_manifest(root)
    num_classes = manifest["num_classes"]
    report = Report(str(root), num_shards=len(manifest["shards"]))
    class_counts: Counter[str] = Counter()
    shard_of: dict[str, str] = {}  # sample key -> the first shard holding it
    for entry in manifest["shards"]:
        name = entry["file"]
        tar = root / name
        index = root / (entry.get("index") or Path(name).with_suffix(".idx").name)
        if not tar.is_file():
            report.add(name, "shard file is missing")
            continue
        try:
            intact = sha256(tar) == entry["sha256"]
        except OSError as exc:
            report.add(name, f"cannot read the shard: {exc.strerror}")
            continue
        if not intact:
            report.add(name, "sha256 differs from the manifest: the file changed or is corrupt")
        if not index.is_file():
            report.add(name, f"index file {index.name} is missing")
            intact = False
        expected, digests, sidecar_problem = read_sidecar(tar.with_suffix(".json"))
        if sidecar_problem:
            report.add(name, sidecar_problem)

        contents = walk_tar(tar, num_classes, decode=not intact)
        if intact and contents.problems:  # the manifest vouches for a malformed tar: keep DALI away from it
            contents = walk_tar(tar, num_classes, decode=True)
            intact = False
        for key, problem in contents.problems:
            report.add(name, problem, key)
        for key in damaged_samples(contents, digests):
            report.add(name, "JPEG bytes differ from the sidecar's digest: damaged since the shard was written", key)
        if intact:
            _decode_with_dali(report, name, tar, index, contents, num_classes)

        for key in sorted(contents.keys & shard_of.keys()):
            report.add(name, f"sample key is also in {shard_of[key]}", key)
        shard_of |= dict.fromkeys(contents.keys - shard_of.keys(), name)
        report.num_samples += len(contents.samples)
        if len(contents.samples) != entry["num_samples"]:
            report.add(name, f"{len(contents.samples)} samples read, manifest says {entry['num_samples']}")
        for key, label in contents.samples:
            if expected is not None and key not in expected:
                report.add(name, "sample not listed in the sidecar", key)
            elif expected is not None and expected[key] != label:
                report.add(name, f"label {label}, sidecar says {expected[key]}", key)
            class_counts[str(label)] += 1
        if expected is not None:
            for key in sorted(set(expected) - contents.keys):
                report.add(name, "listed in the sidecar but not in the shard", key)
    if report.num_samples != manifest["num_samples"] and not report.problems:
        report.add("manifest.json", f"{report.num_samples} samples read, manifest says {manifest['num_samples']}")
    if not report.problems and class_counts != {str(k): v for k, v in manifest["class_counts"].items()}:
        report.add("manifest.json", "per-class counts read differ from the manifest's class_counts")
    return report


def _decode_with_dali(
    report: Report, name: str, tar: Path, index: Path, contents: TarContents, num_classes: int
) -> None:
    """Decode every JPEG of a well-formed, intact shard through DALI; name each that fails."""
    try:
        samples = read_shard(tar, index)
    except Exception as exc:  # noqa: BLE001 -- DALI failed on an intact shard: name what PIL cannot decode
        culprits = walk_tar(tar, num_classes, decode=True).problems
        for key, problem in culprits:
            report.add(name, problem, key)
        if not culprits:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            report.add(name, f"DALI cannot read the shard: {first_line}")
        return
    read = [(key, label) for key, label, _ in samples]
    if read != contents.samples:
        first = next((a for a, b in zip(read, contents.samples, strict=False) if a != b), None)
        report.add(
            name,
            f"DALI reads {len(read)} samples, the tar holds {len(contents.samples)}"
            + (f"; first difference at key {first[0]}" if first else ""),
        )


def print_report(report: Report) -> None:
    from rich.console import Console

    console = Console()
    status = "[green]ok[/green]" if report.ok else f"[red]{len(report.problems)} problem(s)[/red]"
    console.print(f"{report.root}: {report.num_shards} shards, {report.num_samples:,} samples read: {status}")
    for p in report.problems[:50]:
        console.print(f"  {p['shard']}" + (f" sample {p['key']!r}" if p["key"] else "") + f": {p['problem']}")
    if len(report.problems) > 50:
        console.print(f"  ... and {len(report.problems) - 50} more (--json lists them all)")
