"""The DALI input pipeline: WebDataset shards -> decoded, augmented (x in [-1, 1], y) batches.

One pipeline definition serves both devices: with a GPU, JPEGs are decoded by nvJPEG (`mixed`,
the hardware decoder where present) and resized, cropped and flipped on the GPU; without one the
same operators run on the CPU. Labels (`.cls`, ASCII digits) are padded to a fixed width inside
the pipeline and parsed in torch, where a bad one can be named by its shard and sample key.

Epoch policy: training reads an endless stream. Each rank reads its own contiguous part of the
samples (`shard_id`/`num_shards`, sizes differing by at most one), in shard order, through a
shuffle buffer of `shuffle_buffer` samples; batches run across epoch boundaries, and nothing is
padded or dropped. `read_epoch` reads exactly one epoch in stored order (for checks).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.shard_files import (
    CLS_WIDTH,
    ShardSet,
    damaged_samples,
    find_shards,
    parse_labels,
    read_sidecar,
    walk_tar,
)
from pipeline.errors import SpecError, user_error
from pipeline.images import to_uint8
from pipeline.precision import DTYPES

MEAN_STD = 127.5  # uint8 [0, 255] -> [-1, 1]

# DALI is an extra of the project, not a dependency: its wheels are per CUDA major version
DALI_EXTRAS_HINT = (
    "install the project with the DALI build for this machine: pip install -e '.[cuda13]' (CUDA 13, "
    "NVIDIA driver >= 580), '.[cuda12]' (CUDA 12, driver >= 525.60) or '.[cpu]' (no GPU); "
    "README: Install"
)


def require_dali() -> None:
    """A user error naming the extras when NVIDIA DALI cannot be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise user_error(
            f"the input pipeline needs NVIDIA DALI, which cannot be imported ({exc})", hint=DALI_EXTRAS_HINT
        ) from None


def _graph(
    shards: ShardSet,
    *,
    resolution: int,
    crop: str,
    area: tuple[float, float],
    flip: bool,
    gpu: bool,
    load_size: int | None = None,
    shuffle: bool,
    shuffle_buffer: int,
    reader_seed: int,
    shard_id: int,
    num_shards: int,
    skip_missing: bool,
    labelled: bool = True,
):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    # DALI's generated stubs type every operator's result as a union (one output, several or none)
    # that no code can narrow: the graph's nodes are Any here
    read: Any = fn.readers.webdataset(
        paths=[str(p) for p in shards.tars],
        index_paths=[str(p) for p in shards.indexes],
        ext=["jpg", "cls"] if labelled else ["jpg"],
        # a missing .cls must never become an empty label (which would decode to class 0)
        missing_component_behavior="skip" if skip_missing else "error",
        random_shuffle=shuffle,
        initial_fill=shuffle_buffer,
        seed=reader_seed,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=False,
        name="reader",
    )
    if labelled:
        jpg, cls = read
    else:
        jpg, cls = read, None
    images: Any = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.DALIImageType.RGB)
    crop_args: dict[str, Any] = {}
    if crop == "random_resized":
        images = fn.random_resized_crop(images, size=(resolution, resolution), random_area=list(area))
    else:
        if load_size:  # CycleGAN's resize_and_crop: a square load_size image, then the crop
            images = fn.resize(images, size=(load_size, load_size))
        else:
            images = fn.resize(images, resize_shorter=resolution)
        crop_args = {"crop": (resolution, resolution)}
        if crop == "random":
            crop_args |= {
                "crop_pos_x": fn.random.uniform(range=(0.0, 1.0)),
                "crop_pos_y": fn.random.uniform(range=(0.0, 1.0)),
            }
    mirror = fn.random.coin_flip(probability=0.5) if flip else 0
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.DALIDataType.FLOAT,
        output_layout="CHW",
        mean=[MEAN_STD] * 3,
        std=[MEAN_STD] * 3,
        mirror=mirror,
        **crop_args,
    )
    return (images, fn.pad(cls, fill_value=0, shape=[CLS_WIDTH])) if labelled else images


def build_pipeline(
    shards: ShardSet,
    *,
    batch_size: int,
    resolution: int,
    crop: str = "center",
    area: tuple[float, float] = (0.08, 1.0),
    flip: bool = False,
    load_size: int | None = None,
    device_id: int | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = 1024,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int | None = None,
    skip_missing: bool = False,
    checkpoint: str | None = None,
    labelled: bool = True,
):
    """Build (and start) the DALI pipeline; `device_id=None` runs it entirely on the CPU. An
    unlabelled pipeline reads only the images (shards need no .cls) and yields them alone."""
    require_dali()
    from nvidia.dali import pipeline_def

    make = pipeline_def(enable_checkpointing=True)(_graph)
    pipe = make(
        shards,
        resolution=resolution,
        crop=crop,
        area=area,
        flip=flip,
        load_size=load_size,
        gpu=device_id is not None,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        reader_seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        skip_missing=skip_missing,
        labelled=labelled,
        batch_size=batch_size,
        num_threads=num_threads or os.cpu_count() or 1,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=2,
        checkpoint=checkpoint,
    )
    try:
        pipe.build()
    except RuntimeError as exc:
        raise _dali_error(exc, shards) from None
    return pipe


MAX_SCAN_BYTES = 512 << 20  # after a decoder failure, shards up to this size are searched for the culprit


def _dali_error(exc: Exception, shards: ShardSet) -> SpecError:
    """DALI's own message (the operator and what it encountered), the shard it names, and for a
    decoder failure, which DALI reports without the sample, the undecodable samples when the
    shards are small enough to search (`shards check` finds them in any case)."""
    text = str(exc)
    operator = re.search(r"Error in \w+ operator `([^`]+)`", text)
    encountered = text.split("encountered:", 1)[1] if "encountered:" in text else text
    cause = " ".join(
        line.strip()
        for line in encountered.strip().splitlines()
        if line.strip() and not line.startswith(("C++ context", "Current pipeline", "Critical error"))
    )
    if not cause:
        cause = text.strip().splitlines()[0] if text.strip() else repr(exc)
    named = re.search(r'"?([^"\s]+\.(?:tar|idx))"?', cause)
    what = f"DALI's {operator.group(1)} failed" if operator else "the DALI pipeline failed"
    message = f"{what}: {cause}"
    hint = None
    if named:
        message += f" (shard {Path(named.group(1)).with_suffix('.tar').name})"
        hint = (
            "the shard or its index is damaged: rebuild it (`python -m pipeline shards build` resumes) and "
            "run `python -m pipeline shards check DIR`"
        )
    if re.search(r"underfull? sample|missing component", cause, re.IGNORECASE):  # DALI's words for it
        hint = (
            "a sample lacks its .jpg or .cls; rebuild the shards, or set data.on_bad_sample=skip to skip such samples"
        )
    if operator and "decoders" in operator.group(1):
        damaged, culprits = _search_damage(shards)
        if damaged:
            message += f"; shard(s) whose SHA-256 differs from the manifest: {', '.join(damaged[:5])}"
        if culprits:
            message += "; damaged samples: " + ", ".join(f"{s} sample {k!r}" for s, k in culprits[:5])
        hint = (
            "DALI cannot replace one sample of a batch, so a JPEG that does not decode stops the run; find every "
            f"damaged sample with `python -m pipeline shards check {shards.root or 'DIR'}` and rebuild those shards"
        )
    return user_error(message, path=shards.path, file=str(shards.root) if shards.root else None, hint=hint)


def _search_damage(shards: ShardSet) -> tuple[list[str], list[tuple[str, str]]]:
    """After a decoder failure, if the shards are small enough to search now: the shards whose
    checksum differs from the manifest, and (shard, key) of their damaged samples (ShardVerifier)."""
    try:
        if sum(t.stat().st_size for t in shards.tars) > MAX_SCAN_BYTES:
            return [], []
        verifier = ShardVerifier(shards)
        verifier.wait()
        return verifier.damaged, [(name, key) for name in verifier.damaged for key in verifier.samples.get(name, [])]
    except Exception:  # noqa: BLE001 -- a search that fails itself must not hide DALI's error
        return [], []


class ShardVerifier:
    """Hashes shard files against the manifest's SHA-256 in a background thread, once per process,
    while training reads them: damage that still decodes (zeroed bytes in a JPEG decode to a smeared
    image without an error) is found during the first pass instead of never. Rank r hashes every
    world_size-th file from r, so the ranks share the work; hashlib releases the GIL."""

    def __init__(self, shards: ShardSet, rank: int = 0, world_size: int = 1):
        entries = {e["file"]: e.get("sha256") for e in (shards.manifest or {}).get("shards", []) if e.get("file")}
        self.todo = [
            (tar, entries[tar.name])
            for i, tar in enumerate(shards.tars)
            if i % world_size == rank and entries.get(tar.name)
        ]
        self.damaged: list[str] = []  # shard file names, appended by the thread
        self.samples: dict[str, list[str]] = {}  # shard -> keys of its damaged samples
        self.thread = threading.Thread(target=self._run, name="shard-verifier", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from pipeline.safe_files import sha256

        for tar, digest in self.todo:
            try:
                if sha256(tar) == digest:
                    continue
                _, digests, _ = read_sidecar(tar.with_suffix(".json"))
                contents = walk_tar(tar, 10**CLS_WIDTH, decode=True)
                # JPEG bytes that differ from the sidecar's digests; without digests (older shards),
                # those PIL cannot decode
                self.samples[tar.name] = (
                    damaged_samples(contents, digests)
                    if digests
                    else [
                        key for key, problem in contents.problems if key and problem.startswith("JPEG does not decode")
                    ]
                )
            except Exception:  # noqa: BLE001 -- unreadable is damaged too; naming its samples is a bonus
                pass
            self.damaged.append(tar.name)  # last: the samples are known once the shard is reported

    def wait(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)


_VERIFIERS: dict[tuple, ShardVerifier] = {}


def shard_verifier(shards: ShardSet, rank: int, world_size: int) -> ShardVerifier:
    """The one verifier of a rank's shards in this process: a loader reopened (a rollback) does
    not hash them again."""
    key = (tuple(shards.tars), rank, world_size)
    if key not in _VERIFIERS:
        _VERIFIERS[key] = ShardVerifier(shards, rank, world_size)
    return _VERIFIERS[key]


def part_size(total: int, shard_id: int, num_shards: int) -> int:
    """Samples of one rank's part: DALI splits at floor(total * i / num_shards)."""
    return total * (shard_id + 1) // num_shards - total * shard_id // num_shards


@dataclass
class DaliLoader:
    """Endless iterator of (images, labels) torch batches for one rank.

    images: (B, C, R, R) in [-1, 1] on `device`, `dtype`; labels: (B,) int64 on `device`, or None
    for an unlabelled loader (`num_classes` None).
    `state()` returns the reader's position (a DALI checkpoint); passing it back as `state`
    resumes with exactly the batches that would have followed."""

    shards: ShardSet
    batch_size: int
    resolution: int
    num_classes: int | None
    crop: str = "center"
    area: tuple[float, float] = (0.08, 1.0)
    flip: bool = False
    load_size: int | None = None
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1024
    num_threads: int | None = None
    on_bad_sample: str = "error"
    verify: bool = False  # hash the shards in the background (training); not for short-lived readers
    state: str | None = None
    skipped: int = field(default=0, init=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        gpu = self.device.type == "cuda"
        self.pipe = build_pipeline(
            self.shards,
            batch_size=self.batch_size,
            resolution=self.resolution,
            crop=self.crop,
            area=self.area,
            flip=self.flip,
            load_size=self.load_size,
            device_id=(self.device.index or 0) if gpu else None,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            shard_id=self.rank,
            num_shards=self.world_size,
            num_threads=self.num_threads,
            skip_missing=self.on_bad_sample == "skip",
            checkpoint=self.state,
            labelled=self.num_classes is not None,
        )
        self.verifier = shard_verifier(self.shards, self.rank, self.world_size) if self.verify else None
        self.damage_reported = 0
        self.dataset_size = self.pipe.reader_meta("reader")["epoch_size"]  # all ranks, after skipped samples
        self.epoch_size = part_size(self.dataset_size, self.rank, self.world_size)  # this rank's part
        if self.batch_size > self.epoch_size:
            raise user_error(
                f"the batch of {self.batch_size} per rank is larger than this rank's {self.epoch_size} samples",
                path="train.batch_per_rank",
                hint="use a smaller batch, fewer ranks, or more data",
            )

    def __iter__(self):
        return self

    def state_dict(self) -> str:
        return self.pipe.checkpoint()

    def close(self) -> None:
        """Release the DALI pipeline now. A loader replaced by another (a new stage's resolution, a
        rollback) must be closed: left to the garbage collector, its pipeline stayed alive and the
        process grew by about 0.2 MB per batch read from the new one (measured on CPU)."""
        self.pipe = None

    def new_damage(self) -> list[tuple[str, list[str]]]:
        """(shard, damaged sample keys) for each shard this rank's verifier found damaged (its checksum
        differs from the manifest) since the last call; the keys are those whose JPEG differs from the
        sidecar's digest (none known for shards written without digests)."""
        if self.verifier is None:
            return []
        found = self.verifier.damaged[self.damage_reported :]
        self.damage_reported += len(found)
        return [(shard, self.verifier.samples.get(shard, [])) for shard in found]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            out = self.pipe.run()
        except RuntimeError as exc:
            raise _dali_error(exc, self.shards) from None
        if self.num_classes is None:
            return self._to_torch(out[0]).to(self.dtype), None
        images, cls = out
        labels, valid = parse_labels(cls.as_array())
        valid &= labels < self.num_classes
        if not valid.all():
            bad = [(cls[i].source_info(), bytes(cls.as_array()[i]).rstrip(b"\0")) for i in np.flatnonzero(~valid)]
            if self.on_bad_sample != "skip":
                src, raw = bad[0]
                shard, _offset, member = src.rsplit(":", 2)  # DALI's source info: archive:offset:KEY.cls
                raise user_error(
                    f"sample {member.rsplit('.', 1)[0]!r} in {shard} has label {raw.decode(errors='replace')!r}, "
                    f"not an integer in 0..{self.num_classes - 1}"
                    + (f" ({len(bad) - 1} more in this batch)" if len(bad) > 1 else ""),
                    path=self.shards.path,
                    hint="fix or rebuild the shards, check data.num_classes, or set "
                    "data.on_bad_sample=skip to skip such samples (counted)",
                )
            self.skipped += len(bad)
        keep = torch.from_numpy(np.flatnonzero(valid))
        x = self._to_torch(images)
        y = torch.from_numpy(labels)
        if len(keep) < len(y):
            x, y = x[keep.to(x.device)], y[keep]
        return x.to(self.dtype), y.to(self.device, non_blocking=True)

    def _to_torch(self, images) -> torch.Tensor:
        shape = (self.batch_size, 3, self.resolution, self.resolution)
        device = torch.device(self.device)  # a torch.device since __post_init__
        if device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(shape, dtype=torch.float32, device=device)
            feed_ndarray(images.as_tensor(), out, cuda_stream=torch.cuda.current_stream(device))
            return out
        return torch.from_numpy(images.as_array())


def check_data(spec) -> dict[str, ShardSet | None]:
    """The shards of every stream a spec's method reads (None for a synthetic one), from the files
    alone: nothing is decoded, so `train` and `validate` can tell at once what is missing."""
    from pipeline.errors import SpecError

    found, issues = {}, []
    for name in spec.method.streams(spec):
        try:
            found[name] = check_stream(spec, name)
        except SpecError as exc:
            issues.extend(exc.issues)
    if issues:
        raise SpecError(issues)
    return found


def check_stream(spec, name: str) -> ShardSet | None:
    d = spec.data
    stream = d.all_streams()[name]
    path = "data.shards" if not d.streams else f"data.streams.{name}.shards"
    if stream.synthetic:
        return None
    if d.channels != 3:
        raise user_error(f"the DALI pipeline decodes RGB images; data.channels is {d.channels}", path="data.channels")
    if not stream.shards:
        raise user_error(
            "not set: there is no data to train on",
            path=path,
            hint=f"set {path}=DIR (a directory of .tar shards) on the command line or in the spec, or "
            + ("data.synthetic=true" if not d.streams else f"data.streams.{name}.synthetic=true")
            + " to measure the model alone",
        )
    return find_shards(stream.shards, what=path)


def loader_from_spec(
    spec,
    *,
    stream: str = "images",
    labelled: bool = True,
    batch_size: int | None = None,
    resolution: int | None = None,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    state=None,
    dtype: torch.dtype | None = None,
    seed_offset: int = 0,
):
    """The training loader of one of a spec's data streams: its `data:` settings and `train`
    batch and precision. Labels come with the images when `labelled`. `resolution` (default
    data.resolution) is the side DALI resizes and crops to: a growing network's current stage."""
    d = spec.data
    side = resolution or d.resolution
    if dtype is None:
        dtype = DTYPES[spec.train.precision]
    batch_size = batch_size or spec.train.batch_per_rank or spec.train.batch_size
    shards = check_stream(spec, stream)
    num_classes = d.num_classes if labelled else None
    seed = spec.seed + seed_offset  # streams with different offsets advance independently
    if shards is None:
        from pipeline.data.synthetic import SyntheticLoader

        return SyntheticLoader(batch_size, side, num_classes, d.channels, device, dtype, rank, world_size, seed, state)
    stored = ((shards.manifest or {}).get("options") or {}).get("resolution")
    if stored and stored < d.resolution:
        warnings.warn(
            f"data.resolution {d.resolution} is larger than the shards' stored resolution {stored} "
            f"({shards.root}): images will be upscaled",
            stacklevel=2,
        )
    return DaliLoader(
        shards,
        batch_size,
        side,
        num_classes,
        crop=d.augment.crop,
        area=tuple(d.augment.area),
        flip=d.augment.flip,
        # a load size is for the data's own resolution (a growing stage reads smaller images)
        load_size=d.augment.load_size if side == d.resolution else None,
        device=device,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=d.shuffle_buffer,
        num_threads=d.num_threads,
        on_bad_sample=d.on_bad_sample,
        verify=True,
        state=state,
    )


def first_images(spec, stream: str, num: int, device="cpu") -> torch.Tensor:
    """The first `num` images of a stream in stored order (centre-cropped, [-1, 1]): fixed inputs
    for sample grids. Random images for a synthetic stream."""
    shards = check_stream(spec, stream)
    d = spec.data
    if shards is None:
        generator = torch.Generator().manual_seed(spec.seed + 1)
        return (torch.rand(num, d.channels, d.resolution, d.resolution, generator=generator) * 2 - 1).to(device)
    return first_shard_images(shards, spec, num, device)


def first_shard_images(shards: ShardSet, spec, num: int, device="cpu") -> torch.Tensor:
    """The first `num` images of a shard set in stored order, read as the spec's data reads them."""
    loader = DaliLoader(
        shards, num, spec.data.resolution, None, crop="center", device=device, shuffle=False, num_threads=1
    )
    images, _ = next(loader)
    return images


def real_images(
    shards_dir: str | os.PathLike, *, resolution: int, batch_size: int = 250, device: str | torch.device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of the shards in stored order, as uint8 images (B, 3, R, R) and labels (B,) on DEVICE.

    Each image's shorter side is resized to R (DALI's linear filter with antialiasing) and the centre
    cropped, as training reads it with `crop: center`."""
    shards = find_shards(shards_dir, what="shards")
    if shards.manifest is None:
        raise user_error(
            f"{shards_dir} has no manifest.json",
            file=str(shards_dir),
            hint="evaluate against shards written by `python -m pipeline shards build`",
        )
    loader = DaliLoader(
        shards,
        min(batch_size, shards.manifest["num_samples"]),
        resolution,
        shards.manifest["num_classes"],
        crop="center",
        device=device,
        shuffle=False,
    )
    left = loader.dataset_size
    while left > 0:
        images, labels = next(loader)
        assert labels is not None  # a loader given num_classes is labelled
        images, labels = images[:left], labels[:left]  # the last batch runs on into the next epoch
        left -= len(labels)
        yield to_uint8(images), labels
