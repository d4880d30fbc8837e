"""The data streams a method reads, opened for one stage of a run: one reader per stream, split
into the data's parts (data/parts.py) so that a run resumes on any number of ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline.data.dali import loader_from_spec
from pipeline.data.parts import PartsLoader
from pipeline.distributed.engines import World
from pipeline.errors import user_error
from pipeline.spec.schema import Spec


def open_streams(
    spec: Spec, world: World, *, resolution: int, micro: int, parts: int, dtype: torch.dtype, positions: dict[str, Any]
) -> dict[str, PartsLoader]:
    """Every stream of the method at `resolution`, `micro` samples per micro-batch on this rank,
    each continuing from its position in `positions` (absent: from the start). Streams read as
    pairs share a seed, so paired shards give pairs."""
    together = spec.method.read_together(spec)

    def part_reader(name: str, labelled: bool, seed_offset: int) -> Callable[[int, int, Any], Any]:
        def make(part: int, batch: int, state: Any) -> Any:
            return loader_from_spec(
                spec,
                stream=name,
                labelled=labelled,
                seed_offset=seed_offset,
                batch_size=batch,
                resolution=resolution,
                device=world.device,
                rank=part,
                world_size=parts,
                state=state,
                dtype=dtype,
            )

        return make

    streams = {
        name: PartsLoader(
            part_reader(name, labelled, 0 if together else i), parts, world.rank, world.size, micro, positions.get(name)
        )
        for i, (name, labelled) in enumerate(spec.method.streams(spec).items())
    }
    sizes = {name: getattr(loader, "dataset_size", None) for name, loader in streams.items()}
    if together and len(set(sizes.values())) > 1:
        raise user_error(
            "the method reads its streams as pairs, but they hold "
            + ", ".join(f"{n}: {size} samples" for n, size in sizes.items()),
            path="data.streams",
            hint="paired streams hold the same samples in the same order; set method.paired=false for "
            "unpaired data (and method.lambda_cs=0)",
        )
    return streams


def close(streams: dict[str, Any]) -> None:
    """Release the readers now (see DaliLoader.close) rather than when they are collected."""
    for loader in streams.values():
        if hasattr(loader, "close"):
            loader.close()
