"""Images/s of the DALI pipeline against a webdataset + PIL `DataLoader` doing the same work
(decode, resize of the shorter side, center crop, flip, normalise to [-1, 1] CHW float) on the
same shards with the same number of workers, measured side by side in one run.

Usage: python benchmarks/data.py [--images N] [--workers W] [--batch B] [--resolution R]
       [--seconds S] [--device cpu|cuda] [--shards DIR]
Without --shards it writes ImageNet-like JPEGs (about 400x350, random crops of the two photos
that ship with scikit-learn, re-coloured) into a temporary shard set first."""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.dali import DaliLoader  # noqa: E402
from pipeline.data.shard_files import find_shards  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two 427x640 RGB photos
    for i in range(count):
        photo = photos[i % 2]
        h, w = int(rng.integers(330, 400)), int(rng.integers(380, 460))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        crop = photo[y : y + h, x : x + w].astype(np.float32) * rng.uniform(0.6, 1.2, 3) + rng.normal(0, 9, (h, w, 3))
        out = folder / f"c{i % 10}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop.clip(0, 255).astype(np.uint8)).save(out / f"{i:06d}.jpg", quality=95)


class PilLoader:
    """webdataset + PIL + torch DataLoader: the usual way, for comparison."""

    def __init__(self, shards, batch, resolution, workers):
        import webdataset as wds
        from PIL import Image

        def transform(sample):
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            scale = resolution / min(img.size)
            img = img.resize(
                (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                Image.BILINEAR,
                reducing_gap=None,
            )
            left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
            if np.random.rand() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
            return x, int(sample["cls"])

        dataset = (
            wds.WebDataset([str(t) for t in shards.tars], shardshuffle=False, empty_check=False).repeat().map(transform)
        )
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, num_workers=workers, persistent_workers=True, prefetch_factor=4
        )
        self.it = iter(self.loader)

    def __next__(self):
        return next(self.it)


def rate(loader, batch: int, seconds: float) -> float:
    for _ in range(3):  # warm-up
        next(loader)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, y = next(loader)
        if x.is_cuda:
            torch.cuda.synchronize()
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shards")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.shards:
        shard_dir = Path(args.shards)
    else:
        from pipeline.data.shards import build_shards

        src, shard_dir = Path(tmp.name) / "images", Path(tmp.name) / "shards"
        make_images(src, args.images)
        build_shards(src, shard_dir, shard_size=500)
    shards = find_shards(shard_dir)
    sizes = [p.stat().st_size for p in shards.tars]
    n = shards.num_samples or 0
    print(
        f"{n} images in {len(shards.tars)} shards, {sum(sizes) / max(n, 1) / 1e3:.0f} KB/image on average; "
        f"batch {args.batch}, resolution {args.resolution}, {args.workers} workers, device {args.device}"
    )
    dali = DaliLoader(
        shards, args.batch, args.resolution, 10**6, flip=True, device=args.device, num_threads=args.workers
    )
    pil = PilLoader(shards, args.batch, args.resolution, args.workers)
    results = {"dali": [], "pil": []}
    for _ in range(args.rounds):  # interleaved rounds, so that machine load hits both alike
        results["dali"].append(rate(dali, args.batch, args.seconds))
        results["pil"].append(rate(pil, args.batch, args.seconds))
    d, p = statistics.median(results["dali"]), statistics.median(results["pil"])
    print(f"DALI ({args.device}): {d:8.1f} images/s  rounds {[round(r) for r in results['dali']]}")
    print(f"PIL DataLoader     : {p:8.1f} images/s  rounds {[round(r) for r in results['pil']]}")
    print(f"ratio DALI / PIL   : {d / p:8.2f}")


if __name__ == "__main__":
    main()
