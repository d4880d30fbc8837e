"""The evaluation protocol: everything besides the weights that decides a score. Its defaults
(standing statistics, declared with the spec's `eval.standing_stats`, and their batch), shared by training's
periodic evaluation, `eval` and `sample`; and the name under which `eval` files the results of
one protocol.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.spec.schema import STANDING_STATS_PASSES

__all__ = ["STANDING_STATS_BATCH", "STANDING_STATS_PASSES", "protocol_tag"]

STANDING_STATS_BATCH = 64
"""Images per forward pass of `sample`, `eval` and training's evaluation unless --batch-size says
otherwise, and so the batch of each standing-statistics pass: BigGAN-PyTorch's sample.py runs its
standing statistics (utils.accumulate_standing_stats) on a batch of max(G_batch_size, batch_size),
64 by default (utils.prepare_parser, commit 98459431)."""

# keys of a result's protocol that say which weights were scored, not how
_WEIGHTS_KEYS = ("generator", "ema", "step")


def protocol_tag(results: list[dict]) -> str:
    """A file name for the protocol of `results` (one per truncation): the knobs most often varied,
    for people, then a hash of everything recorded about how the scores were made, so that two
    protocols never share a name and the same protocol always gets the same one."""
    protocols = [{k: v for k, v in r["protocol"].items() if k not in _WEIGHTS_KEYS} for r in results]
    digest = hashlib.sha256(json.dumps(protocols, sort_keys=True).encode()).hexdigest()[:8]
    truncations = "_".join("none" if p["truncation"] is None else f"{p['truncation']:g}" for p in protocols)
    first = protocols[0]
    return f"n{first['num_samples']}-ss{first['standing_stats_passes']}-t{truncations}-{digest}"
