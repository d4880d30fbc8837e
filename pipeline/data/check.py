"""`shards check`: read every sample back through the DALI pipeline and compare with the manifest.

Checks, per shard: the file's sha256, its index file, the sample keys and labels against its
sidecar (read through DALI, decoding every JPEG), and the totals against manifest.json. A shard
whose checksum fails is examined sample by sample with PIL instead of DALI. Every problem names
the shard and, where there is one, the sample key.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.dali import ShardSet, build_pipeline, parse_labels
from pipeline.errors import user_error
from pipeline.safe_files import sha256

CHECK_RESOLUTION = 16  # images are decoded in full, then shrunk: the check is about reading, not pixels
CHECK_BATCH = 64


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


def undecodable(tar: Path) -> list[tuple[str, str]]:
    """Slow path after DALI failed on a shard: (key, reason) for each JPEG PIL cannot decode."""
    from PIL import Image

    bad = []
    with tarfile.open(tar) as archive:
        for member in archive:
            if not member.name.endswith(".jpg"):
                continue
            try:
                with Image.open(io.BytesIO(archive.extractfile(member).read())) as img:
                    img.load()
            except Exception as exc:  # PIL raises many types for broken files
                bad.append((member.name.rsplit(".", 1)[0], f"{type(exc).__name__}: {exc}"))
    return bad


def check_shards(root: str | Path) -> Report:
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise user_error(
            f"no manifest.json in {root}",
            hint="check reads shards written by `python -m pipeline shards "
            "build` (or `just demo-data`); give the directory they were written to",
        )
    manifest = json.loads(manifest_path.read_text())
    report = Report(str(root), num_shards=len(manifest["shards"]))
    class_counts: dict[str, int] = {}
    for entry in manifest["shards"]:
        name = entry["file"]
        tar, index = root / name, root / entry.get("index", Path(name).with_suffix(".idx").name)
        sidecar = tar.with_suffix(".json")
        if not tar.exists():
            report.add(name, "shard file is missing")
            continue
        if sha256(tar) != entry["sha256"]:
            report.add(name, "sha256 differs from the manifest: the file changed or is corrupt")
            # A corrupt JPEG can crash DALI's decoder outright (seen: a segfault), so a shard that
            # fails its checksum is diagnosed sample by sample in Python instead.
            for key, reason in undecodable(tar):
                report.add(name, f"JPEG does not decode ({reason})", key)
            continue
        if not index.exists():
            report.add(name, f"index file {index.name} is missing")
            continue
        expected = (
            {key: label for key, label, *_ in json.loads(sidecar.read_text())["samples"]} if sidecar.exists() else None
        )
        if expected is None:
            report.add(name, f"sidecar {sidecar.name} is missing: cannot check keys and labels")
        try:
            samples = read_shard(tar, index)
        except Exception as exc:  # DALI failed on an intact shard: name what PIL cannot decode
            culprits = undecodable(tar)
            for key, reason in culprits:
                report.add(name, f"JPEG does not decode ({reason})", key)
            if not culprits:
                report.add(name, f"DALI cannot read the shard: {str(exc).splitlines()[0]}")
            continue
        report.num_samples += len(samples)
        if len(samples) != entry["num_samples"]:
            report.add(name, f"{len(samples)} samples read, manifest says {entry['num_samples']}")
        for key, label, valid in samples:
            if not valid:
                report.add(name, "label is not an integer", key)
            elif label >= manifest["num_classes"]:
                report.add(name, f"label {label} is outside 0..{manifest['num_classes'] - 1}", key)
            elif expected is not None and key not in expected:
                report.add(name, "sample not listed in the sidecar", key)
            elif expected is not None and expected[key] != label:
                report.add(name, f"label {label}, sidecar says {expected[key]}", key)
            class_counts[str(label)] = class_counts.get(str(label), 0) + 1
        if expected is not None:
            for key in sorted(set(expected) - {k for k, _, _ in samples}):
                report.add(name, "listed in the sidecar but not read", key)
    if report.num_samples != manifest["num_samples"] and not report.problems:
        report.add("manifest.json", f"{report.num_samples} samples read, manifest says {manifest['num_samples']}")
    if not report.problems and class_counts != {str(k): v for k, v in manifest["class_counts"].items()}:
        report.add("manifest.json", "per-class counts read differ from the manifest's class_counts")
    return report


def print_report(report: Report) -> None:
    from rich.console import Console

    console = Console()
    status = "[green]ok[/green]" if report.ok else f"[red]{len(report.problems)} problem(s)[/red]"
    console.print(f"{report.root}: {report.num_shards} shards, {report.num_samples:,} samples read: {status}")
    for p in report.problems[:50]:
        console.print(f"  {p['shard']}" + (f" sample {p['key']!r}" if p["key"] else "") + f": {p['problem']}")
    if len(report.problems) > 50:
        console.print(f"  ... and {len(report.problems) - 50} more (--json lists them all)")
