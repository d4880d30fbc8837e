"""The bodies of the commands `python -m pipeline` dispatches to, grouped by what a user does:
`run` trains and profiles, `inspect` checks specs and prints their schema, `results` samples and
evaluates trained generators, `data` writes and checks shards. `pipeline.cli` holds the parser,
the table from each command to its function here; what several commands share lives in this file.
"""

from __future__ import annotations

from pipeline.errors import user_error


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
