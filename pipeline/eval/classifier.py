"""The demo classifier: a small CNN that tells the demo digits apart, the feature network of the demo;
and the same network trained on a user's shards (`ensure_classifier`), the feature network of
`eval.features: demo` on any data.

`python -m pipeline demo-data` trains it in seconds on CPU, on a deterministic split of the demo
shards, and saves it beside them: `classifier.safetensors` (weights, with its architecture in the
metadata) and `classifier.json` (held-out accuracy, seed, the split, the manifest it was trained on).
It trains one beside each domain of the two-domain demo too (`build_domain_demo`). On other shards
`ensure_classifier` trains one on demand, at the shards' resolution up to MAX_INPUT_SIZE.
Its penultimate layer (globally pooled channels) serves FID and KID; its logits serve IS and the
class accuracy of conditional samples.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import DEMO_DOMAIN_SHARDS, DEMO_SHARDS
from pipeline.data.domains import DOMAINS, build_domain_shards, domain_shards_ready
from pipeline.data.shards import Log, read_manifest
from pipeline.errors import user_error
from pipeline.safe_files import sha256

WEIGHTS_FILE = "classifier.safetensors"
RECORD_FILE = "classifier.json"
INPUT_SIZE = 32  # the demo's
# on a user's shards: the side images are read at (their resolution, at most this: the cost grows with
# its square, and the features only need to tell the classes apart), the images read at most (held in
# memory as uint8), the optimizer steps at least (a few hundred images would otherwise give a few dozen)
MAX_INPUT_SIZE = 64
MAX_TRAIN_IMAGES = 20_000
MIN_STEPS = 300
MIN_IMAGES = 10  # fewer leave no held-out split worth the name
FALLBACK_DIR = "feature-classifier"  # in the run directory, when the shards' directory is read-only


class DigitClassifier(nn.Module):
    """(N, 3, 32, 32) images in [-1, 1] -> (pooled features (N, 4 * width), logits (N, num_classes))."""

    def __init__(self, num_classes: int = 10, width: int = 16, input_size: int = INPUT_SIZE):
        super().__init__()
        # fully convolutional up to a global pooling: input_size is the side it was trained at
        self.num_classes, self.width, self.input_size = num_classes, width, input_size

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            # the digits carry 8x8 pixels of information: halving 32x32 first makes training 4x cheaper
            nn.AvgPool2d(2),
            *block(3, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    @property
    def num_features(self) -> int:
        return 4 * self.width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def demo_classifier_ready(
    shards_dir: str | os.PathLike = DEMO_SHARDS, *, home: str | os.PathLike | None = None
) -> bool:
    """Whether SHARDS_DIR (or HOME) holds a classifier trained on exactly the shards there now (and intact)."""
    shards_dir = Path(shards_dir)
    home = Path(home) if home is not None else shards_dir
    try:
        record = json.loads((home / RECORD_FILE).read_text())
        return record["manifest_sha256"] == sha256(shards_dir / "manifest.json") and record["weights_sha256"] == sha256(
            home / WEIGHTS_FILE
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def train_demo_classifier(
    shards_dir: str | os.PathLike = DEMO_SHARDS,
    *,
    seed: int = 0,
    num_epochs: int = 8,
    held_out_fraction: float = 0.2,
    batch_size: int = 64,
    width: int = 16,
    input_size: int = INPUT_SIZE,
    min_steps: int = 0,
    max_images: int | None = None,
    home: str | os.PathLike | None = None,
    log: Log | None = None,
) -> dict:
    """Train the classifier on SHARDS_DIR, save it there (or in HOME), and return its record (also
    `classifier.json`). The demo's defaults; on other shards `ensure_classifier` passes the images'
    side (`input_size`), at least `min_steps` optimizer steps and at most `max_images` images (the
    first ones, in stored order: the build shuffled them). `log` gets a line every ~10 s of training.

    Deterministic given the seed: the split, the initial weights, the batch order and the shifts all
    draw from it, and training runs on one thread (other CPU kinds may still differ in the last bits).
    """
    from safetensors.torch import save_file

    from pipeline.data.dali import real_images

    shards_dir = Path(shards_dir)
    home = Path(home) if home is not None else shards_dir
    manifest = read_manifest(shards_dir)
    if manifest is None:
        raise user_error(
            f"no complete shard build in {shards_dir}",
            file=str(shards_dir),
            hint="write the demo shards first: `just demo-data`",
        )
    batches, count = [], 0
    for images_batch, labels_batch in real_images(shards_dir, resolution=input_size):
        batches.append((images_batch, labels_batch))
        count += len(labels_batch)
        if max_images is not None and count >= max_images:
            break
    # uint8 in memory (a quarter of float32), scaled to [-1, 1] per batch
    images = torch.cat([b[0] for b in batches])[:max_images]
    labels = torch.cat([b[1] for b in batches])[:max_images]

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    num_held_out = round(len(labels) * held_out_fraction)
    held_out, train = order[:num_held_out].sort().values, order[num_held_out:]
    # one thread: the weights then do not depend on the machine's core count (a net this small gains
    # nothing from more, and loses much when other processes share the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DigitClassifier(manifest["num_classes"], width, input_size)
        steps_per_epoch = -(-len(train) // batch_size)
        num_epochs = max(num_epochs, -(-min_steps // steps_per_epoch))
        _fit(net, images[train], labels[train], gen, num_epochs=num_epochs, batch_size=batch_size, log=log)
        with torch.no_grad():
            predicted = torch.cat([net(_scaled(images[b]))[1].argmax(1) for b in held_out.split(256)])
    finally:
        torch.set_num_threads(threads)
    accuracy = (predicted == labels[held_out]).float().mean().item()
    train_seconds = time.perf_counter() - start

    home.mkdir(parents=True, exist_ok=True)
    weights = home / WEIGHTS_FILE
    tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
    # one metadata entry: safetensors writes several in a random order, and the file's sha256 identifies the net
    architecture = {
        "num_classes": net.num_classes,
        "width": width,
        "input_size": input_size,
        "classes": manifest["classes"],
    }
    save_file(net.state_dict(), tmp, metadata={"architecture": json.dumps(architecture)})
    os.replace(tmp, weights)
    record = {
        "held_out_accuracy": accuracy,
        "num_train": len(train),
        "num_held_out": num_held_out,
        "seed": seed,
        "num_epochs": num_epochs,
        "train_seconds": round(train_seconds, 2),
        "weights_sha256": sha256(weights),
        "manifest_sha256": sha256(shards_dir / "manifest.json"),
        # positions in the stored order of the shards, as DALI reads them with shuffling off
        "held_out_positions": held_out.tolist(),
    }
    if home != shards_dir:
        record["shards"] = str(shards_dir)
    (home / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _is_demo(manifest: dict) -> bool:
    """Shards of the embedded demo data (the digits, or a domain of the two-domain digits)."""
    from pipeline.data.demo import DEMO_SOURCE

    return str(manifest.get("source", "")).startswith(DEMO_SOURCE)


def classifier_problem(manifest: dict) -> str | None:
    """Why no feature classifier can be trained on shards with this manifest; None when one can."""
    if manifest["num_classes"] < 2:
        return (
            f"the feature classifier of eval.features=demo learns to tell the classes of the shards apart, and "
            f"they hold {manifest['num_classes']} class"
        )
    if manifest["num_samples"] < MIN_IMAGES:
        return (
            f"the feature classifier of eval.features=demo needs at least {MIN_IMAGES} images; the shards "
            f"hold {manifest['num_samples']}"
        )
    return None


def ensure_classifier(
    shards_dir: str | os.PathLike, *, resolution: int, fallback: str | os.PathLike, log: Log | None = None
) -> Path:
    """The weights of a feature classifier trained on the shards in SHARDS_DIR, trained first when
    there is none (seconds on the demo; about a minute on 20,000 images on one CPU core): beside the
    shards, or in FALLBACK when their directory is read-only. The demo's shards get the demo's
    classifier (as `demo-data` trains it); others one at their `resolution` (at most MAX_INPUT_SIZE)."""
    shards_dir, fallback = Path(shards_dir), Path(fallback)
    for home in (shards_dir, fallback):
        if demo_classifier_ready(shards_dir, home=home):
            return home / WEIGHTS_FILE
    manifest = read_manifest(shards_dir)
    if manifest is None:
        raise user_error(
            f"no complete shard build in {shards_dir} to train the feature classifier on",
            path="data.shards",
            file=str(shards_dir),
            hint="build them with `python -m pipeline shards build SRC OUT`",
        )
    problem = classifier_problem(manifest)
    if problem is not None:
        raise user_error(
            problem,
            path="eval.features",
            hint="give eval.features=inception:PATH, or switch evaluation off: eval.every=0",
        )
    home = shards_dir if os.access(shards_dir, os.W_OK) else fallback
    say = log or (lambda message: None)
    if _is_demo(manifest):
        options: dict = {}
        size = INPUT_SIZE
    else:
        size = min(resolution, MAX_INPUT_SIZE)
        options = {"input_size": size, "min_steps": MIN_STEPS, "max_images": MAX_TRAIN_IMAGES}
    num = min(manifest["num_samples"], MAX_TRAIN_IMAGES)
    say(
        f"training the feature classifier (eval.features: demo) on {shards_dir}: {num:,} images of "
        f"{manifest['num_classes']} classes at {size}x{size}, once (kept in {home})"
    )
    record = train_demo_classifier(shards_dir, home=home, log=log, **options)
    say(
        f"feature classifier trained in {record['train_seconds']:.1f} s, held-out accuracy "
        f"{record['held_out_accuracy']:.1%} ({record['num_held_out']} images)"
    )
    return home / WEIGHTS_FILE


def build_domain_demo(
    out: str | os.PathLike = DEMO_DOMAIN_SHARDS, *, overwrite: bool = False, log: Log | None = None
) -> dict:
    """Write OUT/a and OUT/b and train the demo classifier beside each; returns {"a": manifest, "b": manifest}.

    Re-running keeps finished shards and classifiers trained on them; `overwrite` rebuilds both."""
    log = log or (lambda message: None)

    def train_classifier(domain_dir: Path) -> None:
        if overwrite or not demo_classifier_ready(domain_dir):
            record = train_demo_classifier(domain_dir)
            log(
                f"{domain_dir}: demo classifier trained in {record['train_seconds']:.1f} s, "
                f"held-out accuracy {record['held_out_accuracy']:.3f}"
            )

    return build_domain_shards(out, overwrite=overwrite, log=log, each=train_classifier)


def domain_demo_ready(out: str | os.PathLike = DEMO_DOMAIN_SHARDS) -> bool:
    """Whether OUT holds a finished build of both domains, each with a classifier trained on its shards."""
    return domain_shards_ready(out) and all(demo_classifier_ready(Path(out) / domain) for domain in DOMAINS)


def _fit(
    net: DigitClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    *,
    num_epochs: int,
    batch_size: int,
    log: Log | None = None,
) -> None:
    steps_per_epoch = -(-len(labels) // batch_size)
    said = time.perf_counter()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    # one-cycle: a high peak rate gets a net this small to >97% within a few epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=num_epochs * steps_per_epoch)
    net.train()
    for epoch in range(num_epochs):
        for batch in torch.randperm(len(labels), generator=gen).split(batch_size):
            # shifts of up to 2 px: generated digits are seldom centred exactly like the real ones
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = _scaled(torch.roll(images[batch], shifts=shift, dims=(2, 3)))
            loss = F.cross_entropy(net(x)[1], labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        if log is not None and time.perf_counter() - said > 10:
            said = time.perf_counter()
            log(f"  feature classifier: epoch {epoch + 1}/{num_epochs}, loss {loss.item():.3f}")
    net.eval()


def _scaled(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 -> float in [-1, 1] (the demo's classifier was trained on them so)."""
    return images.float() / 127.5 - 1


def load_demo_classifier(path: str | os.PathLike) -> tuple[DigitClassifier, dict]:
    """The classifier saved at PATH and its classes ({name: index}), ready for inference."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            architecture = json.loads((f.metadata() or {})["architecture"])
        net = DigitClassifier(
            architecture["num_classes"], architecture["width"], architecture.get("input_size", INPUT_SIZE)
        )
        net.load_state_dict(load_file(str(path)))
        classes = architecture["classes"]
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise user_error(
            f"{path} is not a demo classifier this code wrote ({type(exc).__name__}: {exc})",
            file=str(path),
            hint="retrain it: `just demo-data --force`",
        ) from None
    return net.eval().requires_grad_(False), classes
