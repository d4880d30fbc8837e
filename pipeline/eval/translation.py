"""Evaluating image-to-image translation between two domains (`pipeline.data.domains`): sample
grids and scores of a pair of generators G_AB: A -> B and G_BA: B -> A.

A generator here is any module mapping (N, 3, H, W) images in [-1, 1] to images of the same shape;
the caller loads the trained networks and puts them on the device.

`evaluate_translation` scores each direction in the target domain, with the demo classifier trained
beside the target domain's shards as feature network:

  fid                            FID of the translated source images against all real target images
                                 (reference statistics cached beside the target shards, `metrics.reference_stats`)
  content_accuracy               the share of translated images the target classifier reads as the
                                 source image's digit: whether the translation kept the content
  fid_untranslated,              the same of the source images as they are: the baseline that
  content_accuracy_untranslated  a translation must beat
  cycle_l1                       mean |G_back(G_fwd(x)) - x| in [-1, 1] units: cycle consistency

The source images are all images of the source shards (or the first `num_samples`) in stored order.
The target classifier never saw them (the domains are disjoint), so none is needed held out.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import user_error
from pipeline.images import save_png, to_uint8

DIRECTIONS = {"A->B": ("a", "b"), "B->A": ("b", "a")}


def translation_grid(g_forward: nn.Module, g_backward: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(3, N, C, H, W) in [-1, 1]: row 0 the N input IMAGES, row 1 g_forward of them (translated),
    row 2 g_backward of those (cycled back), one column per input; `save_png` tiles it."""
    with torch.no_grad():
        translated = g_forward(images)
        cycled = g_backward(translated)
    return torch.stack([images, translated, cycled]).clamp(-1, 1)


def save_translation_grid(g_forward: nn.Module, g_backward: nn.Module, images: torch.Tensor, path) -> Path:
    """`translation_grid` as a PNG at PATH (rows: input, translated, cycled); returns the path."""
    path = Path(path)
    save_png(translation_grid(g_forward, g_backward, images).cpu(), path, row_labels=["input", "translated", "cycled"])
    return path


def _source_images(shards_dir: Path, *, resolution: int, num_samples: int | None, batch_size: int, device):
    from pipeline.data.dali import real_images

    batches, count = [], 0
    for images, labels in real_images(shards_dir, resolution=resolution, batch_size=batch_size, device=device):
        if num_samples is not None:
            images, labels = images[: num_samples - count], labels[: num_samples - count]
        batches.append((images, labels))
        count += len(labels)
        if num_samples is not None and count >= num_samples:
            break
    if num_samples is not None and count < num_samples:
        raise user_error(
            f"num_samples is {num_samples}, but {shards_dir} holds only {count} images",
            path="num_samples",
            hint=f"give at most {count}, or leave it out to translate them all",
        )
    return batches


def _translate(g_forward: nn.Module, g_backward: nn.Module, batches, *, direction: str):
    """uint8 batches of translated images with the source labels, and the summed cycle L1 error."""
    translated, cycle_error = [], 0.0
    for images, labels in batches:
        x = images.float() / 127.5 - 1
        y = g_forward(x)
        if y.shape != x.shape:
            raise user_error(
                f"the {direction} generator maps images {tuple(x.shape)} to {tuple(y.shape)}",
                hint="a translation generator returns images of its input's shape",
            )
        cycle_error += (g_backward(y).float() - x).abs().mean((1, 2, 3)).sum().item()
        translated.append((to_uint8(y), labels))
    return translated, cycle_error


def _domain_net(shards_dir: Path, device):
    from pipeline.eval.classifier import WEIGHTS_FILE, demo_classifier_ready
    from pipeline.eval.features import load_feature_net

    if not demo_classifier_ready(shards_dir):
        raise user_error(
            f"{shards_dir} has no demo classifier trained on its shards",
            file=str(shards_dir),
            hint="build the two-domain demo data with pipeline.data.domains.build_domain_shards, "
            "which trains one beside each domain",
        )
    return load_feature_net(f"demo:{Path(shards_dir) / WEIGHTS_FILE}", device, what="shards")


def evaluate_translation(
    g_ab: nn.Module,
    g_ba: nn.Module,
    shards_a: str | os.PathLike,
    shards_b: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    num_samples: int | None = None,
    batch_size: int = 250,
    seed: int = 0,
) -> dict:
    """Scores of both directions (see the module docstring), as plain floats:
    {"A->B": {"fid", "content_accuracy", "fid_untranslated", "content_accuracy_untranslated",
    "cycle_l1"}, "B->A": {...}, "protocol": {"A->B": {...}, "B->A": {...}}}.

    The generators run in eval mode (their modes are restored afterwards) without gradients, inside
    a generator state seeded with `seed`, which also seeds KID's subsets: the same inputs give the
    same scores. Their inputs are moved to DEVICE, where the generators must be."""
    from pipeline.eval.metrics import Scorer, reference_stats

    shards = {"a": Path(shards_a), "b": Path(shards_b)}
    nets = {domain: _domain_net(path, device) for domain, path in shards.items()}
    generators = {"A->B": (g_ab, g_ba), "B->A": (g_ba, g_ab)}
    was_training = [g.training for g in (g_ab, g_ba)]
    result, protocol = {}, {}
    device = torch.device(device)
    try:
        for g in (g_ab, g_ba):
            g.eval()
        for direction, (source, target) in DIRECTIONS.items():
            reference = reference_stats(shards[target], nets[target], batch_size=batch_size)
            assert reference.resolution is not None  # (computed from shards, not published)
            scorer = Scorer(nets[target], reference, seed=seed)
            batches = _source_images(
                shards[source],
                resolution=reference.resolution,
                num_samples=num_samples,
                batch_size=batch_size,
                device=device,
            )
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                translated, cycle_error = _translate(*generators[direction], batches, direction=direction)
            scores, baseline = scorer(translated), scorer(batches)
            result[direction] = {
                "fid": scores["fid"],
                "content_accuracy": scores["class_accuracy"],
                "fid_untranslated": baseline["fid"],
                "content_accuracy_untranslated": baseline["class_accuracy"],
                "cycle_l1": cycle_error / scores["protocol"]["num_samples"],
            }
            which = "all" if num_samples is None else "the first"
            protocol[direction] = {
                **scores["protocol"],
                "source_data": f"{shards[source]}: {which} {scores['protocol']['num_samples']} images in stored order",
                "target_real_class_accuracy": reference.real_class_accuracy,
            }
    finally:
        for g, mode in zip((g_ab, g_ba), was_training, strict=True):
            g.train(mode)
    return result | {"protocol": protocol}


# ----- the `sample` and `eval` commands for a run that translates (method.use: translate)
def sample_command(ns, gen, device) -> int:
    """`sample` of an image-to-image run: rows of input | translated | cycled, each direction in its own grid."""
    from pipeline.data.dali import first_images
    from pipeline.eval.sampling import load_generator

    spec, m = gen.spec, gen.spec.method
    nets = {name: load_generator(ns.source, device=device, network=name).module for name in (m.g_ab, m.g_ba)}
    out = Path(ns.out) if ns.out else gen.home / "samples" / f"translate-{time.strftime('%Y%m%d-%H%M%S')}"
    directions = {"a_to_b": (m.g_ab, m.g_ba, m.domain_a), "b_to_a": (m.g_ba, m.g_ab, m.domain_b)}
    for direction, (forward, backward, stream) in directions.items():
        if ns.input:
            from pipeline.data.dali import find_shards, first_shard_images

            images = first_shard_images(find_shards(ns.input, what="--input"), spec, ns.num, device)
        else:
            images = first_images(spec, stream, ns.num, device)
        path = save_translation_grid(nets[forward], nets[backward], images, out / f"{direction}.png")
        print(f"{gen.source}: {direction.replace('_', ' ')} (input | translated | cycled) written to {path}")
        if ns.input:
            print("  (the same --input images through both directions)")
    return 0


def eval_command(ns, gen, device) -> int:
    """`eval` of an image-to-image run: FID in the target domain and content kept, each direction."""
    from pipeline.eval.sampling import load_generator

    spec, m = gen.spec, gen.spec.method
    streams = spec.data.all_streams()
    nets = {name: load_generator(ns.source, device=device, network=name).module for name in (m.g_ab, m.g_ba)}
    result = evaluate_translation(
        nets[m.g_ab],
        nets[m.g_ba],
        Path(streams[m.domain_a].shards),
        Path(streams[m.domain_b].shards),
        device=device,
        num_samples=ns.num or spec.eval.num_samples,
        seed=spec.seed if ns.seed is None else ns.seed,
    )
    out = Path(ns.out) if ns.out else gen.home / "eval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"translation-step-{gen.step}.json"
    path.write_text(json.dumps({"source": gen.source, **result}, indent=2) + "\n")
    if ns.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{gen.source}:")
    print(f"{'direction':>9}  {'FID':>8}  {'content':>8}  {'FID as is':>9}  {'content as is':>13}  {'cycle L1':>8}")
    for direction, r in result.items():
        if direction != "protocol":
            print(
                f"{direction:>9}  {r['fid']:8.2f}  {r['content_accuracy']:8.1%}  {r['fid_untranslated']:9.2f}  "
                f"{r['content_accuracy_untranslated']:13.1%}  {r['cycle_l1']:8.4f}"
            )
    print(f"written to {path}")
    return 0
