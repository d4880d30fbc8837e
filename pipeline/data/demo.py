"""The embedded demo data: scikit-learn's handwritten digits as 32x32 RGB WebDataset shards.

`sklearn.datasets.load_digits()` ships inside the scikit-learn package (no download): 1,797
8x8 greyscale images with values 0..16 in 10 classes. They are scaled to 0..255 (white digits on
black), upscaled to 32x32 with a bicubic filter, and written by the same shard writer as any
image folder (`pipeline.data.shards.write_samples`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data import DEMO_SHARDS
from pipeline.data.shards import Log, read_manifest, write_samples

DEMO_SOURCE = "sklearn.datasets.load_digits"
DEMO_RESOLUTION = 32
DEMO_NUM_SAMPLES = 1797
DEMO_CLASSES = {str(digit): digit for digit in range(10)}


def demo_samples() -> list:
    """(source name, 32x32 RGB PIL image, label) of every digit, in scikit-learn's order."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    size = (DEMO_RESOLUTION, DEMO_RESOLUTION)
    return [
        (f"digits/{i:04d}", Image.fromarray(img, "L").resize(size, Image.Resampling.BICUBIC).convert("RGB"), int(label))
        for i, (img, label) in enumerate(zip(pixels, digits.target, strict=True))
    ]


def build_demo_shards(
    out: str | os.PathLike = DEMO_SHARDS,
    *,
    shard_size: int = 500,
    seed: int = 0,
    quality: int = 95,
    num_workers: int | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> dict:
    """Write the demo shards to OUT (4 shards of up to 500 samples); returns the manifest.

    Re-running keeps finished shards, like any build; `overwrite` rebuilds them all.
    """
    return write_samples(
        demo_samples(),
        out,
        classes=DEMO_CLASSES,
        source=DEMO_SOURCE,
        shard_size=shard_size,
        resolution=DEMO_RESOLUTION,
        seed=seed,
        quality=quality,
        num_workers=num_workers,
        overwrite=overwrite,
        log=log,
    )


def demo_shards_ready(out: str | os.PathLike = DEMO_SHARDS) -> bool:
    """Whether OUT holds a finished demo build: its manifest, and every shard it lists with its index."""
    manifest = read_manifest(Path(out))
    return (
        manifest is not None
        and manifest["source"] == DEMO_SOURCE
        and manifest["num_samples"] == DEMO_NUM_SAMPLES
        and manifest["num_classes"] == len(DEMO_CLASSES)
    )
