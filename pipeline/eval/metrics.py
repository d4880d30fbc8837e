"""FID, KID, IS and the class accuracy of generated images, computed by torchmetrics on a `FeatureNet`.

Reference statistics of the real data are computed once per shard set, feature network and
resolution, and cached beside the shards as `fid-stats-<net>-<sha256[:12]>-<R>px.safetensors`:

- FID: torchmetrics' own state for the real side (sum of the features, sum of their outer
  products, count), loaded back into `FrechetInceptionDistance` rather than recomputed;
- KID: real features themselves, since KID compares samples rather than moments; at most
  `max_kid_features` of them (a uniform random subset, seeded), 80 MB of Inception features by default;
- the feature network's accuracy on the real images, when its classes are the data's.

The file records the sha256 of the shards' manifest.json and of the feature network's weights, the
resolution, the KID cap and the seed; when any differs the statistics are computed again.

The feature network runs once per batch: its features and logits reach FID, KID and IS through a
pass-through `feature=` module, where torchmetrics would otherwise run the network once per metric.
Scores are computed on the calling process only; nothing is gathered across ranks.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pipeline.data.dali import real_images
from pipeline.data.shards import read_manifest
from pipeline.errors import user_error
from pipeline.eval.features import FeatureNet
from pipeline.safe_files import sha256

CACHE_VERSION = 1
MAX_KID_FEATURES = 10_000
# (uint8 images (N, 3, R, R), class labels (N,) or None)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class ReferenceStats:
    """What the scores need of the real data, for one feature network at one resolution."""

    features_sum: torch.Tensor  # float64 (D,): FrechetInceptionDistance.real_features_sum
    features_cov_sum: torch.Tensor  # float64 (D, D): its real_features_cov_sum, the sum of outer products
    num_samples: int
    kid_features: torch.Tensor  # float32 (K, D), K <= max_kid_features
    resolution: int
    feature_net: str
    feature_net_sha256: str
    source: str  # which real images, read how
    classes: dict[str, int] | None = None
    real_class_accuracy: float | None = None
    path: Path | None = None  # the cache file it was read from or written to


class _Precomputed(nn.Module):
    """The `feature=` module of a torchmetrics metric whose inputs are already features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _fid(num_features: int):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=_Precomputed(num_features), reset_real_features=False, sync_on_compute=False
    )


def reference_from_batches(
    batches: Batches,
    feature_net: FeatureNet,
    *,
    classes: dict[str, int] | None = None,
    max_kid_features: int = MAX_KID_FEATURES,
    seed: int = 0,
    source: str = "given batches",
) -> ReferenceStats:
    """Reference statistics of real BATCHES (uint8 images, labels or None); `classes` are the data's."""
    fid = _fid(feature_net.num_features).to(_device(feature_net))
    pick = torch.Generator().manual_seed(seed)
    kid_keys, kid_features = torch.empty(0), torch.empty(0, feature_net.num_features)
    score_classes = classes is not None and feature_net.classes == classes
    num_correct = num_labelled = 0
    resolution = None
    with torch.no_grad():
        for images, labels in batches:
            resolution = images.shape[-1]
            features, logits = feature_net(images.to(_device(feature_net)))
            fid.update(features, real=True)
            # a uniform random subset of the stream: the max_kid_features with the smallest random keys
            kid_keys = torch.cat([kid_keys, torch.rand(len(features), generator=pick)])
            kid_features = torch.cat([kid_features, features.float().cpu()])
            keep = kid_keys.argsort()[:max_kid_features]
            kid_keys, kid_features = kid_keys[keep], kid_features[keep]
            if score_classes and labels is not None:
                num_correct += (logits.argmax(1).cpu() == labels.cpu()).sum().item()
                num_labelled += len(labels)
    num_samples = int(fid.real_features_num_samples)
    if num_samples < 2 or resolution is None:  # (no batch at all: no resolution)
        raise user_error(f"{num_samples} real image(s) are too few for reference statistics", hint="give more data")
    return ReferenceStats(
        fid.real_features_sum.cpu(),
        fid.real_features_cov_sum.cpu(),
        num_samples,
        kid_features,
        resolution,
        feature_net.name,
        feature_net.checksum,
        source,
        classes,
        num_correct / num_labelled if num_labelled else None,
    )


def reference_stats(
    shards_dir: str | os.PathLike,
    feature_net: FeatureNet,
    *,
    resolution: int | None = None,
    batch_size: int = 250,
    max_kid_features: int = MAX_KID_FEATURES,
    seed: int = 0,
    refresh: bool = False,
    log=None,
) -> ReferenceStats:
    """The reference statistics of the shards in SHARDS_DIR, from their cache file or computed and cached.

    `resolution`: the size real images are read at, the generator's (default: the shards' stored
    resolution). `refresh` recomputes them even when the cache is current."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    if manifest is None:
        raise user_error(
            f"no complete shard build in {shards_dir} (its manifest.json and every shard it lists)",
            file=str(shards_dir),
            hint="build shards with `python -m pipeline shards build SRC OUT`, or `just demo-data` for the demo",
        )
    resolution = resolution or manifest["options"].get("resolution")
    if not resolution:
        raise user_error(
            f"the shards in {shards_dir} keep each image's own size",
            path="resolution",
            hint="give the resolution to compare at: the generator's",
        )
    key = {
        "version": CACHE_VERSION,
        "manifest_sha256": sha256(shards_dir / "manifest.json"),
        "feature_net": feature_net.name,
        "feature_net_sha256": feature_net.checksum,
        "resolution": resolution,
        "max_kid_features": max_kid_features,
        "seed": seed,
    }
    path = shards_dir / f"fid-stats-{feature_net.name}-{feature_net.checksum[:12]}-{resolution}px.safetensors"
    cached = None if refresh else _read_cache(path, key)
    if cached is not None:
        return cached
    if log is not None:
        log(
            f"  computing the real images' statistics: {manifest['num_samples']:,} images of {shards_dir} at "
            f"{resolution}px (once: cached there)"
        )
    batches = real_images(shards_dir, resolution=resolution, batch_size=batch_size, device=_device(feature_net))
    source = (
        f"{shards_dir}: all {manifest['num_samples']} images, shorter side resized to {resolution} "
        "(DALI, linear with antialiasing), centre-cropped"
    )
    stats = reference_from_batches(
        batches, feature_net, classes=manifest["classes"], max_kid_features=max_kid_features, seed=seed, source=source
    )
    return _write_cache(stats, path, key)


def _read_cache(path: Path, key: dict) -> ReferenceStats | None:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta["key"]) != key:
            return None  # the shards, the feature network or the options changed since
        info = json.loads(meta["info"])
        tensors = load_file(str(path))
        return ReferenceStats(
            tensors["features_sum"],
            tensors["features_cov_sum"],
            kid_features=tensors["kid_features"],
            path=path,
            **info,
        )
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or from another version: computed again and replaced


def _write_cache(stats: ReferenceStats, path: Path, key: dict) -> ReferenceStats:
    from safetensors.torch import save_file

    info = {
        "num_samples": stats.num_samples,
        "resolution": stats.resolution,
        "feature_net": stats.feature_net,
        "feature_net_sha256": stats.feature_net_sha256,
        "source": stats.source,
        "classes": stats.classes,
        "real_class_accuracy": stats.real_class_accuracy,
    }
    tensors = {
        "features_sum": stats.features_sum,
        "features_cov_sum": stats.features_cov_sum,
        "kid_features": stats.kid_features.contiguous(),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata={"key": json.dumps(key), "info": json.dumps(info)})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"could not cache the reference statistics in {path} ({exc.strerror}); they will be computed "
            "again next time",
            stacklevel=3,
        )
        return stats
    return replace(stats, path=path)


class Scorer:
    """Scores generated images against reference statistics. Build it once; call it for each evaluation.

    KID draws `kid_subsets` random subsets of `kid_subset_size` (fewer when fewer images are
    available); IS averages over `is_splits` splits. `seed` makes those draws repeatable."""

    def __init__(
        self,
        feature_net: FeatureNet,
        reference: ReferenceStats,
        *,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        seed: int = 0,
    ):
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

        if reference.feature_net_sha256 != feature_net.checksum:
            raise user_error(
                f"the reference statistics were computed with {reference.feature_net} "
                f"(sha256 {reference.feature_net_sha256[:12]}), not with this {feature_net.name} "
                f"({feature_net.checksum[:12]})",
                hint="compute them with the same feature network",
            )
        self.feature_net, self.reference, self.seed = feature_net, reference, seed
        self.kid_subset_size, self.is_splits = kid_subset_size, is_splits
        device = _device(feature_net)
        self.fid = _fid(feature_net.num_features).to(device)
        self.fid.real_features_sum = reference.features_sum.to(device)
        self.fid.real_features_cov_sum = reference.features_cov_sum.to(device)
        self.fid.real_features_num_samples = torch.tensor(reference.num_samples, device=device)
        with warnings.catch_warnings():  # that they keep every feature in memory is what KID and IS need
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            self.kid = KernelInceptionDistance(
                feature=_Precomputed(feature_net.num_features),
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                reset_real_features=False,
                sync_on_compute=False,
            ).to(device)
            self.inception_score = InceptionScore(
                feature=_Precomputed(feature_net.num_classes), splits=is_splits, sync_on_compute=False
            ).to(device)
        self.kid.update(reference.kid_features.to(device), real=True)
        self.score_classes = feature_net.classes is not None and feature_net.classes == reference.classes

    def __call__(self, fake_batches: Batches) -> dict:
        """Scores of generated BATCHES (uint8 images (N, 3, R, R), conditioning labels (N,) or None)."""
        for metric in (self.fid, self.kid, self.inception_score):
            metric.reset()
        device = _device(self.feature_net)
        num_samples = num_labelled = num_correct = 0
        with torch.no_grad():
            for images, labels in fake_batches:
                if images.dtype != torch.uint8 or images.dim() != 4:
                    raise TypeError(
                        f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
                        " (to_uint8 turns [-1, 1] images into them)"
                    )
                if images.shape[-1] != self.reference.resolution:
                    raise user_error(
                        f"generated images are {images.shape[-1]}px, the reference statistics "
                        f"{self.reference.resolution}px",
                        path="resolution",
                        hint="compute the reference statistics at the generator's resolution",
                    )
                features, logits = self.feature_net(images.to(device))
                self.fid.update(features, real=False)
                self.kid.update(features, real=False)
                self.inception_score.update(logits)
                num_samples += len(images)
                if self.score_classes and labels is not None:
                    num_correct += (logits.argmax(1) == labels.to(device)).sum().item()
                    num_labelled += len(labels)
        if num_samples < 2:
            raise user_error(
                f"{num_samples} generated image(s) are too few to score",
                path="num_samples",
                hint="FID needs at least 2; scores are comparable only at equal counts, usually 10,000 or 50,000",
            )
        kid_subset_size = min(self.kid_subset_size, num_samples, len(self.reference.kid_features))
        self.kid.subset_size = kid_subset_size
        with torch.random.fork_rng(devices=[]):  # KID's subsets and IS's splits draw from the global generator
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
            is_mean, is_std = self.inception_score.compute()
        protocol = {
            **self.feature_net.protocol(),
            "num_samples": num_samples,
            "num_real_samples": self.reference.num_samples,
            "resolution": self.reference.resolution,
            "real_data": self.reference.source,
            "real_stats": str(self.reference.path) if self.reference.path else None,
            "kid_subsets": self.kid.subsets,
            "kid_subset_size": kid_subset_size,
            "kid_real_features": len(self.reference.kid_features),
            "is_splits": self.is_splits,
            "seed": self.seed,
        }
        return {
            "fid": self.fid.compute().item(),
            "kid_mean": kid_mean.item(),
            "kid_std": kid_std.item(),
            "is_mean": is_mean.item(),
            "is_std": is_std.item(),
            "class_accuracy": num_correct / num_labelled if num_labelled else None,
            "real_class_accuracy": self.reference.real_class_accuracy,
            "protocol": protocol,
        }
