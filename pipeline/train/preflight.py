"""What `train` needs beyond a valid spec, checked from the spec alone before anything is built.

Data to read (shards with index files, or `data.synthetic`), a global batch that splits over the
ranks, and a C++ compiler where `torch.compile` needs one. `train` refuses at once with every
problem found (no engine or network is built first); `validate` lists them as still to do.
"""

from __future__ import annotations

import os
import shutil

from pipeline.errors import Issue, SpecError, user_error


def batch_plan(train, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) with batch = micro x accumulation x world size."""
    micro = train.batch_per_rank or max(1, train.batch_size // world_size)
    if train.batch_size % (micro * world_size):
        raise user_error(
            f"train.batch_size {train.batch_size} is not a multiple of batch_per_rank {micro} x {world_size} rank(s)",
            path="train.batch_size",
            hint="choose batch_size = batch_per_rank x gradient accumulation x number of ranks",
        )
    return micro, train.batch_size // (micro * world_size)


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would call (its default: $CXX, else g++), if any."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((found for c in candidates if (found := shutil.which(c))), None)


def preflight(spec, world_size: int = 1) -> list[Issue]:
    """Every reason `train` would stop before its first step that the spec alone can tell."""
    from pipeline.data.dali import check_data  # imports no DALI; only looks at files

    issues: list[Issue] = []
    found: dict = {}
    for check in (lambda: found.update(check_data(spec)), lambda: batch_plan(spec.train, world_size)):
        try:
            check()
        except SpecError as exc:
            issues.extend(exc.issues)
    issues += _batch_fits_the_data(spec, world_size, found)
    issues += _scheduled_batches_split(spec, world_size)
    issues += _batches_fill_stddev_groups(spec, world_size)
    if spec.compile.enabled and cxx_compiler() is None:
        issues.append(
            Issue(
                "torch.compile needs a C++ compiler (inductor generates C++ on the CPU and builds Triton's "
                "launchers on a GPU); none found ($CXX, g++, c++, clang++)",
                path="compile.enabled",
                hint="install one (Debian/Ubuntu: apt-get install g++) or set compile.enabled=false",
            )
        )
    return issues


def _batch_fits_the_data(spec, world_size: int, found: dict) -> list[Issue]:
    """A micro-batch larger than a rank's part of a stream's shards (from their manifest) would
    fail inside DALI (a batch of 1e9 was an out-of-memory error blamed on the shards); so would
    any batch a method's schedule switches to (a ProGAN stage's grew to 12 GB and was killed)."""
    issues = []
    for name, shards in found.items():
        total = shards.num_samples if shards is not None else None
        for path, per_rank in _micro_batches(spec, world_size):
            if total is not None and per_rank > total // world_size:
                issues.append(
                    Issue(
                        f"the batch of {per_rank:,} per rank is larger than each rank's part of stream {name!r}: "
                        f"{total:,} samples over {world_size} rank(s)",
                        path=path,
                        hint="use a smaller batch, fewer ranks, or more data",
                    )
                )
    return issues


def _scheduled_batches_split(spec, world_size: int) -> list[Issue]:
    """The global batches a method's schedule switches to (ProGAN's per-resolution batches) split
    into the accumulation steps times the ranks, as train.batch_size must."""
    try:
        _, accum = batch_plan(spec.train, world_size)
    except SpecError:
        return []  # reported by batch_plan's own check
    return [
        Issue(
            f"the batch of {batch} does not split into {accum} accumulation step(s) x {world_size} rank(s)",
            path=path,
            hint="give a multiple of the accumulation steps times the ranks",
        )
        for path, batch in spec.method.batch_sizes(spec).items()
        if batch % (accum * world_size)
    ]


def _micro_batches(spec, world_size: int) -> list[tuple[str, int]]:
    """(spec path, samples per micro-batch on a rank) of train.batch_size and of every batch a
    method's schedule switches to; none when the batch does not split (reported on its own)."""
    try:
        micro, accum = batch_plan(spec.train, world_size)
    except SpecError:
        return []
    path = "train.batch_per_rank" if spec.train.batch_per_rank else "train.batch_size"
    split = accum * world_size
    return [(path, micro), *((p, b // split) for p, b in spec.method.batch_sizes(spec).items() if b % split == 0)]


def _batches_fill_stddev_groups(spec, world_size: int) -> list[Issue]:
    """A minibatch_stddev node groups each micro-batch D sees into groups of group_size (or the
    whole batch when smaller); a batch that does not split into them fails inside D's first step."""
    groups = [
        (f"{spec.network_path(name)}.nodes.{node_name}", node.group_size)
        for name, network in spec.all_networks().items()
        for node_name, node in network.nodes.items()
        if node.kind == "minibatch_stddev"
    ]
    return [
        Issue(
            f"the micro-batch of {micro} per rank does not split into the groups of {group} of {node_path} "
            "(minibatch standard deviation)",
            path=path,
            hint=f"use a batch per rank that is a multiple of {group} (or below it), or change group_size",
        )
        for node_path, group_size in groups
        for path, micro in _micro_batches(spec, world_size)
        if micro % (group := min(group_size, micro))
    ]


def check_before_building(spec, world_size: int, more: list[Issue] | None = None) -> None:
    """Refuse at once, with every problem, what would stop `train` before its first step (and
    `more`: what a higher layer found, e.g. an evaluation that could not run)."""
    issues = preflight(spec, world_size) + list(more or [])
    if issues:
        raise SpecError(issues)


def world_size_from_environment() -> int:
    """The number of ranks DeepSpeed's launcher (or torchrun) describes; 1 when run directly."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def rank_from_environment() -> int:
    """This process's rank as the launcher describes it; 0 when run directly."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0
