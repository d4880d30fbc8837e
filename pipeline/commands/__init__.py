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


def device_memory(text: str | None, gpus: bool) -> float | None:
    """Bytes per device from --gpu-memory (80GiB, 80GB, ...); an H100's 80 GiB when only gpus= is given."""
    from pipeline.profile.memory import DEFAULT_GPU_MEMORY, parse_bytes

    if text is None:
        return DEFAULT_GPU_MEMORY if gpus else None
    value = parse_bytes(text)
    if value is None:
        raise user_error(f"--gpu-memory {text}: not a size", hint="e.g. --gpu-memory 80GiB, 40GB or 24576MiB")
    return value


def memory_report(loaded, ranks: int):
    """The memory estimate per rank (None when the batch does not split over the ranks: the
    preflight says so)."""
    from pipeline.errors import SpecError
    from pipeline.profile.memory import estimate
    from pipeline.train.preflight import batch_plan

    try:
        batch_plan(loaded.spec.train, ranks)
    except SpecError:
        return None
    return estimate(loaded, ranks)
