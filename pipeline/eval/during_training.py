"""The evaluation `train` runs every `eval.every` steps, by method: the CLI builds it here and
hands it to the loop, which calls it with the networks to score (their EMAs where they have
one) and logs what it returns to metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import torch


def evaluator_for(spec):
    """A function (networks by name, spec) -> scores to log, or None when the spec evaluates never."""
    if not spec.eval.every:
        return None
    return {"generate": _gan_evaluator, "translate": _translation_evaluator}[spec.method.use]()


def describe_scores(record: dict, use: str) -> str:
    """A logged evaluation in one line, for `train`'s closing report."""
    if use == "translate":  # both directions
        return "; ".join(
            f"{a}->{b}: FID {record[f'fid_{a}_to_{b}']:.2f}, content kept {record[f'content_accuracy_{a}_to_{b}']:.1%}"
            for a, b in (("a", "b"), ("b", "a"))
        )
    protocol, accuracy = record.get("eval_protocol", {}), record.get("class_accuracy")
    fid, is_mean = (record[k] for k in ("fid", "is_mean"))  # None when non-finite
    return (
        f"FID {'-' if fid is None else format(fid, '.2f')}, IS {'-' if is_mean is None else format(is_mean, '.2f')}"
        + (f", class accuracy {accuracy:.1%}" if accuracy is not None else "")
        + f" ({protocol.get('num_samples', '?')} samples, {protocol.get('feature_net', '?')} features, "
        f"standing statistics {protocol.get('standing_stats_passes', '?')} passes, "
        f"{'EMA' if protocol.get('ema') else 'raw generator'})"
    )


def _device(nets: dict) -> torch.device:
    return next(next(iter(nets.values())).parameters()).device


def _side(net, spec) -> int:
    """The side of a generator's images: a growing one's current stage, else data.resolution."""
    growth = getattr(net, "growth", None)
    return growth.stages[net.stage].resolution if growth is not None else spec.data.resolution


def _gan_evaluator():
    # a scorer and its real statistics per image side, made at the first evaluation there: a growing
    # generator is scored against the real images at its stage's resolution, as D sees them
    scorers = {}

    def evaluate(nets: dict, spec) -> dict:
        from pipeline.eval.evaluate import evaluate_module, make_scorer

        e, name = spec.eval, spec.method.exports(spec)[0]
        side = _side(nets[name], spec)
        if side not in scorers:
            scorers[side] = make_scorer(spec, e.features, _device(nets), resolution=side)
        scorer = scorers[side]
        result = evaluate_module(
            nets[name],
            spec,
            scorer,
            num=e.num_samples,
            truncation=e.truncation,
            standing_passes=e.standing_stats,
            seed=spec.seed,
        )
        from pipeline.eval.sampling import has_ema

        protocol = result.pop("protocol") | {"ema": has_ema(spec, name)}
        return result | {"eval_protocol": protocol}

    return evaluate


def _translation_evaluator():
    def evaluate(nets: dict, spec) -> dict:
        from pipeline.eval.translation import evaluate_translation

        m, streams = spec.method, spec.data.all_streams()
        result = evaluate_translation(
            nets[m.g_ab],
            nets[m.g_ba],
            Path(streams[m.domain_a].shards),
            Path(streams[m.domain_b].shards),
            device=_device(nets),
            num_samples=spec.eval.num_samples,
            seed=spec.seed,
        )
        return flat_translation_scores(result) | {"eval_protocol": result["protocol"]}

    return evaluate


def flat_translation_scores(result: dict) -> dict:
    """{"A->B": {"fid": ..}} -> {"fid_a_to_b": ..}: one metrics.jsonl key per figure."""
    flat: dict[str, float] = {}
    for direction, scores in result.items():
        if direction == "protocol":
            continue
        suffix = direction.lower().replace("->", "_to_")
        flat |= {f"{key}_{suffix}": value for key, value in scores.items()}
    return flat
