"""FID, KID, IS and the class accuracy of generated images, on the features of a `FeatureNet`.

The scores follow torch-fidelity 0.4.0's `calculate_metrics` (generated images as input1, real
ones as input2, its default options), so that with the FID Inception the numbers are the field's:

- FID: ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^1/2), the trace of the square root
  as the sum of the square roots of the eigenvalues of S_1 S_2 (torch-fidelity's metric_fid.py,
  after TTUR's fid.py); means and covariances (n - 1) in float64;
- KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3 (kernel products in float32, as the
  reference computes them, summed in float64) over `kid_subsets` subsets of `kid_subset_size`,
  drawn by one `numpy.random.RandomState(seed)`: for each subset, `choice(num generated, size,
  replace=False)` and then `choice(num real, size, replace=False)` (metric_kid.py,
  `kid_features_to_metric`); the mean and the population std (ddof 0) of the subsets' values;
- IS: the generated images' logits shuffled by another `RandomState(seed).permutation(N)`, cut
  into `is_splits` contiguous splits [i N / splits, (i + 1) N / splits), exp(mean KL(p(y|x) || p(y)))
  per split in float64 (metric_isc.py, `isc_features_to_metric`); mean and population std (ddof 0),
  as torch-fidelity and the original Inception Score report it.

`seed` defaults to 2020, torch-fidelity's `rng_seed`. Everything is recorded in each score's protocol.

Reference statistics of the real data are computed once per shard set, feature network and
resolution, and cached beside the shards as `fid-stats-<net>-<sha256[:12]>-<R>px.safetensors`:
their mean and covariance (float64), real features for KID (at most `max_kid_features`, a uniform
random subset when there are more, kept in the order the shards give them: all of them, in that
order, is what torch-fidelity draws from), and the feature network's accuracy on the real images
when its classes are the data's. The file records the sha256 of the shards' manifest.json and of
the feature network's weights, the resolution, the KID cap and the seed; when any differs the
statistics are computed again.

Published statistics (an .npz with `mu` and `sigma`, as TTUR, BigGAN-PyTorch and clean-fid write
them) can stand in for the real data's (`published_stats`): FID uses them; KID, which needs real
features rather than moments, is then not computed.

A score that comes out NaN or infinite is returned as None and named in the result's
`non_finite`, with a warning: JSON has no NaN. Scores are computed on the calling process only.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.dali import real_images
from pipeline.data.shards import read_manifest
from pipeline.errors import user_error
from pipeline.eval.features import FeatureNet
from pipeline.safe_files import sha256

CACHE_VERSION = 2
MAX_KID_FEATURES = 10_000
REFERENCE_SEED = 2020  # torch-fidelity's rng_seed
SCORES = ("fid", "kid_mean", "kid_std", "is_mean", "is_std")
# (uint8 images (N, 3, R, R), class labels (N,) or None)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class ReferenceStats:
    """What the scores need of the real data, for one feature network (at one resolution)."""

    mu: torch.Tensor  # float64 (D,): the mean of the real features
    sigma: torch.Tensor  # float64 (D, D): their covariance (n - 1)
    num_samples: int | None  # None: published statistics that do not say
    kid_features: torch.Tensor | None  # float32 (K, D) in stream order, K <= max_kid_features; None: moments only
    resolution: int | None  # the side the real images were read at; None: published statistics
    feature_net: str
    feature_net_sha256: str | None  # None: published statistics, whose network the file does not name
    source: str  # which real images, read how
    classes: dict[str, int] | None = None
    real_class_accuracy: float | None = None
    path: Path | None = None  # the cache or statistics file it was read from or written to
    sha256: str | None = None  # of a published statistics file


class _Moments:
    """Running float64 sums of features and of their outer products: their mean and covariance."""

    def __init__(self, num_features: int, device: torch.device):
        self.total = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        x = features.to(self.total.device, torch.float64)
        self.total += x.sum(0)
        self.outer += x.T @ x
        self.count += len(x)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu(), sigma.cpu()


def _device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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
    device = _device(feature_net)
    moments = _Moments(feature_net.num_features, device)
    pick = torch.Generator().manual_seed(seed)
    kid_keys, kid_positions = torch.empty(0), torch.empty(0, dtype=torch.long)
    kid_features = torch.empty(0, feature_net.num_features)
    score_classes = classes is not None and feature_net.classes == classes
    num_correct = num_labelled = 0
    resolution = None
    with torch.no_grad():
        for images, labels in batches:
            resolution = images.shape[-1]
            features, logits = feature_net(images.to(device))
            moments.update(features)
            # a uniform random subset of the stream: the max_kid_features with the smallest random keys
            start = moments.count - len(features)
            kid_keys = torch.cat([kid_keys, torch.rand(len(features), generator=pick)])
            kid_positions = torch.cat([kid_positions, torch.arange(start, moments.count)])
            kid_features = torch.cat([kid_features, features.float().cpu()])
            keep = kid_keys.argsort()[:max_kid_features]
            kid_keys, kid_positions, kid_features = kid_keys[keep], kid_positions[keep], kid_features[keep]
            if score_classes and labels is not None:
                num_correct += (logits.argmax(1).cpu() == labels.cpu()).sum().item()
                num_labelled += len(labels)
    if moments.count < 2 or resolution is None:  # (no batch at all: no resolution)
        raise user_error(f"{moments.count} real image(s) are too few for reference statistics", hint="give more data")
    mu, sigma = moments.mean_cov()
    return ReferenceStats(
        mu,
        sigma,
        moments.count,
        kid_features[kid_positions.argsort()],  # back in stream order
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
        return ReferenceStats(tensors["mu"], tensors["sigma"], kid_features=tensors["kid_features"], path=path, **info)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or from another version: computed again and replaced


def _write_cache(stats: ReferenceStats, path: Path, key: dict) -> ReferenceStats:
    from safetensors.torch import save_file

    assert stats.kid_features is not None
    info = {
        "num_samples": stats.num_samples,
        "resolution": stats.resolution,
        "feature_net": stats.feature_net,
        "feature_net_sha256": stats.feature_net_sha256,
        "source": stats.source,
        "classes": stats.classes,
        "real_class_accuracy": stats.real_class_accuracy,
    }
    tensors = {"mu": stats.mu, "sigma": stats.sigma, "kid_features": stats.kid_features.contiguous()}
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


def published_stats(path: str | os.PathLike, feature_net: FeatureNet, *, what: str = "--real-stats") -> ReferenceStats:
    """Real statistics from an .npz holding `mu` (D,) and `sigma` (D, D), read without pickles (no
    code runs); D must be the feature network's. They carry no real features: KID is not computed."""
    path = Path(path).expanduser()
    hint = (
        "give an .npz with arrays mu (D,) and sigma (D, D) of the real data's features, computed with "
        f"this feature network (for {feature_net.name}: D = {feature_net.num_features})"
    )
    if not path.is_file():
        raise user_error(f"the statistics file {path} does not exist", path=what, file=str(path), hint=hint)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise user_error(f"cannot read it as .npz statistics: {exc}", path=what, file=str(path), hint=hint) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise user_error("it holds one array (.npy), not mu and sigma (.npz)", path=what, file=str(path), hint=hint)
    with loaded:
        missing = [k for k in ("mu", "sigma") if k not in loaded.files]
        if missing:
            raise user_error(
                f"it lacks {' and '.join(missing)} (it holds {', '.join(loaded.files) or 'nothing'})",
                path=what,
                file=str(path),
                hint=hint,
            )
        try:
            mu, sigma = np.asarray(loaded["mu"]), np.asarray(loaded["sigma"])
        except ValueError:  # numpy refuses object arrays without allow_pickle
            raise user_error(
                "mu or sigma is an array of pickled objects, not read (unpickling can run code)",
                path=what,
                file=str(path),
                hint=hint,
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise user_error(f"cannot read mu and sigma: {exc}", path=what, file=str(path), hint=hint) from None
    problem: str | None = None
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        problem = f"mu and sigma must be numbers, not {mu.dtype} and {sigma.dtype}"
    elif mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        problem = f"mu is {mu.shape} and sigma {sigma.shape}, where mu (D,) and sigma (D, D) belong"
    elif len(mu) != feature_net.num_features:
        problem = (
            f"they are statistics of {len(mu)} features, and the feature network {feature_net.name} "
            f"gives {feature_net.num_features}"
        )
    elif not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        problem = "mu or sigma holds NaN or infinite values"
    if problem:
        raise user_error(problem, path=what, file=str(path), hint=hint)
    return ReferenceStats(
        torch.from_numpy(mu.astype(np.float64)),
        torch.from_numpy(sigma.astype(np.float64)),
        num_samples=None,
        kid_features=None,
        resolution=None,
        feature_net=feature_net.name,
        feature_net_sha256=None,
        source=f"published statistics {path} (mu, sigma), assumed computed with {feature_net.name} features",
        path=path,
        sha256=sha256(path),
    )


# ----- the scores, as torch-fidelity computes them (see the module docstring)
def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """FID between two Gaussians (float64)."""
    m1, s1, m2, s2 = (t.double().cpu().numpy() for t in (mu1, sigma1, mu2, sigma2))
    if not all(np.isfinite(a).all() for a in (m1, s1, m2, s2)):
        return math.nan  # (eigvals refuses them): flagged by the caller
    diff = m1 - m2
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """MMD^2, unbiased, polynomial kernel (x.y / d + 1)^3 computed in float32, summed in float64."""
    m, gamma = len(x), 1.0 / x.shape[1]

    def kernel_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        k = (a @ b.T * gamma + 1) ** 3
        return k.sum(dtype=torch.float64).item(), k.diagonal().sum(dtype=torch.float64).item()

    xx, xx_diag = kernel_sums(x, x)
    yy, yy_diag = kernel_sums(y, y)
    xy, _ = kernel_sums(x, y)
    return (xx - xx_diag + yy - yy_diag) / (m * (m - 1)) - 2 * xy / (m * m)


def kernel_inception_distance(
    fake: torch.Tensor, real: torch.Tensor, *, num_subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID's mean and population std over subsets drawn as torch-fidelity draws them."""
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets)
    fake, real = fake.float(), real.float()
    for i in range(num_subsets):
        x = fake[torch.from_numpy(rng.choice(len(fake), subset_size, replace=False))]
        y = real[torch.from_numpy(rng.choice(len(real), subset_size, replace=False))]
        values[i] = _unbiased_mmd2(x, y)
    return float(values.mean()), float(values.std())


def inception_score(logits: torch.Tensor, *, num_splits: int, seed: int) -> tuple[float, float]:
    """IS's mean and population std over splits of the shuffled logits, as torch-fidelity."""
    n = len(logits)
    order = torch.from_numpy(np.random.RandomState(seed).permutation(n))
    logits = logits[order].double()
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    scores = []
    for i in range(num_splits):
        part = slice(i * n // num_splits, (i + 1) * n // num_splits)
        p_y = p[part].mean(0, keepdim=True)
        scores.append((p[part] * (log_p[part] - p_y.log())).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


class Scorer:
    """Scores generated images against reference statistics. Build it once; call it for each evaluation.

    KID draws `kid_subsets` random subsets of `kid_subset_size` (fewer when fewer images are
    available); IS averages over `is_splits` splits (fewer when there are fewer images). `seed`
    seeds those draws (torch-fidelity's 2020 by default)."""

    def __init__(
        self,
        feature_net: FeatureNet,
        reference: ReferenceStats,
        *,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        seed: int = REFERENCE_SEED,
    ):
        if reference.feature_net_sha256 is not None and reference.feature_net_sha256 != feature_net.checksum:
            raise user_error(
                f"the reference statistics were computed with {reference.feature_net} "
                f"(sha256 {reference.feature_net_sha256[:12]}), not with this {feature_net.name} "
                f"({feature_net.checksum[:12]})",
                hint="compute them with the same feature network",
            )
        if len(reference.mu) != feature_net.num_features:
            raise user_error(
                f"the reference statistics are of {len(reference.mu)} features, and {feature_net.name} "
                f"gives {feature_net.num_features}",
                hint="compute them with the same feature network",
            )
        self.feature_net, self.reference, self.seed = feature_net, reference, seed
        self.kid_subsets, self.kid_subset_size, self.is_splits = kid_subsets, kid_subset_size, is_splits
        self.score_classes = feature_net.classes is not None and feature_net.classes == reference.classes

    def __call__(self, fake_batches: Batches) -> dict:
        """Scores of generated BATCHES (uint8 images (N, 3, R, R), conditioning labels (N,) or None)."""
        device = _device(self.feature_net)
        moments = _Moments(self.feature_net.num_features, device)
        all_features, all_logits = [], []
        num_labelled = num_correct = 0
        with torch.no_grad():
            for images, labels in fake_batches:
                if images.dtype != torch.uint8 or images.dim() != 4:
                    raise TypeError(
                        f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
                        " (to_uint8 turns [-1, 1] images into them)"
                    )
                if self.reference.resolution is not None and images.shape[-1] != self.reference.resolution:
                    raise user_error(
                        f"generated images are {images.shape[-1]}px, the reference statistics "
                        f"{self.reference.resolution}px",
                        path="resolution",
                        hint="compute the reference statistics at the generator's resolution",
                    )
                features, logits = self.feature_net(images.to(device))
                moments.update(features)
                all_features.append(features.float().cpu())
                all_logits.append(logits.float().cpu())
                if self.score_classes and labels is not None:
                    num_correct += (logits.argmax(1) == labels.to(device)).sum().item()
                    num_labelled += len(labels)
        num_samples = moments.count
        if num_samples < 2:
            raise user_error(
                f"{num_samples} generated image(s) are too few to score",
                path="num_samples",
                hint="FID needs at least 2; scores are comparable only at equal counts, usually 10,000 or 50,000",
            )
        fake_features = torch.cat(all_features)
        mu, sigma = moments.mean_cov()
        fid = frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma)
        real_features = self.reference.kid_features
        kid_subset_size = None
        kid_mean = kid_std = None
        if real_features is not None:
            kid_subset_size = min(self.kid_subset_size, num_samples, len(real_features))
            kid_mean, kid_std = kernel_inception_distance(
                fake_features, real_features, num_subsets=self.kid_subsets, subset_size=kid_subset_size, seed=self.seed
            )
        is_splits = min(self.is_splits, num_samples)
        is_mean, is_std = inception_score(torch.cat(all_logits), num_splits=is_splits, seed=self.seed)
        protocol = {
            **self.feature_net.protocol(),
            "num_samples": num_samples,
            "num_real_samples": self.reference.num_samples,
            "resolution": self.reference.resolution,
            "real_data": self.reference.source,
            "real_stats": str(self.reference.path) if self.reference.path else None,
            "real_stats_sha256": self.reference.sha256,
            "kid_subsets": self.kid_subsets if real_features is not None else None,
            "kid_subset_size": kid_subset_size,
            "kid_real_features": len(real_features) if real_features is not None else None,
            "is_splits": is_splits,
            "seed": self.seed,
            "scores_follow": (
                "torch-fidelity 0.4.0 calculate_metrics (input1 generated, input2 real): KID subsets drawn by "
                "numpy RandomState(seed).choice(generated) then .choice(real) per subset, kernel (x.y/d + 1)^3, "
                "unbiased; IS on RandomState(seed).permutation of the generated, contiguous splits; std ddof 0"
            ),
        }
        if real_features is None:
            protocol["kid_not_computed"] = "the real statistics are moments only (mu, sigma); KID needs real features"
        result = {
            "fid": fid,
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "is_mean": is_mean,
            "is_std": is_std,
            "class_accuracy": num_correct / num_labelled if num_labelled else None,
            "real_class_accuracy": self.reference.real_class_accuracy,
            "protocol": protocol,
        }
        return _flag_non_finite(result, fake_features)


def _flag_non_finite(result: dict, fake_features: torch.Tensor) -> dict:
    """NaN or infinite scores become None, named in `non_finite`, with a warning (JSON has no NaN)."""
    bad = [k for k in SCORES if result[k] is not None and not math.isfinite(result[k])]
    if not bad:
        return result
    num_bad = int((~torch.isfinite(fake_features)).any(1).sum())
    cause = (
        f"{num_bad} of {len(fake_features)} generated images have non-finite features: the feature network "
        "overflowed on them"
        if num_bad
        else "the features are finite: their statistics are degenerate (e.g. all samples alike)"
    )
    warnings.warn(f"{', '.join(bad)} came out NaN or infinite ({cause}); written as null", stacklevel=3)
    return {**result, **dict.fromkeys(bad), "non_finite": bad}
