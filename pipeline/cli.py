"""One entry point: `python -m pipeline <command> [spec=NAME | SPEC] [key=value ...]`.

User errors (bad specs, bad overrides, missing files) print what is wrong, where and how to fix
it, and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

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
        "nodes": [{"name": r.name, "kind": r.kind, "output_shape": r.shape, "params": r.params,
                   "flops_per_image": r.flops} for r in plan.rows],
    }


def cmd_validate(ns) -> int:
    from pipeline.graph import analyze_spec
    from pipeline.spec import load_spec

    spec_arg, overrides = split_spec_args(ns.args)
    loaded = load_spec(spec_arg, overrides, check_graphs=False)
    plans = analyze_spec(loaded)
    if ns.json:
        out = {"name": loaded.spec.name, "file": str(loaded.path),
               **{which: _network_json(plan) for which, plan in plans.items()}}
        print(json.dumps(out, indent=2))
        return 0
    from pipeline.graph.report import print_report
    print_report(loaded, plans)
    return 0


DEMO_SHARDS = "shards/demo"


def launch(num: int, argv: list[str]) -> int:
    """Run `num` ranks of `python -m pipeline train` on this machine (the environment DeepSpeed's
    launcher would set). Several machines: use `deepspeed --hostfile FILE -m pipeline train ...`."""
    import os
    import subprocess

    from pipeline.dist.engines import _free_port

    port = str(_free_port())
    procs = []
    for rank in range(num):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", "train", *argv], env=env))
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def cmd_train(ns) -> int:
    from pipeline.spec import load_spec

    ranks = [a for a in ns.args if a.split("=")[0] in ("procs", "gpus")]
    rest = [a for a in ns.args if a not in ranks]
    if ranks:
        key, _, value = ranks[-1].partition("=")
        if not value.isdigit() or int(value) < 1:
            raise user_error(f"{key}={value}: give a number of processes, e.g. {key}=2")
        if int(value) > 1:
            return launch(int(value), rest + (["device=cpu"] if key == "procs" else []))
    device = None
    overrides = []
    for arg in rest:
        if arg.startswith("device="):
            device = arg.partition("=")[2]
        else:
            overrides.append(arg)
    spec_arg, overrides = split_spec_args(overrides, default="demo")
    loaded = load_spec(spec_arg, overrides)
    if loaded.spec.data.shards == DEMO_SHARDS and not loaded.spec.data.synthetic:
        from pipeline.data.demo import build_demo_shards, demo_shards_ready

        if not demo_shards_ready(DEMO_SHARDS):
            print(f"writing the demo shards to {DEMO_SHARDS}", file=sys.stderr)
            build_demo_shards(DEMO_SHARDS)
    from pipeline.train.loop import train

    run_dir = train(loaded, device=device)
    print(f"run written to {run_dir}", file=sys.stderr)
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

    manifest = build_shards(ns.src, ns.out, csv=ns.csv, shard_size=ns.shard_size, resolution=ns.resolution,
                            seed=ns.seed, quality=ns.quality, overwrite=ns.overwrite, log=print)
    skipped = manifest.get("skipped", [])
    print(f"{ns.out}: {manifest['num_samples']:,} samples in {len(manifest['shards'])} shards, "
          f"{manifest['num_classes']} classes; {len(skipped)} image(s) skipped")
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

    if demo_shards_ready(ns.out) and not ns.force:
        print(f"{ns.out}: demo shards already there")
        return 0
    manifest = build_demo_shards(ns.out, overwrite=ns.force)
    print(f"{ns.out}: {manifest['num_samples']:,} demo samples in {len(manifest['shards'])} shards")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a spec; report shapes, parameters and FLOPs (no weights allocated)")
    p.add_argument("args", nargs="*", metavar="SPEC|key=value", help="spec=NAME or a path, then overrides")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("train", help="train (or resume) the run a spec describes; default: the demo")
    p.add_argument("args", nargs="*", metavar="SPEC|key=value",
                   help="spec=NAME (default demo), overrides, procs=N (CPU ranks) or gpus=N, device=cpu|cuda")
    p.set_defaults(func=cmd_train)
    shards = sub.add_parser("shards", help="write, check and index WebDataset shards").add_subparsers(
        dest="shards_command", required=True)
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
    p = sub.add_parser("demo-data", help="write the embedded demo shards (scikit-learn's digits at 32x32)")
    p.add_argument("--out", default="shards/demo", help="output directory (default shards/demo)")
    p.add_argument("--force", action="store_true", help="rebuild even if complete shards are there")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("schema", help="write the JSON Schema of specs (for editor completion)")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except SpecError as exc:
        n = len(exc.issues)
        print(f"error: {n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
        for issue in exc.issues:
            print("  " + issue.format().replace("\n", "\n  "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
