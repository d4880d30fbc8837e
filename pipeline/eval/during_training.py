"""The evaluation `train` runs every `eval.every` steps, by method: the CLI builds it here and
hands it to the loop, which calls it with the networks to score (their EMAs where they have
one) and logs what it returns to metrics.jsonl. Before anything is built, `evaluation_issues`
says why it could not run (`validate` lists them, `train` refuses with them) and
`prepare_evaluation` trains the feature classifier it needs, when missing."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.errors import Issue
from pipeline.train.progress import say

SWITCH_OFF = "or switch evaluation during training off: eval.every=0"


def evaluation_issues(spec) -> list[Issue]:
    """Why the evaluation during training (`eval.every`) could not run, from the spec and the files
    it names alone; none when it is off. Missing shards are the data check's to report."""
    if not spec.eval.every or spec.method.use != "generate":
        return []
    from pipeline.data.shards import read_manifest
    from pipeline.eval.classifier import classifier_problem
    from pipeline.eval.features import INCEPTION_URL, INCEPTION_WEIGHTS, KINDS, default_inception_path

    d, features = spec.data, spec.eval.features
    if d.synthetic or not d.shards:
        return [
            Issue(
                "evaluation during training compares generated images with real ones, and the spec reads no shards",
                path="eval.every",
                hint=f"give data.shards=DIR, {SWITCH_OFF}",
            )
        ]
    kind, _, given = features.partition(":")
    if kind not in KINDS:
        return [
            Issue(
                f"unknown feature network {features!r}",
                path="eval.features",
                hint="give demo, demo:PATH or inception:PATH",
            )
        ]
    if kind == "demo" and not given:
        manifest = read_manifest(d.shards)
        problem = classifier_problem(manifest) if manifest is not None else None
        hint = f"give eval.features=inception:PATH (the standard FID network), {SWITCH_OFF}"
        return [Issue(problem, path="eval.features", hint=hint)] if problem else []
    path = Path(given).expanduser() if given else default_inception_path()
    if path.is_file():
        return []
    if kind == "demo":
        hint = f"give the path of a classifier.safetensors, or plain `demo` (trained on the shards), {SWITCH_OFF}"
    else:
        hint = f"download {INCEPTION_WEIGHTS} once from {INCEPTION_URL}, give its path as inception:PATH, {SWITCH_OFF}"
    return [Issue(f"{path} does not exist", path="eval.features", hint=hint)]


def classifier_to_train(spec) -> Path | None:
    """The shards `prepare_evaluation` would first train the feature classifier on; None if none."""
    if not spec.eval.every or spec.method.use != "generate" or spec.eval.features != "demo":
        return None
    if spec.data.synthetic or not spec.data.shards:
        return None
    from pipeline.eval.classifier import FALLBACK_DIR, demo_classifier_ready

    shards = Path(spec.data.shards)
    ready = any(demo_classifier_ready(shards, home=home) for home in (shards, spec.run_dir / FALLBACK_DIR))
    return None if ready else shards


def prepare_evaluation(spec, log=say) -> None:
    """What the evaluation during training needs before the run starts: the feature classifier of
    `eval.features: demo`, trained on the spec's shards when missing (`ensure_classifier`)."""
    if classifier_to_train(spec) is None:
        return
    from pipeline.eval.classifier import FALLBACK_DIR, ensure_classifier

    ensure_classifier(spec.data.shards, resolution=spec.data.resolution, fallback=spec.run_dir / FALLBACK_DIR, log=log)


def evaluator_for(spec):
    """A function (networks by name, spec) -> scores to log, or None when the spec evaluates never."""
    if not spec.eval.every:
        return None
    return {"generate": _gan_evaluator, "translate": _translation_evaluator}[spec.method.use]()


def describe_scores(record: dict, use: str, *, labelled: bool = True) -> str:
    """A logged evaluation in one line, for `train`'s closing report: FID and KID, with IS and the
    class accuracy of a class-conditional generator (`labelled`; `evaluate.describe_result`)."""
    if use == "translate":  # both directions
        return "; ".join(
            f"{a}->{b}: FID {record[f'fid_{a}_to_{b}']:.2f}, content kept {record[f'content_accuracy_{a}_to_{b}']:.1%}"
            for a, b in (("a", "b"), ("b", "a"))
        )
    from pipeline.eval.evaluate import describe_result

    protocol = record.get("eval_protocol", {})
    return describe_result(record, labelled=labelled) + (
        f" ({protocol.get('num_samples', '?')} samples, {protocol.get('feature_net', '?')} features, "
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
        from pipeline.eval.evaluate import conditional, evaluate_module, make_scorer

        e, name = spec.eval, spec.method.exports(spec)[0]
        start = time.perf_counter()
        side = _side(nets[name], spec)
        if side not in scorers:
            scorers[side] = make_scorer(spec, e.features, _device(nets), resolution=side, log=say)
        scorer = scorers[side]
        result = evaluate_module(
            nets[name],
            spec,
            scorer,
            num=e.num_samples,
            truncation=e.truncation,
            standing_passes=e.standing_stats,
            seed=spec.seed,
            log=say,
        )
        from pipeline.eval.sampling import has_ema

        protocol = result.pop("protocol") | {"ema": has_ema(spec, name)}
        record = result | {"eval_protocol": protocol}
        labelled = conditional(spec)
        say(f"  {describe_scores(record, spec.method.use, labelled=labelled)} [{time.perf_counter() - start:.1f} s]")
        return record

    return evaluate


def _translation_evaluator():
    def evaluate(nets: dict, spec) -> dict:
        from pipeline.eval.translation import evaluate_translation

        start = time.perf_counter()
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
        record = flat_translation_scores(result) | {"eval_protocol": result["protocol"]}
        say(f"  {describe_scores(record, spec.method.use)} [{time.perf_counter() - start:.1f} s]")
        return record

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
