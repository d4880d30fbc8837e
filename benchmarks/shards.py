"""`shards build` on an ImageNet-like folder, beside a straightforward webdataset + PIL baseline.

    python benchmarks/shards.py [--images 20000] [--classes 1000] [--workers N] [--resolution 256]
                                [--folder DIR] [--levers] [--no-originals]

The folder (generated once, then reused): `--classes` class folders of JPEGs whose sizes follow
ImageNet's train set (most 500x375 or 500x333, landscape or portrait; a spread of smaller ones; a
few large ones; about 440x380 on average) and whose content compresses like a photograph's at
quality 90 (about 115 KB at 500x375; the mean is printed). Each build runs in its own process, one after another on
the same machine with the same number of workers:

- ours: `pipeline.data.shards.build_shards` (what `just shards build` runs), at `--resolution` and
  storing the originals;
- the baseline: the same work as most preparation scripts do it: a `multiprocessing.Pool` of
  `--workers` processes opening each file with PIL, converting to RGB, resizing the shorter side to
  `--resolution` (Lanczos) and encoding at quality 95, or, for the originals, decoding to validate
  and keeping the bytes, written by webdataset's `ShardWriter` (1000 samples a shard).

It prints images/s, the ratio to the baseline, peak resident memory of each build's process, and
what 1,281,167 images (ILSVRC-2012 train) would take on this machine and per core. `--levers`
adds our build with each speed-up switched off in turn: JPEGs decoded at full size
(`ours-full-decode`), and one thread (`ours-1-thread`: how far threads scale, i.e. whether the GIL
holds them back).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167

# (width, height, share) of ImageNet's train images, roughly as its size histogram has them (most
# are 500 on the longer side); the rest are drawn below. Mean: about 440x380.
COMMON_SIZES = [(500, 375, 0.40), (500, 333, 0.17), (375, 500, 0.09), (333, 500, 0.04), (500, 500, 0.03)]
SMALL = 0.25  # smaller images, sides 150-450; the rest (2%) large ones, longer side 800-1600


def image_sizes(n: int, rng) -> list[tuple[int, int]]:
    sizes = []
    for u in rng.random(n):
        for w, h, share in COMMON_SIZES:
            if u < share:
                sizes.append((w, h))
                break
            u -= share
        else:
            if u < SMALL:
                sizes.append((int(rng.integers(150, 451)), int(rng.integers(150, 451))))
            else:
                long = int(rng.integers(800, 1601))
                short = int(long * rng.uniform(0.6, 0.8))
                sizes.append((long, short) if rng.random() < 0.7 else (short, long))
    return sizes


def _photo(args: tuple[int, int, int, str]) -> int:
    """A JPEG at quality 90 with a photograph's entropy: smooth colour fields, edges, texture."""
    import numpy as np
    from PIL import Image, ImageFilter

    w, h, seed, path = args
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    texture = rng.normal(0, 45, (h, w, 3)).astype(np.float32)
    texture = np.asarray(
        Image.fromarray(np.clip(texture + 128, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))
    )
    pixels = np.clip(np.asarray(base, dtype=np.float32) + texture.astype(np.float32) - 128, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def make_folder(folder: Path, images: int, classes: int, workers: int) -> dict:
    """Generate the folder once; a finished one (folder/.complete with the same counts) is reused."""
    import multiprocessing

    import numpy as np

    done = folder / ".complete"
    wanted = {"images": images, "classes": classes}
    if done.exists() and json.loads(done.read_text()).get("counts") == wanted:
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    sizes = image_sizes(images, rng)
    jobs = []
    for i, (w, h) in enumerate(sizes):
        cls = folder / f"n{i % classes:08d}"
        cls.mkdir(parents=True, exist_ok=True)
        jobs.append((w, h, i, str(cls / f"n{i % classes:08d}_{i}.JPEG")))
    start = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        nbytes = pool.map(_photo, jobs, chunksize=64)
    info = {
        "counts": wanted,
        "mean_bytes": sum(nbytes) / len(nbytes),
        "mean_width": sum(w for w, _ in sizes) / len(sizes),
        "mean_height": sum(h for _, h in sizes) / len(sizes),
        "generated_s": time.perf_counter() - start,
    }
    done.write_text(json.dumps(info))
    return info


# ----- the baseline: webdataset's ShardWriter fed by a multiprocessing.Pool of PIL workers
def _baseline_work(args: tuple[str, int | None]) -> bytes:
    from PIL import Image

    path, resolution = args
    if resolution is None:
        data = Path(path).read_bytes()
        Image.open(io.BytesIO(data)).load()  # validate: decode in full
        return data
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    if scale < 1:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def baseline(folder: Path, out: Path, resolution: int | None, workers: int) -> int:
    import multiprocessing

    import webdataset as wds

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(str(f), label) for label, c in enumerate(classes) for f in sorted((folder / c).iterdir())]
    out.mkdir(parents=True, exist_ok=True)
    with (
        multiprocessing.Pool(workers) as pool,
        wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0) as sink,
    ):
        jobs = ((path, resolution) for path, _ in files)
        for i, ((_, label), jpeg) in enumerate(zip(files, pool.imap(_baseline_work, jobs, chunksize=16), strict=True)):
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg, "cls": str(label).encode()})
    return len(files)


def ours(folder: Path, out: Path, resolution: int | None, workers: int) -> int:
    from pipeline.data.shards import build_shards

    return build_shards(folder, out, resolution=resolution, num_workers=workers)["num_samples"]


def child(which: str, folder: str, out: str, resolution: int | None, workers: int) -> None:
    """One build in this process: images, seconds and peak resident memory (this process and its workers)."""
    if which == "ours-full-decode":
        import pipeline.data.shards

        pipeline.data.shards.REDUCED_DECODING = False
    if which == "ours-1-thread":
        workers = 1
    build = baseline if which == "baseline" else ours
    start = time.perf_counter()
    n = build(Path(folder), Path(out), resolution, workers)
    seconds = time.perf_counter() - start
    rss = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    print(json.dumps({"images": n, "seconds": seconds, "max_rss_mb": rss / 1024}))


def run(which: str, folder: Path, resolution: int | None, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--child", which, str(folder), str(Path(tmp) / "out")]
        command += [f"--resolution={resolution or 0}", f"--workers={workers}"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{which} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--folder", type=Path, help="where the generated folder is kept (default: ~/.cache/pipeline/...)")
    ap.add_argument("--levers", action="store_true", help="also our build with each speed-up off in turn")
    ap.add_argument("--no-originals", action="store_true", help="only the resized builds")
    ap.add_argument("--child", nargs=3, metavar=("WHICH", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    ns, _ = ap.parse_known_args()
    if ns.child:
        which, folder, out = ns.child
        child(which, folder, out, ns.resolution or None, ns.workers)
        return
    folder = ns.folder or Path.home() / ".cache" / "pipeline" / f"imagenet-like-{ns.images}-{ns.classes}"
    info = make_folder(folder, ns.images, ns.classes, ns.workers)
    print(
        f"{folder}: {ns.images:,} JPEGs in {ns.classes} class folders, mean {info['mean_width']:.0f}x"
        f"{info['mean_height']:.0f}, {info['mean_bytes'] / 1000:.0f} KB; {ns.workers} worker(s)",
        flush=True,
    )
    builds = ["ours", "baseline"] + (["ours-full-decode", "ours-1-thread"] if ns.levers else [])
    rows = []
    for resolution in (ns.resolution,) if ns.no_originals else (ns.resolution, None):
        for which in builds:
            r = run(which, folder, resolution, ns.workers)
            r |= {"which": which, "resolution": resolution, "images_per_s": r["images"] / r["seconds"]}
            rows.append(r)
            print(f"  {which:14s} {resolution or 'originals'}: {r['images_per_s']:,.1f} images/s", flush=True)
    print("\n| build | resolution | images/s | vs baseline | peak RSS MB | ImageNet train (1.28M) | per core |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["which"] == "baseline" and b["resolution"] == r["resolution"])
        hours = IMAGENET_TRAIN / r["images_per_s"] / 3600
        print(
            f"| {r['which']} | {r['resolution'] or 'originals'} | {r['images_per_s']:,.1f} | "
            f"{r['images_per_s'] / base['images_per_s']:.2f}x | {r['max_rss_mb']:,.0f} | {hours:.1f} h | "
            f"{r['images_per_s'] / (1 if r['which'] == 'ours-1-thread' else ns.workers):,.1f} images/s |"
        )


if __name__ == "__main__":
    main()
