"""What a trained generator makes: `sample` writes grids, per-image PNGs and interpolations, and
`eval` scores FID, KID, IS and class accuracy over one truncation or a sweep; image-to-image runs
(method cycle) are handed to `pipeline.eval.translation`.
"""

from __future__ import annotations

import json

from pipeline.errors import user_error


def cmd_sample(ns) -> int:
    import time
    from pathlib import Path

    import torch

    from pipeline.eval.sampling import load_generator, write_samples

    classes = None
    if ns.classes is not None and ns.classes != "all":
        words = [w.strip() for w in ns.classes.split(",") if w.strip()]
        if not words or not all(w.isdigit() for w in words):
            raise user_error(
                f"--classes {ns.classes!r} is not a list of class numbers",
                hint="e.g. --classes 0,3,7, or --classes all",
            )
        classes = [int(w) for w in words]
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(ns.source, device=device)
    if gen.spec.method.use == "translate":
        from pipeline.eval.translation import sample_command

        return sample_command(ns, gen, device)
    if ns.input:
        raise user_error("--input is for image-to-image runs (method cycle)", hint="sample a GAN with --classes")
    if ns.classes == "all":
        classes = list(range(gen.num_classes))
    out = Path(ns.out) if ns.out else gen.home / "samples" / f"sample-{time.strftime('%Y%m%d-%H%M%S')}-seed{ns.seed}"
    record = write_samples(
        gen,
        out,
        classes=classes,
        num_per_class=ns.num,
        truncation=ns.truncation,
        mode=ns.truncation_mode,
        standing_passes=ns.standing_stats,
        batch_size=ns.batch_size,
        seed=ns.seed,
        interpolate=ns.interpolate,
        num_steps=ns.steps,
        gif=ns.gif,
    )
    passes = record["standing_stats"]["num_passes"] if record["standing_stats"] else 0
    print(
        f"{gen.source}: {len(record['classes'])} classes x {ns.num} images written to {out} "
        f"(truncation: {_truncation(record['truncation'])}; standing statistics: {passes} passes)"
    )
    for name in record["files"].values():
        print(f"  {name}")
    return 0


def _truncation(record: dict | None) -> str:
    return "none" if record is None else f"{record['value']} ({record['mode']})"


def parse_truncations(text: str) -> list[float | None]:
    """`0.5` or a sweep `0.25,0.5,1,none` (none: no truncation)."""
    values = []
    for word in (w.strip() for w in text.split(",")):
        try:
            value = None if word.lower() == "none" else float(word)
        except ValueError:
            value = -1.0
        if value is not None and value <= 0:
            raise user_error(
                f"--truncation {text!r}: {word!r} is not a positive number or none",
                hint="e.g. --truncation 0.5, or a sweep --truncation 0.25,0.5,1,2,none",
            )
        values.append(value)
    return values


def cmd_eval(ns) -> int:
    import torch

    from pipeline.eval.evaluate import evaluate

    if (ns.num is not None and ns.num < 2) or (ns.standing_stats or 0) < 0 or ns.batch_size < 2:
        raise user_error("--num and --batch-size must be at least 2, --standing-stats at least 0")
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from pipeline.eval.sampling import load_generator

    gen = load_generator(ns.source, device=device)
    if gen.spec.method.use == "translate":
        from pipeline.eval.translation import eval_command

        return eval_command(ns, gen, device)
    record = evaluate(  # options not given (None) follow the run's own spec
        ns.source,
        features=ns.features,
        num=ns.num,
        truncations=None if ns.truncation is None else parse_truncations(ns.truncation),
        mode=ns.truncation_mode,
        standing_passes=ns.standing_stats,
        seed=ns.seed,
        batch_size=ns.batch_size,
        device=device,
        shards=ns.shards,
        real_stats=ns.real_stats,
        out_dir=ns.out,
    )
    if ns.json:
        print(json.dumps(record, indent=2))
        return 0
    first = record["results"][0]["protocol"]
    weights = f", {first['feature_net_weights']}" if "feature_net_weights" in first else ""
    print(
        f"{record['source']}: {first['num_samples']} samples, {first['feature_net']} features "
        f"(sha256 {first['feature_net_sha256'][:12]}{weights}), standing stats: {first['standing_stats_passes']} passes"
    )
    if first.get("real_stats_sha256"):
        print(f"real statistics: {first['real_stats']} (sha256 {first['real_stats_sha256'][:12]}); KID not computed")

    def show(value, spec: str, width: int) -> str:
        return f"{'-' if value is None else format(value, spec):>{width}}"

    # an unconditional generator: FID and KID only (no classes to match; IS of a digit classifier misleads)
    labelled = first.get("classes") is not None
    print(f"{'truncation':>10}  {'FID':>9}  {'KID':>9}" + (f"  {'IS':>7}  {'class acc':>9}" if labelled else ""))
    for r in record["results"]:
        t = r["protocol"]["truncation"]
        row = f"{'none' if t is None else t:>10}  {show(r['fid'], '.3f', 9)}  {show(r['kid_mean'], '.4f', 9)}"
        print(row + (f"  {show(r['is_mean'], '.3f', 7)}  {show(r['class_accuracy'], '.1%', 9)}" if labelled else ""))
        if r.get("non_finite"):
            print(f"{'':>10}  non-finite, written as null: {', '.join(r['non_finite'])}")
    print(f"written to {record['json']}" + (f" and {record['plot']}" if "plot" in record else ""))
    return 0
