"""One entry point: `python -m pipeline <command> [spec=NAME | SPEC] [key=value ...]`.

User errors (bad specs, bad overrides, missing files) print what is wrong, where and how to fix
it, and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable

from pipeline.data import DEMO_DOMAIN_SHARDS, DEMO_SHARDS
from pipeline.errors import SpecError, user_error


def split_spec_args(args: list[str], default: str | None = None) -> tuple[str, list[str]]:
    """`spec=NAME` (or the first bare word) names the spec; the other words are key=value overrides."""
    spec, overrides = None, []
    for arg in args:
        if arg.startswith("spec="):
            spec = arg.removeprefix("spec=")
        elif "=" not in arg and spec is None:
            spec = arg
        else:
            overrides.append(arg)
    spec = spec or default
    if not spec:
        raise user_error("no spec given", hint="name one: spec=biggan_deep_256, or a path to a .yaml file")
    return spec, overrides


def _network_json(plan) -> dict:
    return {
        "params": plan.params,
        "flops_per_image": plan.flops_per_image,
        "sn_flops_per_forward": plan.sn_flops_per_forward,
        "output_shape": list(plan.output_shapes[0]),
        "output_shapes": [list(s) for s in plan.output_shapes],
        "nodes": [
            {"name": r.name, "kind": r.kind, "output_shape": r.shape, "params": r.params, "flops_per_image": r.flops}
            for r in plan.rows
        ],
        **({"stages": [dataclasses.asdict(stage) for stage in plan.growth.stages]} if plan.growth else {}),
    }


def cmd_validate(ns) -> int:
    from pipeline.graph import analyze_spec, output_warnings
    from pipeline.spec import load_spec
    from pipeline.train.preflight import preflight

    spec_arg, overrides = split_spec_args(ns.args)
    loaded = load_spec(spec_arg, overrides, check_graphs=False)
    plans = analyze_spec(loaded)
    train_needs = preflight(loaded.spec, world_size=1)  # a valid spec may still lack its data
    advice = output_warnings(loaded)
    from pipeline.methods import describe

    spec = loaded.spec
    method = spec.resolved()["method"]
    phases = describe(spec.method.build(spec).phases)
    if ns.json:
        out = {
            "name": spec.name,
            "file": str(loaded.path),
            "method": method,
            "phases": phases,
            "engines": {name: list(nets) for name, nets in spec.method.engines(spec).items()},
            "streams": list(spec.method.streams(spec)),
            **{which: _network_json(plan) for which, plan in plans.items()},
            "train_needs": [issue.format() for issue in train_needs],
            "warnings": [issue.format() for issue in advice],
        }
        print(json.dumps(out, indent=2))
        return 0
    from pipeline.graph.report import print_report

    options = ", ".join(f"{k}={v}" for k, v in method.items() if k != "kind")
    print(f"method {method['kind']} ({options}); a step: {phases}")
    print_report(loaded, plans)
    for issue in advice:
        print("warning: " + issue.format().replace("\n", "\n  "))
    if train_needs:
        missing = "1 thing is" if len(train_needs) == 1 else f"{len(train_needs)} things are"
        print(f"The spec is valid. Before `train` can run it (on 1 rank), {missing} missing:")
        for issue in train_needs:
            print("  " + issue.format().replace("\n", "\n  "))
    else:
        print("The spec is valid, and `train` has what it needs to start (data found, batch splits over 1 rank).")
    return 0


def launch(num: int, command: str, argv: list[str]) -> int:
    """Run `num` ranks of `python -m pipeline COMMAND` on this machine (the environment DeepSpeed's
    launcher would set). Several machines: `deepspeed --hostfile FILE --module pipeline train ...`."""
    import subprocess
    import time

    from pipeline.distributed.engines import free_port

    port = str(free_port())
    procs = []
    for rank in range(num):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(num),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", command, *argv], env=env))
    # a rank that fails (a refusal, a crash) takes the others down rather than leaving them
    # waiting for it in a collective; one stopped by Ctrl-C (130) lets the others save and stop too
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0, 130) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return max((p.returncode for p in procs), key=abs)


def split_run_args(args: list[str]) -> tuple[int, str | None, list[str]]:
    """(number of local ranks, device, the rest) from `procs=N` (CPU ranks), `gpus=N`, `device=`."""
    ranks, device, rest = 1, None, []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("procs", "gpus"):
            if not value.isdigit() or int(value) < 1:
                raise user_error(f"{key}={value}: give a number of processes, e.g. {key}=2")
            ranks, device = int(value), ("cpu" if key == "procs" else device)
        elif key == "device":
            device = value
        else:
            rest.append(arg)
    return ranks, device, rest


def ensure_demo_shards(loaded) -> None:
    """Write the embedded demo data on first use: the digits, or the two-domain digits."""
    from pipeline.data.demo import build_demo_shards, demo_shards_ready
    from pipeline.eval.classifier import build_domain_demo, domain_demo_ready
    from pipeline.train.preflight import world_size_from_environment

    read = {s.shards for s in loaded.spec.data.all_streams().values() if not s.synthetic}
    missing: list[tuple[str, Callable[..., dict], str]] = []
    if DEMO_SHARDS in read and not demo_shards_ready():
        missing.append((DEMO_SHARDS, build_demo_shards, "demo"))
    if read & {f"{DEMO_DOMAIN_SHARDS}/a", f"{DEMO_DOMAIN_SHARDS}/b"} and not domain_demo_ready():
        missing.append((DEMO_DOMAIN_SHARDS, build_domain_demo, "two-domain demo"))
    for where, build, what in missing:
        if world_size_from_environment() > 1:  # every rank of an outside launcher would write them at once
            raise user_error(
                f"the {what} shards {where} are not written yet, and the ranks of a launched run do not write them",
                path="data.shards",
                hint="write them once first: `python -m pipeline demo-data` (or `just demo-data`)",
            )
        print(f"writing the {what} shards to {where}", file=sys.stderr)
        build(where)


def cmd_train(ns) -> int:
    from pipeline.spec import load_spec
    from pipeline.train.preflight import check_before_building, world_size_from_environment

    ranks, device, rest = split_run_args(ns.args)
    spec_arg, overrides = split_spec_args(rest, default="demo")
    loaded = load_spec(spec_arg, overrides)
    ensure_demo_shards(loaded)  # once, before any rank starts
    if ranks > 1:
        check_before_building(loaded.spec, ranks)  # one refusal, not one per rank
        return launch(ranks, "train", rest + ([f"device={device}"] if device else []))
    from pipeline.eval.during_training import evaluator_for
    from pipeline.train.loop import train

    try:
        summary = train(loaded, device=device, evaluate=evaluator_for(loaded.spec))
    except RuntimeError as exc:
        from pipeline.distributed.engines import lost_peer

        if not lost_peer(exc):
            raise
        print(lost_peer_message(loaded.spec, exc), file=sys.stderr)
        return 1
    if world_size_from_environment() == 1 or os.environ.get("RANK", "0") == "0":
        print(train_report(summary, loaded.spec), file=sys.stderr)
    return 0


def lost_peer_message(spec, exc: RuntimeError) -> str:
    """What a rank says when a collective failed because another rank is gone or hung: which
    checkpoint the run can resume from, and how."""
    from pipeline.train import checkpoint
    from pipeline.train.preflight import rank_from_environment

    last = checkpoint.latest(spec.run_dir)
    where = (
        f"the last complete checkpoint is {last}; run the same command again (on every node) to resume from it"
        if last is not None
        else "no checkpoint was written yet; run the same command again (on every node) to start over"
    )
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"rank {rank_from_environment()}: error: another rank of this run stopped or stopped answering (killed, "
        f"crashed, its node lost, or silent for more than run.collective_timeout_s={spec.run.collective_timeout_s:g} "
        f"s), so the run stops here; {where}\n  (the collective said: {said[:300]})"
    )


def train_report(summary, spec) -> str:
    """What a finished `train` says: where the run stands and the scores of its last evaluation."""
    from pipeline.eval.during_training import describe_scores
    from pipeline.runs import Run

    run = Run(summary.run_dir)
    if summary.steps_run == 0:
        lines = [
            f"{run.root} is already complete: step {summary.step} (train.max_steps {summary.max_steps}); nothing "
            "to train. Train longer with train.max_steps=N, or start a new run with run.dir=PATH."
        ]
    else:
        lines = [f"{run.root}: trained to step {summary.step} of {summary.max_steps} ({summary.images_seen:,} images)"]
    evals = [record for record in run.metrics.records() if "eval_protocol" in record]
    if evals:
        lines.append(f"last evaluation, step {evals[-1]['step']}: {describe_scores(evals[-1], spec.method.use)}")
    exported = sorted(run.export.glob("*.safetensors"))
    if exported:
        lines.append("exported weights: " + ", ".join(str(f) for f in exported))
    return "\n".join(lines)


def cmd_profile(ns) -> int:
    from pipeline.spec import load_spec
    from pipeline.train.preflight import check_before_building

    ranks, device, rest = split_run_args(ns.args)
    if ns.steps < 1 or ns.warmup < 0 or ns.trace_steps < 0:
        raise user_error("--steps must be at least 1, --warmup and --trace-steps at least 0")
    spec_arg, overrides = split_spec_args(rest, default="demo")
    loaded = load_spec(spec_arg, overrides)
    if ns.data == "synthetic":  # every stream the method reads
        streams = loaded.spec.data.streams
        synthetic = [f"data.streams.{n}.synthetic=true" for n in streams] + [
            f"data.streams.{n}.shards=null" for n in streams
        ]
        loaded = load_spec(spec_arg, overrides + (synthetic or ["data.synthetic=true", "data.shards=null"]))
    ensure_demo_shards(loaded)  # once, before any rank starts
    if ranks > 1:
        check_before_building(loaded.spec, ranks)  # one refusal, not one per rank
        options = [
            "--steps",
            str(ns.steps),
            "--warmup",
            str(ns.warmup),
            "--data",
            ns.data,
            "--model",
            ns.model,
            "--trace-steps",
            str(ns.trace_steps),
        ]
        return launch(ranks, "profile", rest + ([f"device={device}"] if device else []) + options)
    from pipeline.profile.run import profile, profile_loader_only

    if ns.model == "none":
        profile_loader_only(loaded, steps=ns.steps, warmup=ns.warmup, device=device)
    else:
        profile(loaded, steps=ns.steps, warmup=ns.warmup, trace_steps=ns.trace_steps, device=device)
    return 0


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
        f"(standing statistics: {passes} passes)"
    )
    for name in record["files"].values():
        print(f"  {name}")
    return 0


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
        out_dir=ns.out,
    )
    if ns.json:
        print(json.dumps(record, indent=2))
        return 0
    first = record["results"][0]["protocol"]
    print(
        f"{record['source']}: {first['num_samples']} samples, {first['feature_net']} features "
        f"(sha256 {first['feature_net_sha256'][:12]}), standing stats: {first['standing_stats_passes']} passes"
    )
    print(f"{'truncation':>10}  {'FID':>9}  {'KID':>9}  {'IS':>7}  {'class acc':>9}")
    for r in record["results"]:
        t = r["protocol"]["truncation"]
        acc = f"{r['class_accuracy']:.1%}" if r["class_accuracy"] is not None else "-"
        print(f"{'none' if t is None else t:>10}  {r['fid']:9.3f}  {r['kid_mean']:9.4f}  {r['is_mean']:7.3f}  {acc:>9}")
    print(f"written to {record['json']}" + (f" and {record['plot']}" if "plot" in record else ""))
    return 0


def cmd_schema(ns) -> int:
    from pipeline.spec import Spec

    text = json.dumps(Spec.model_json_schema(), indent=2)
    if ns.output:
        with open(ns.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"wrote {ns.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_shards_build(ns) -> int:
    from pipeline.data.shards import build_shards

    manifest = build_shards(
        ns.src,
        ns.out,
        csv=ns.csv,
        shard_size=ns.shard_size,
        resolution=ns.resolution,
        seed=ns.seed,
        quality=ns.quality,
        overwrite=ns.overwrite,
        log=print,
    )
    skipped = manifest.get("skipped", [])
    print(
        f"{ns.out}: {manifest['num_samples']:,} samples in {len(manifest['shards'])} shards, "
        f"{manifest['num_classes']} classes; {len(skipped)} image(s) skipped"
    )
    for item in skipped[:20]:
        print(f"  skipped {item['path']}: {item['reason']}")
    return 0


def cmd_shards_check(ns) -> int:
    from pipeline.data.check import check_shards, print_report

    report = check_shards(ns.dir)
    if ns.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 2


def cmd_shards_index(ns) -> int:
    from pathlib import Path

    from pipeline.data.shards import write_index

    tars = sorted(Path(ns.dir).glob("*.tar"))
    if not tars:
        raise user_error(f"no .tar files in {ns.dir}")
    made = [t for t in tars if not t.with_suffix(".idx").exists()]
    for tar in made:
        write_index(tar)
    print(f"{ns.dir}: wrote {len(made)} index file(s); {len(tars) - len(made)} already there")
    return 0


def cmd_demo_data(ns) -> int:
    from pipeline.data.demo import build_demo_shards, demo_shards_ready
    from pipeline.eval.classifier import (
        build_domain_demo,
        demo_classifier_ready,
        domain_demo_ready,
        train_demo_classifier,
    )

    if demo_shards_ready(ns.out) and not ns.force:
        print(f"{ns.out}: demo shards already there")
    else:
        manifest = build_demo_shards(ns.out, overwrite=ns.force)
        print(f"{ns.out}: {manifest['num_samples']:,} demo samples in {len(manifest['shards'])} shards")
    if demo_classifier_ready(ns.out) and not ns.force:
        print(f"{ns.out}: demo classifier already there")
    else:
        record = train_demo_classifier(ns.out)
        print(
            f"{ns.out}: demo classifier trained in {record['train_seconds']:.1f} s, held-out accuracy "
            f"{record['held_out_accuracy']:.1%} ({record['num_held_out']} samples)"
        )
    if domain_demo_ready(ns.domains_out) and not ns.force:
        print(f"{ns.domains_out}: two-domain demo shards already there")
    else:
        manifests = build_domain_demo(ns.domains_out, overwrite=ns.force)
        for domain, manifest in manifests.items():
            print(
                f"{ns.domains_out}/{domain}: {manifest['num_samples']:,} samples of domain {domain.upper()}, "
                "with its classifier"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    # DeepSpeed's launcher passes --local_rank=N before the command; the rank is read from the
    # environment it also sets (LOCAL_RANK), so the flag is accepted and not used
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a spec; report shapes, parameters and FLOPs (no weights allocated)")
    p.add_argument("args", nargs="*", metavar="SPEC|key=value", help="spec=NAME or a path, then overrides")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("train", help="train (or resume) the run a spec describes; default: the demo")
    p.add_argument(
        "args",
        nargs="*",
        metavar="SPEC|key=value",
        help="spec=NAME (default demo), overrides, procs=N (CPU ranks) or gpus=N, device=cpu|cuda",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("profile", help="time training steps of a spec: images/s, phases, FLOPs, MFU, a trace")
    p.add_argument(
        "args",
        nargs="*",
        metavar="SPEC|key=value",
        help="spec=NAME (default demo), overrides, procs=N (CPU ranks) or gpus=N, device=cpu|cuda",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument(
        "--data",
        choices=("real", "synthetic"),
        default="real",
        help="synthetic: random tensors on the device instead of the loader",
    )
    p.add_argument("--model", choices=("full", "none"), default="full", help="none: time the loader alone")
    p.add_argument("--trace-steps", type=int, default=2, help="steps traced by torch.profiler (default 2)")
    p.set_defaults(func=cmd_profile)
    shards = sub.add_parser("shards", help="write, check and index WebDataset shards").add_subparsers(
        dest="shards_command", required=True
    )
    p = shards.add_parser("build", help="turn an image folder (one sub-folder per class, or a CSV) into shards")
    p.add_argument("src", help="ImageNet-style folder: one sub-folder per class (or any folder with --csv)")
    p.add_argument("out", help="directory to write shards, index files and manifest.json to")
    p.add_argument("--csv", help="CSV of path,label (paths relative to SRC) instead of class sub-folders")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--resolution", type=int, help="downscale so the shorter side is this many pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier build in OUT")
    p.set_defaults(func=cmd_shards_build)
    p = shards.add_parser("check", help="read every sample back through DALI and compare with the manifest")
    p.add_argument("dir", help="a directory written by shards build")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_shards_check)
    p = shards.add_parser("index", help="write missing DALI index files (.idx) beside .tar shards")
    p.add_argument("dir")
    p.set_defaults(func=cmd_shards_index)
    p = sub.add_parser(
        "demo-data",
        help="write the embedded demo shards (scikit-learn's digits at 32x32) and the two-domain digits "
        "(image-to-image demo), and train the demo classifier beside each",
    )
    p.add_argument("--out", default=DEMO_SHARDS, help=f"output directory (default {DEMO_SHARDS})")
    p.add_argument(
        "--domains-out",
        default=DEMO_DOMAIN_SHARDS,
        help=f"output directory of the two domains, as a/ and b/ (default {DEMO_DOMAIN_SHARDS})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild the shards and retrain the classifier even if complete ones are there",
    )
    p.set_defaults(func=cmd_demo_data)
    from pipeline.eval.protocol import STANDING_STATS_PASSES

    # sample and eval: what is not given follows the protocol of the run's own spec (`eval:`)
    p = sub.add_parser("sample", help="write sample grids, per-image PNGs and interpolations of a trained generator")
    p.add_argument(
        "source",
        metavar="RUN_OR_WEIGHTS",
        help="a run directory (its latest checkpoint; the EMA when there is one), a checkpoint, an "
        "export directory or a generator.safetensors file",
    )
    p.add_argument(
        "--classes", help="class numbers, e.g. 0,3,7, or all (default: all classes, up to 10 spread over the range)"
    )
    p.add_argument("--num", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--truncation", type=float, help="truncation threshold (or scale); default: none, z ~ N(0, 1)")
    p.add_argument(
        "--truncation-mode",
        choices=("truncate", "scale"),
        default="truncate",
        help="truncate: redraw values beyond the threshold (the BigGAN paper); scale: multiply the "
        "standard deviation (BigGAN-PyTorch's code). Default truncate",
    )
    p.add_argument(
        "--standing-stats",
        type=int,
        metavar="N",
        help="forward passes of standing BatchNorm statistics before sampling; 0: off (default: the "
        f"spec's eval.standing_stats, {STANDING_STATS_PASSES} unless the spec says otherwise)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    p.add_argument("--out", help="output directory (default RUN/samples/sample-TIME-seedS, or beside the weights)")
    p.add_argument(
        "--interpolate",
        choices=("latent", "class"),
        help="also write an interpolation strip: latent (slerp, one row per class) or class (the "
        "class embedding from one --classes entry to the next, --num rows)",
    )
    p.add_argument("--steps", type=int, default=8, help="interpolation steps (default 8)")
    p.add_argument("--gif", action="store_true", help="also write the interpolation as an animated GIF")
    p.add_argument(
        "--input",
        metavar="SHARDS",
        help="image-to-image runs: translate the first --num images of these shards (default: each domain's own)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("eval", help="FID, KID, IS and class accuracy of a run's generator (or exported weights)")
    p.add_argument("source", help="a run directory, an export directory or a generator.safetensors file")
    p.add_argument(
        "--num",
        type=int,
        help="generated images, classes balanced (default: the spec's eval.num_samples, 1000 unless the "
        "spec says otherwise; published FIDs use 50,000)",
    )
    p.add_argument(
        "--truncation",
        help="threshold, or a sweep: 0.25,0.5,1,none (default: the spec's eval.truncation, none unless the "
        "spec says otherwise)",
    )
    p.add_argument(
        "--truncation-mode",
        choices=("truncate", "scale"),
        default="truncate",
        help="truncate: resample values beyond the threshold (BigGAN); scale: scale z's std",
    )
    p.add_argument(
        "--standing-stats",
        type=int,
        metavar="N",
        help="passes of standing BatchNorm statistics; 0: off (default: the spec's eval.standing_stats, "
        f"{STANDING_STATS_PASSES} unless the spec says otherwise)",
    )
    p.add_argument(
        "--features",
        help="demo (the classifier beside the shards), demo:PATH or inception:PATH (the FID Inception "
        "weights file; nothing is downloaded). Default: the spec's eval.features, demo unless it says otherwise",
    )
    p.add_argument("--shards", help="real data to compare with (default: the spec's data.shards)")
    p.add_argument("--seed", type=int, help="seed of the latents (default: the spec's seed, as in training)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--out", help="directory for the JSON and plot (default RUN/eval)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("schema", help="write the JSON Schema of specs (for editor completion)")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    p.set_defaults(func=cmd_schema)
    return parser


def print_refusal(exc: SpecError) -> None:
    """Print a user error once per run: under a launcher, every rank refuses the same spec, so
    ranks other than 0 stay silent about errors found before the ranks connected; after that an
    error may concern one rank alone (its shards), and each rank says its own, prefixed."""
    from pipeline.train.preflight import rank_from_environment, world_size_from_environment

    prefix = ""
    if world_size_from_environment() > 1:
        import torch.distributed

        if not torch.distributed.is_initialized():
            if rank_from_environment() != 0:
                return
        else:
            prefix = f"rank {rank_from_environment()}: "
    n = len(exc.issues)
    print(f"{prefix}error: {n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
    for issue in exc.issues:
        print("  " + issue.format().replace("\n", "\n  "), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # spec words may follow options (`profile --steps 5 spec=x`): argparse leaves them over
    ns, extra = parser.parse_known_args(argv)
    if extra and hasattr(ns, "args") and not any(a.startswith("-") for a in extra):
        ns.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return ns.func(ns)
    except SpecError as exc:
        print_refusal(exc)
        return 2
    except KeyboardInterrupt as exc:  # train's own says which checkpoint it wrote
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
