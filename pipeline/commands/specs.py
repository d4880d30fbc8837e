"""Looking at a spec without training it: `validate` checks a spec on the meta device and reports
its networks' shapes, parameters and FLOPs, its method's phases and what `train` would still need
(tables, or JSON with --json); `schema` writes the JSON Schema of specs for editors.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from pipeline.commands import split_spec_args


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
    from pipeline.eval.during_training import classifier_to_train, evaluation_issues

    # a valid spec may still lack its data, or what its evaluation needs
    train_needs = preflight(loaded.spec, world_size=1) + evaluation_issues(loaded.spec)
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
    if not train_needs and (shards := classifier_to_train(spec)) is not None:
        print(
            f"Evaluation (eval.every={spec.eval.every}, eval.features=demo): `train` first trains the feature "
            f"classifier on {shards} (once; seconds to a minute), or give eval.features=inception:PATH; "
            "eval.every=0 switches evaluation off."
        )
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
