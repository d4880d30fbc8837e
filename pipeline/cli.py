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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a spec; report shapes, parameters and FLOPs (no weights allocated)")
    p.add_argument("args", nargs="*", metavar="SPEC|key=value", help="spec=NAME or a path, then overrides")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_validate)
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
        return 130
