"""Two-domain demo data for image-to-image translation: scikit-learn's digits rendered twice,
as paired domains A and B (the demo classifier beside each is trained by
`pipeline.eval.classifier.build_domain_demo`, which writes the shards through this module).

The renderings:
  A  the plain demo rendering (`pipeline.data.demo.demo_samples`): a white digit on black;
  B  the same 32x32 image with its grey level g in 0..1 mapped per pixel to
     BACKGROUND_B + g * (INK_B - BACKGROUND_B): a dark navy digit on a light cream background.

Paired, as CSGAN's datasets are (CUHK face sketches and photos, CMP facades and their labels):
every digit is in both domains, under the same source name, so both shard builds hold the same
samples in the same order, and two readers with the same seed deliver pairs. CSGAN's
cyclic-synthesized loss compares G_BA(b) with G_BA(G_AB(a)); for an unpaired a and b its only
minimum is a generator that ignores its input, so the demo domains are paired.

B is inverted and coloured, so a translation must move every pixel, yet the digit is all it keeps:
whether a translated image shows the source's digit is what the classifier of the target domain
judges. The map is affine per pixel (a 1x1 convolution in [-1, 1] terms).

OUT holds `a/` and `b/`, each a shard build (`pipeline.data.shards.write_samples`, 32x32, JPEG
quality 95, two shards) with labels (.cls, the digit), its manifest and, once `build_domain_demo`
has run, its demo classifier (`classifier.safetensors`, `classifier.json`). Source names are
those of the plain demo (`digits/NNNN`, the index in scikit-learn's order).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.data import DEMO_DOMAIN_SHARDS
from pipeline.data.demo import DEMO_CLASSES, DEMO_RESOLUTION, DEMO_SOURCE, demo_samples
from pipeline.data.shards import Log, read_manifest, write_samples

DOMAINS = ("a", "b")
DOMAIN_SOURCES = {
    "a": f"{DEMO_SOURCE}: domain A (paired with B), white digit on black",
    "b": f"{DEMO_SOURCE}: domain B (paired with A), navy digit on cream",
}
DOMAIN_NUM_SAMPLES = {"a": 1797, "b": 1797}
NUM_SHARDS_PER_DOMAIN = 2
BACKGROUND_B = (245, 225, 170)  # RGB where A is black: cream
INK_B = (25, 45, 110)  # RGB where A is white: navy


def render_b(image):
    """A 32x32 RGB PIL image of domain A -> the same digit in domain B's colours."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None] / 255
    background, ink = np.array(BACKGROUND_B, dtype=np.float64), np.array(INK_B, dtype=np.float64)
    return Image.fromarray(np.rint(background + grey * (ink - background)).clip(0, 255).astype(np.uint8), "RGB")


def domain_samples() -> dict[str, list]:
    """{"a": [(source name, image, label), ...], "b": [...]}: every digit in both renderings."""
    samples = demo_samples()
    return {"a": samples, "b": [(name, render_b(image), label) for name, image, label in samples]}


def build_domain_shards(
    out: str | os.PathLike = DEMO_DOMAIN_SHARDS,
    *,
    overwrite: bool = False,
    log: Log | None = None,
    each: Callable[[Path], None] | None = None,
) -> dict:
    """Write OUT/a and OUT/b; returns {"a": manifest, "b": manifest}. `each`, if given, is called
    with a domain's folder as soon as its shards are written, before the next domain's
    (`pipeline.eval.classifier.build_domain_demo` trains the demo classifier there).

    Re-running keeps finished shards; `overwrite` rebuilds both."""
    log = log or (lambda message: None)
    manifests = {}
    for domain, samples in domain_samples().items():
        domain_dir = Path(out) / domain
        manifests[domain] = write_samples(
            samples,
            domain_dir,
            classes=DEMO_CLASSES,
            source=DOMAIN_SOURCES[domain],
            shard_size=-(-len(samples) // NUM_SHARDS_PER_DOMAIN),
            resolution=DEMO_RESOLUTION,
            quality=95,
            overwrite=overwrite,
            log=log,
        )
        if each is not None:
            each(domain_dir)
    return manifests


def domain_shards_ready(out: str | os.PathLike = DEMO_DOMAIN_SHARDS) -> bool:
    """Whether OUT holds a finished shard build of both domains (`domain_demo_ready` of
    `pipeline.eval.classifier` also checks the classifier beside each)."""
    for domain in DOMAINS:
        manifest = read_manifest(Path(out) / domain)
        if not (
            manifest is not None
            and manifest["source"] == DOMAIN_SOURCES[domain]
            and manifest["num_samples"] == DOMAIN_NUM_SAMPLES[domain]
            and manifest["num_classes"] == len(DEMO_CLASSES)
        ):
            return False
    return True
