"""`python -m pipeline eval RUN`: FID, KID, IS and class accuracy of a trained generator, at one
truncation or a sweep of them, each score recorded with the protocol that produced it; and the
same evaluation every `eval.every` steps during training."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.data import DEMO_SHARDS
from pipeline.errors import user_error
from pipeline.eval.features import FeatureNet, load_feature_net
from pipeline.eval.metrics import Scorer, published_stats, reference_stats
from pipeline.eval.protocol import STANDING_STATS_BATCH, protocol_tag
from pipeline.eval.sampling import sample_latents, standing_stats
from pipeline.images import to_uint8


def feature_net_for(spec, features: str, device, *, shards: str | None = None) -> FeatureNet:
    """The feature network `features` names. Plain `demo` is the classifier beside the shards
    compared with (the spec's unless given), trained there first if it is missing: the demo's in
    seconds, on other shards at their resolution (`classifier.ensure_classifier`)."""
    if features == "demo":
        from pipeline.eval.classifier import FALLBACK_DIR, ensure_classifier
        from pipeline.train.progress import say

        path = ensure_classifier(
            shards or spec.data.shards or DEMO_SHARDS,
            resolution=spec.data.resolution,
            fallback=spec.run_dir / FALLBACK_DIR,
            log=say,
        )
        features = f"demo:{path}"
    return load_feature_net(features, device, what="eval.features")


def make_scorer(
    spec,
    features: str,
    device,
    *,
    shards: str | None = None,
    resolution: int | None = None,
    real_stats: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Scorer:
    """A scorer against the real statistics of the spec's shards (computed once, cached there) at
    `resolution` (default data.resolution; a growing generator's current stage), or against the
    published statistics in `real_stats` (an .npz with mu and sigma: FID only, no KID). `log`
    hears when the shards' statistics are computed (slow: every real image)."""
    if real_stats is not None:
        net = feature_net_for(spec, features, device)
        return Scorer(net, published_stats(real_stats, net))
    shards = shards or spec.data.shards
    if not shards or spec.data.synthetic:
        raise user_error(
            "evaluation compares with real images, and the spec has no shards",
            path="data.shards",
            hint="give --shards DIR (the shards the model was trained on)",
        )
    net = feature_net_for(spec, features, device, shards=shards)
    return Scorer(net, reference_stats(shards, net, resolution=resolution or spec.data.resolution, log=log))


def counted(batches: Iterator, num: int, log: Callable[[str], None] | None, *, every_s: float = 10.0) -> Iterator:
    """BATCHES as they are, with a line to `log` every `every_s` seconds: how many of `num` images are scored."""
    done, said = 0, time.perf_counter()
    for batch in batches:
        yield batch
        done += len(batch[0])
        if log is not None and done < num and time.perf_counter() - said >= every_s:
            said = time.perf_counter()
            log(f"  scored {done:,} of {num:,} samples")


def fake_batches(
    module,
    *,
    num: int,
    z_dim: int,
    num_classes: int,
    truncation: float | None,
    mode: str,
    seed: int,
    batch_size: int,
    distribution: str = "normal",
    labelled: bool = True,
):
    """`num` generated images as uint8 batches with their labels, classes in turn (balanced); the
    labels given as None when not `labelled` (an unconditional generator ignores them)."""
    device = next(module.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % num_classes
    for start in range(0, num, batch_size):
        y = labels[start : start + batch_size]
        z = sample_latents(
            len(y), z_dim, truncation, mode=mode, generator=rng, device=device, distribution=distribution
        )
        with torch.no_grad():
            yield to_uint8(module(z, y.to(device))), y if labelled else None


def evaluate_module(
    module,
    spec,
    scorer: Scorer,
    *,
    num: int,
    truncation: float | None = None,
    mode: str = "truncate",
    standing_passes: int | None = None,
    seed: int = 0,
    batch_size: int = STANDING_STATS_BATCH,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Scores of `module`'s samples. Standing statistics (by default the spec's
    `eval.standing_stats` passes) are taken on a copy: `module` is unchanged. `log` hears how far
    it is (a line every 10 s while scoring)."""
    if standing_passes is None:
        standing_passes = spec.eval.standing_stats
    labelled = conditional(spec)  # class accuracy means something for a class-conditional generator only
    was_training = module.training
    net = copy.deepcopy(module) if standing_passes else module
    if standing_passes:
        if log is not None:
            log(f"  standing statistics: {standing_passes} passes of {batch_size}")
        standing_stats(
            net,
            num_passes=standing_passes,
            batch_size=batch_size,
            z_dim=spec.latent.z_dim,
            distribution=spec.latent.distribution,
            num_classes=spec.data.num_classes,
            truncation=truncation,
            mode=mode,
            generator=torch.Generator().manual_seed(seed + 1),
            log=log,
        )
    net.eval()
    try:
        batches = fake_batches(
            net,
            num=num,
            z_dim=spec.latent.z_dim,
            distribution=spec.latent.distribution,
            num_classes=spec.data.num_classes,
            truncation=truncation,
            mode=mode,
            seed=seed,
            batch_size=batch_size,
            labelled=labelled,
        )
        result = scorer(counted(batches, num, log))
    finally:
        module.train(was_training)
    result["protocol"] |= {
        "truncation": truncation,
        "truncation_mode": mode if truncation else None,
        "standing_stats_passes": standing_passes,
        "standing_stats_batch_size": batch_size if standing_passes else None,
        "latent_seed": seed,  # the standing statistics draw from seed + 1
        "classes": "balanced" if labelled else None,  # None: an unconditional generator, given no classes
    }
    return result


def evaluate(
    source: str,
    *,
    features: str | None = None,
    num: int | None = None,
    truncations=None,
    mode: str = "truncate",
    standing_passes: int | None = None,
    seed: int | None = None,
    batch_size: int = STANDING_STATS_BATCH,
    device: str = "cpu",
    shards: str | None = None,
    real_stats: str | None = None,
    out_dir: str | None = None,
) -> dict:
    """Evaluate a run's generator (its EMA when it has one) or exported weights at each
    truncation; write eval JSON (and a FID-vs-IS plot for a sweep) and return the record.

    What is not given follows the protocol training scored with, from the spec stored with the
    weights: `eval.features`, `eval.num_samples`, `eval.truncation`, `eval.standing_stats` and
    the spec's `seed`. The files are named by step and protocol (`protocol_tag`): another
    protocol never overwrites them, the same one does, and a sweep's plot has the JSON's name."""
    from pipeline.eval.sampling import load_generator

    gen = load_generator(source, device)
    protocol = gen.spec.eval
    features = protocol.features if features is None else features
    num = protocol.num_samples if num is None else num
    truncations = [protocol.truncation] if truncations is None else list(truncations)
    standing_passes = protocol.standing_stats if standing_passes is None else standing_passes
    seed = gen.spec.seed if seed is None else seed
    from pipeline.train.progress import say

    scorer = make_scorer(gen.spec, features, device, shards=shards, real_stats=real_stats, log=say)
    results = []
    for i, truncation in enumerate(truncations, 1):
        start = time.perf_counter()
        say(f"truncation {'none' if truncation is None else truncation} ({i} of {len(truncations)}): {num:,} samples")
        result = evaluate_module(
            gen.module,
            gen.spec,
            scorer,
            num=num,
            truncation=truncation,
            mode=mode,
            standing_passes=standing_passes,
            seed=seed,
            batch_size=batch_size,
            log=say,
        )
        result["protocol"] |= {"generator": gen.source, "ema": gen.ema, "step": gen.step}
        results.append(result)
        say(f"  {describe_result(result, labelled=conditional(gen.spec))} [{time.perf_counter() - start:.1f} s]")
    out = Path(out_dir) if out_dir else gen.home / "eval"
    out.mkdir(parents=True, exist_ok=True)
    weights = f"step-{gen.step:08d}" if gen.step is not None else "weights"
    stem = f"{weights}-{protocol_tag(results)}"
    record: dict[str, Any] = {"source": gen.source, "results": results, "json": str(out / f"{stem}.json")}
    if len(results) > 1:
        record["plot"] = str(out / f"{stem}-fid-is.png")
        plot_sweep(results, Path(record["plot"]), title=gen.source)
    Path(record["json"]).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")  # scores: None, never NaN
    return record


def conditional(spec) -> bool:
    """Whether the generator a spec exports reads the class labels it is given."""
    return spec.all_networks()[spec.method.exports(spec)[0]].reads_labels()


def describe_result(result: dict, *, labelled: bool = True) -> str:
    """A result's scores in one line: FID and KID; IS and the class accuracy (where it was scored)
    only of a class-conditional generator (`labelled`): an unconditional one has no classes to be
    confident about or to match, and a digit classifier's IS of it reads like a failure that is not."""

    def show(key: str, spec: str) -> str:  # None: non-finite, or not computed (KID against --real-stats)
        value = result.get(key)
        return "-" if value is None else format(value, spec)

    scores = f"FID {show('fid', '.2f')}, KID {show('kid_mean', '.4f')}"
    if not labelled:
        return scores
    accuracy = result.get("class_accuracy")
    return f"{scores}, IS {show('is_mean', '.2f')}" + (
        f", class accuracy {accuracy:.1%}" if accuracy is not None else ""
    )


def plot_sweep(results: list[dict], path: Path, *, title: str) -> None:
    """FID against IS over the truncation sweep, as in the BigGAN paper's trade-off curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    results = [r for r in results if r["is_mean"] is not None and r["fid"] is not None]  # non-finite: not plotted
    ax.plot([r["is_mean"] for r in results], [r["fid"] for r in results], "o-", color="#4c72b0")
    for r in results:
        t = r["protocol"]["truncation"]
        ax.annotate(f" {t if t is not None else 'none'}", (r["is_mean"], r["fid"]), fontsize=8)
    ax.set_xlabel("IS (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"{title}\ntruncation sweep ({results[0]['protocol']['feature_net']} features)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
