"""The demo classifier: a small CNN that tells the demo digits apart, the feature network of the demo.

`python -m pipeline demo-data` trains it in seconds on CPU, on a deterministic split of the demo
shards, and saves it beside them: `classifier.safetensors` (weights, with its architecture in the
metadata) and `classifier.json` (held-out accuracy, seed, the split, the manifest it was trained on).
It trains one beside each domain of the two-domain demo too (`build_domain_demo`).
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
INPUT_SIZE = 32


class DigitClassifier(nn.Module):
    """(N, 3, 32, 32) images in [-1, 1] -> (pooled features (N, 4 * width), logits (N, num_classes))."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.num_classes, self.width = num_classes, width

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


def demo_classifier_ready(shards_dir: str | os.PathLike = DEMO_SHARDS) -> bool:
    """Whether SHARDS_DIR holds a classifier trained on exactly the shards there now (and intact)."""
    shards_dir = Path(shards_dir)
    try:
        record = json.loads((shards_dir / RECORD_FILE).read_text())
        return record["manifest_sha256"] == sha256(shards_dir / "manifest.json") and record["weights_sha256"] == sha256(
            shards_dir / WEIGHTS_FILE
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
) -> dict:
    """Train the classifier on SHARDS_DIR, save it there, and return its record (also `classifier.json`).

    Deterministic given the seed: the split, the initial weights, the batch order and the shifts all
    draw from it, and training runs on one thread (other CPU kinds may still differ in the last bits).
    """
    from safetensors.torch import save_file

    from pipeline.data.dali import real_images

    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    if manifest is None:
        raise user_error(
            f"no complete shard build in {shards_dir}",
            file=str(shards_dir),
            hint="write the demo shards first: `just demo-data`",
        )
    batches = list(real_images(shards_dir, resolution=INPUT_SIZE))
    images = torch.cat([b[0] for b in batches]).float() / 127.5 - 1
    labels = torch.cat([b[1] for b in batches])

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
            net = DigitClassifier(manifest["num_classes"], width)
        _fit(net, images[train], labels[train], gen, num_epochs=num_epochs, batch_size=batch_size)
        with torch.no_grad():
            predicted = torch.cat([net(images[b])[1].argmax(1) for b in held_out.split(256)])
    finally:
        torch.set_num_threads(threads)
    accuracy = (predicted == labels[held_out]).float().mean().item()
    train_seconds = time.perf_counter() - start

    weights = shards_dir / WEIGHTS_FILE
    tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
    # one metadata entry: safetensors writes several in a random order, and the file's sha256 identifies the net
    architecture = {
        "num_classes": net.num_classes,
        "width": width,
        "input_size": INPUT_SIZE,
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
    (shards_dir / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


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
) -> None:
    steps_per_epoch = -(-len(labels) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    # one-cycle: a high peak rate gets a net this small to >97% within a few epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=num_epochs * steps_per_epoch)
    net.train()
    for _ in range(num_epochs):
        for batch in torch.randperm(len(labels), generator=gen).split(batch_size):
            # shifts of up to 2 px: generated digits are seldom centred exactly like the real ones
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(images[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(x)[1], labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()


def load_demo_classifier(path: str | os.PathLike) -> tuple[DigitClassifier, dict]:
    """The classifier saved at PATH and its classes ({name: index}), ready for inference."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            architecture = json.loads((f.metadata() or {})["architecture"])
        net = DigitClassifier(architecture["num_classes"], architecture["width"])
        net.load_state_dict(load_file(str(path)))
        classes = architecture["classes"]
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise user_error(
            f"{path} is not a demo classifier this code wrote ({type(exc).__name__}: {exc})",
            file=str(path),
            hint="retrain it: `just demo-data --force`",
        ) from None
    return net.eval().requires_grad_(False), classes
