"""Looking at a spec without training it: `validate` checks a spec on the meta device and reports
its networks' shapes, parameters and FLOPs, its method's phases and what `train` would still need
(tables, or JSON with --json); `schema` writes the JSON Schema of specs for editors.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from pipeline.commands import device_memory, memory_report, split_spec_args


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


def split_rank_args(args: list[str]) -> tuple[int, bool, list[str]]:
    """(ranks, whether they are GPUs, the rest) from `gpus=N` or `procs=N` (as `train` takes them)
    and `nodes=N` (machines of that many ranks each, as a launcher would start them)."""
    from pipeline.commands.run import split_run_args
    from pipeline.errors import user_error

    nodes, rest, gpus = 1, [], False
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "nodes":
            if not value.isdigit() or int(value) < 1:
                raise user_error(f"nodes={value}: give a number of machines, e.g. nodes=2")
            nodes = int(value)
        else:
            gpus = gpus or key == "gpus"
            rest.append(arg)
    ranks, _, rest = split_run_args(rest)
    return nodes * ranks, gpus, rest


def cmd_validate(ns) -> int:
    from pipeline.eval.during_training import classifier_to_train, evaluation_issues
    from pipeline.graph import analyze_spec, output_warnings
    from pipeline.spec import load_spec
    from pipeline.train.preflight import preflight

    ranks, gpus, rest = split_rank_args(ns.args)
    spec_arg, overrides = split_spec_args(rest)
    loaded = load_spec(spec_arg, overrides, check_graphs=False)
    plans = analyze_spec(loaded)
    # a valid spec may still lack its data, or what its evaluation needs
    train_needs = preflight(loaded.spec, world_size=ranks) + evaluation_issues(loaded.spec)
    memory = device_memory(ns.gpu_memory, gpus)
    # the estimate runs each phase on the meta device (seconds for the largest specs): asked for
    # by a rank count or a device size
    asked = memory is not None or any(a.partition("=")[0] in ("gpus", "procs", "nodes") for a in ns.args)
    estimate = memory_report(loaded, ranks) if asked else None
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
            **({"memory": _memory_json(estimate, memory)} if estimate is not None else {}),
        }
        print(json.dumps(out, indent=2))
        return 0
    from pipeline.graph.report import print_report

    options = ", ".join(f"{k}={v}" for k, v in method.items() if k != "kind")
    print(f"method {method['kind']} ({options}); a step: {phases}")
    print_report(loaded, plans)
    for issue in advice:
        print("warning: " + issue.format().replace("\n", "\n  "))
    if estimate is not None:
        from pipeline.profile.memory import describe as describe_memory

        print("\n".join(describe_memory(estimate, memory)))
    on = f"{ranks} rank{'s' if ranks > 1 else ''}"
    if train_needs:
        missing = "1 thing is" if len(train_needs) == 1 else f"{len(train_needs)} things are"
        print(f"The spec is valid. Before `train` can run it (on {on}), {missing} missing:")
        for issue in train_needs:
            print("  " + issue.format().replace("\n", "\n  "))
    else:
        print(f"The spec is valid, and `train` has what it needs to start (data found, batch splits over {on}).")
    if not train_needs and (shards := classifier_to_train(spec)) is not None:
        print(
            f"Evaluation (eval.every={spec.eval.every}, eval.features=demo): `train` first trains the feature "
            f"classifier on {shards} (once; seconds to a minute), or give eval.features=inception:PATH; "
            "eval.every=0 switches evaluation off."
        )
    return 0


def _memory_json(est, memory: float | None) -> dict:
    from pipeline.profile.memory import HEADROOM

    split = est.split(memory) if memory is not None else None
    return {
        "ranks": est.world_size,
        "batch_per_rank": est.micro,
        "accumulation": est.accum,
        "bytes_per_rank": round(est.per_rank()),
        "state_bytes": est.state,
        "activation_bytes_per_sample": {p.name: round(p.per_sample) for p in est.phases},
        "activation_bytes_fixed": {p.name: p.fixed for p in est.phases},
        **(
            {
                "device_bytes": round(memory),
                "headroom": HEADROOM,
                "fits": est.per_rank() <= memory * (1 - HEADROOM),
                "largest_batch_per_rank": est.largest_micro(memory),
                "suggested": {"batch_per_rank": split[0], "accumulation": split[1]} if split else None,
            }
            if memory is not None
            else {}
        ),
        "notes": est.notes,
    }


SCHEMA_FILE = "spec.schema.json"


def cmd_schema(ns) -> int:
    from pathlib import Path

    from pipeline.spec import Spec

    if ns.markdown:
        from pipeline.spec.reference import schema_markdown

        Path(ns.markdown).write_text(schema_markdown(Spec), encoding="utf-8")
        print(f"wrote the spec reference to {ns.markdown}", file=sys.stderr)
        if ns.output is None and not ns.stdout:
            return 0
    text = json.dumps(Spec.model_json_schema(), indent=2)
    if ns.stdout or ns.output == "-":
        print(text)
        return 0
    output = ns.output or SCHEMA_FILE
    Path(output).write_text(text + "\n", encoding="utf-8")
    print(
        f"wrote the JSON Schema of specs to {output}; point an editor at it, e.g. a first line "
        f"`# yaml-language-server: $schema={Path(output).resolve()}` in a spec (--stdout prints it instead)",
        file=sys.stderr,
    )
    return 0
