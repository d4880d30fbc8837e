"""Elastic data: a run reads each stream's shards in a fixed number of parts, whatever its ranks.

A run starts with one part per rank (DALI's `shard_id`/`num_shards`: contiguous parts, each read
in its own shuffled order, see `dali.py`); the number of parts is recorded in every checkpoint and
never changes. Resumed on another number of ranks, the parts are shared out: on fewer ranks each
rank reads several parts and joins their batches; on more, the ranks of a group read the same part
and each keeps its slice of the part's batch. Every part therefore yields the very sample sequence
it would have yielded on the run's first number of ranks, from its checkpointed position: the
same samples in the same steps, none repeated or skipped, in every pass over the data. The cost
of sharing a part: each rank of its group decodes the part's whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.errors import user_error


def share(parts: int, rank: int, world_size: int, micro: int) -> tuple[list[int], int, slice | None]:
    """What rank `rank` of `world_size` reads of `parts` parts for a micro-batch of `micro`:
    (its parts, the batch each part's reader yields, the slice of that batch it keeps or None)."""
    if parts % world_size == 0:
        per_rank = parts // world_size
        if micro % per_rank:
            raise user_error(
                f"the run's data is read in {parts} parts (it started on {parts} ranks), {per_rank} per rank on "
                f"{world_size} rank(s), but the micro-batch of {micro} per rank does not split into {per_rank} "
                "equal shares",
                path="train.batch_size",
                hint=f"resume on a number of ranks whose micro-batch is a multiple of {parts} // ranks",
            )
        return list(range(rank * per_rank, (rank + 1) * per_rank)), micro // per_rank, None
    if world_size % parts == 0:
        group = world_size // parts
        part, member = divmod(rank, group)
        return [part], micro * group, slice(member * micro, (member + 1) * micro)
    raise user_error(
        f"the run's data is read in {parts} parts (it started on {parts} ranks), which {world_size} ranks cannot "
        f"share: neither number divides the other",
        path="run.dir",
        hint=f"resume on a number of ranks that divides {parts} or is a multiple of it",
    )


class PartsLoader:
    """One rank's reader of a stream: the batches of its parts joined (several parts) or its slice
    of one part's batch (a part shared with other ranks). `make(part, batch, state)` opens one part."""

    def __init__(self, make: Callable, parts: int, rank: int, world_size: int, micro: int, states: dict | None):
        own, batch, self.take = share(parts, rank, world_size, micro)
        states = states or {}
        self.loaders = {part: make(part, batch, states.get(part)) for part in own}
        first = next(iter(self.loaders.values()))
        self.shards, self.dataset_size = getattr(first, "shards", None), getattr(first, "dataset_size", None)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        batches = [next(loader) for loader in self.loaders.values()]
        x = batches[0][0] if len(batches) == 1 else torch.cat([b[0] for b in batches])
        y = batches[0][1] if len(batches) == 1 or batches[0][1] is None else torch.cat([b[1] for b in batches])
        if self.take is not None:
            x, y = x[self.take], None if y is None else y[self.take]
        return x, y

    def state_dict(self) -> dict:
        """Each of this rank's parts' reader position (the ranks sharing a part hold the same one)."""
        return {part: loader.state_dict() for part, loader in self.loaders.items()}

    @property
    def skipped(self) -> int:
        return sum(getattr(loader, "skipped", 0) for loader in self.loaders.values())

    def new_damage(self) -> list[tuple[str, list[str]]]:
        # a synthetic stream has no shards to be damaged
        return [
            found for loader in self.loaders.values() if hasattr(loader, "new_damage") for found in loader.new_damage()
        ]

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()


def merge_positions(rank_files: dict[int, dict]) -> dict:
    """The streams' positions in rank files of a checkpoint (rank -> its file), as {stream: {part:
    position}}. A file written before parts existed holds one position per stream: its rank's part."""
    merged: dict = {}
    for rank, local in rank_files.items():
        for stream, position in local.get("streams", {}).items():
            if isinstance(position, dict):
                merged.setdefault(stream, {}).update(position)
            else:  # one part per rank, as before; a synthetic stream's (global) generator state alike
                merged.setdefault(stream, {})[rank] = position
    return merged
