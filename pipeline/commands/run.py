"""Training and profiling: `train` and `profile` load a spec, write the demo shards on first use,
and either run in this process or launch one process per local rank (`procs=N`, `gpus=N`); a
finished or interrupted run says where it stands (`train_report`, `lost_peer_message`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from pipeline.commands import device_memory, memory_report, split_spec_args
from pipeline.data import DEMO_DOMAIN_SHARDS, DEMO_SHARDS
from pipeline.errors import user_error


def launch(num: int, command: str, argv: list[str]) -> int:
    """Run `num` ranks of `python -m pipeline COMMAND` on this machine (the environment DeepSpeed's
    launcher would set). Several machines: `deepspeed --hostfile FILE --module pipeline train ...`."""
    import subprocess
    import time

    from pipeline.distributed.engines import free_port

    port = str(free_port())
    procs = []
    for rank in range(num):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(num),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", command, *argv], env=env))
    # a rank that fails (a refusal, a crash) takes the others down rather than leaving them
    # waiting for it in a collective; one stopped by Ctrl-C (130) lets the others save and stop too
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0, 130) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return max((p.returncode for p in procs), key=abs)


def split_run_args(args: list[str]) -> tuple[int, str | None, list[str]]:
    """(number of local ranks, device, the rest) from `procs=N` (CPU ranks), `gpus=N`, `device=`."""
    ranks, device, rest = 1, None, []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("procs", "gpus"):
            if not value.isdigit() or int(value) < 1:
                raise user_error(f"{key}={value}: give a number of processes, e.g. {key}=2")
            ranks, device = int(value), ("cpu" if key == "procs" else device)
        elif key == "device":
            device = value
        else:
            rest.append(arg)
    return ranks, device, rest


def ensure_demo_shards(loaded) -> None:
    """Write the embedded demo data on first use: the digits, or the two-domain digits."""
    from pipeline.data.demo import build_demo_shards, demo_shards_ready
    from pipeline.eval.classifier import build_domain_demo, domain_demo_ready
    from pipeline.train.preflight import world_size_from_environment

    read = {s.shards for s in loaded.spec.data.all_streams().values() if not s.synthetic}
    missing: list[tuple[str, Callable[..., dict], str]] = []
    if DEMO_SHARDS in read and not demo_shards_ready():
        missing.append((DEMO_SHARDS, build_demo_shards, "demo"))
    if read & {f"{DEMO_DOMAIN_SHARDS}/a", f"{DEMO_DOMAIN_SHARDS}/b"} and not domain_demo_ready():
        missing.append((DEMO_DOMAIN_SHARDS, build_domain_demo, "two-domain demo"))
    for where, build, what in missing:
        if world_size_from_environment() > 1:  # every rank of an outside launcher would write them at once
            raise user_error(
                f"the {what} shards {where} are not written yet, and the ranks of a launched run do not write them",
                path="data.shards",
                hint="write them once first: `python -m pipeline demo-data` (or `just demo-data`)",
            )
        print(f"writing the {what} shards to {where}", file=sys.stderr)
        build(where)


def local_gpu_memory() -> float | None:
    """Bytes of this machine's first GPU as nvidia-smi reports them (no CUDA context is created in
    this process, which only launches the ranks); None without nvidia-smi."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return float(out[0]) * 2**20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def warn_if_too_big(loaded, ranks: int, gpu_memory: str | None) -> None:
    """Before `train gpus=N` builds anything: warn when the memory estimate per rank of the
    configured batch split exceeds the GPUs' memory, and say which split would fit."""
    from pipeline.profile.memory import DEFAULT_GPU_MEMORY, fit_warning

    memory = (device_memory(gpu_memory, True) if gpu_memory else local_gpu_memory()) or DEFAULT_GPU_MEMORY
    est = memory_report(loaded, ranks)
    warning = fit_warning(est, memory) if est is not None else None
    if warning:
        print(f"warning: {warning} (`validate ... gpus={ranks}` shows the estimate)", file=sys.stderr)


def check_and_prepare(spec, world_size: int) -> None:
    """Before any rank builds anything or a run directory is made: refuse with every problem the
    spec and its files show (the evaluation's included), then train the feature classifier the
    evaluation needs, if missing. Nothing for a run that is already complete."""
    from pipeline.eval.during_training import evaluation_issues, prepare_evaluation
    from pipeline.train.loop import already_complete
    from pipeline.train.preflight import check_before_building, rank_from_environment

    if already_complete(spec) is not None:
        return
    check_before_building(spec, world_size, evaluation_issues(spec))
    if rank_from_environment() == 0:  # the rank that evaluates
        prepare_evaluation(spec)


def cmd_train(ns) -> int:
    from pipeline.spec import load_spec
    from pipeline.train.preflight import world_size_from_environment

    ranks, device, rest = split_run_args(ns.args)
    spec_arg, overrides = split_spec_args(rest, default="demo")
    loaded = load_spec(spec_arg, overrides)
    ensure_demo_shards(loaded)  # once, before any rank starts
    if ranks > 1:
        check_and_prepare(loaded.spec, ranks)  # one refusal, not one per rank
    if any(arg.startswith("gpus=") for arg in ns.args) or ns.gpu_memory:
        warn_if_too_big(loaded, ranks, ns.gpu_memory)
    if ranks > 1:
        return launch(ranks, "train", rest + ([f"device={device}"] if device else []))
    check_and_prepare(loaded.spec, world_size_from_environment())
    from pipeline.eval.during_training import evaluator_for
    from pipeline.train.loop import train

    try:
        summary = train(loaded, device=device, evaluate=evaluator_for(loaded.spec))
    except RuntimeError as exc:
        from pipeline.distributed.engines import lost_peer

        if not lost_peer(exc):
            raise
        print(lost_peer_message(loaded.spec, exc), file=sys.stderr)
        return 1
    if world_size_from_environment() == 1 or os.environ.get("RANK", "0") == "0":
        print(train_report(summary, loaded.spec), file=sys.stderr)
    return 0


def lost_peer_message(spec, exc: RuntimeError) -> str:
    """What a rank says when a collective failed because another rank is gone or hung: which
    checkpoint the run can resume from, and how."""
    from pipeline.train import checkpoint
    from pipeline.train.preflight import rank_from_environment

    last = checkpoint.latest(spec.run_dir)
    where = (
        f"the last complete checkpoint is {last}; run the same command again (on every node) to resume from it"
        if last is not None
        else "no checkpoint was written yet; run the same command again (on every node) to start over"
    )
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"rank {rank_from_environment()}: error: another rank of this run stopped or stopped answering (killed, "
        f"crashed, its node lost, or silent for more than run.collective_timeout_s={spec.run.collective_timeout_s:g} "
        f"s), so the run stops here; {where}\n  (the collective said: {said[:300]})"
    )


def train_report(summary, spec) -> str:
    """What a finished `train` says: where the run stands and the scores of its last evaluation."""
    from pipeline.eval.during_training import describe_scores
    from pipeline.eval.evaluate import conditional
    from pipeline.runs import Run

    run = Run(summary.run_dir)
    if summary.steps_run == 0:
        lines = [
            f"{run.root} is already complete: step {summary.step} (train.max_steps {summary.max_steps}); nothing "
            "to train. Train longer with train.max_steps=N, or start a new run with run.dir=PATH."
        ]
    else:
        lines = [f"{run.root}: trained to step {summary.step} of {summary.max_steps} ({summary.images_seen:,} images)"]
    evals = [record for record in run.metrics.records() if "eval_protocol" in record]
    if evals:
        labelled = spec.method.use != "generate" or conditional(spec)
        scores = describe_scores(evals[-1], spec.method.use, labelled=labelled)
        lines.append(f"last evaluation, step {evals[-1]['step']}: {scores}")
    exported = sorted(run.export.glob("*.safetensors"))
    if exported:
        lines.append("exported weights: " + ", ".join(str(f) for f in exported))
    return "\n".join(lines)


def cmd_profile(ns) -> int:
    from pipeline.spec import load_spec
    from pipeline.train.preflight import check_before_building

    ranks, device, rest = split_run_args(ns.args)
    if ns.steps < 1 or ns.warmup < 0 or ns.trace_steps < 0:
        raise user_error("--steps must be at least 1, --warmup and --trace-steps at least 0")
    spec_arg, overrides = split_spec_args(rest, default="demo")
    loaded = load_spec(spec_arg, overrides)
    if ns.data == "synthetic":  # every stream the method reads
        streams = loaded.spec.data.streams
        synthetic = [f"data.streams.{n}.synthetic=true" for n in streams] + [
            f"data.streams.{n}.shards=null" for n in streams
        ]
        loaded = load_spec(spec_arg, overrides + (synthetic or ["data.synthetic=true", "data.shards=null"]))
    ensure_demo_shards(loaded)  # once, before any rank starts
    if ranks > 1:
        check_before_building(loaded.spec, ranks)  # one refusal, not one per rank
        options = [
            "--steps",
            str(ns.steps),
            "--warmup",
            str(ns.warmup),
            "--data",
            ns.data,
            "--model",
            ns.model,
            "--trace-steps",
            str(ns.trace_steps),
        ]
        return launch(ranks, "profile", rest + ([f"device={device}"] if device else []) + options)
    from pipeline.profile.run import profile, profile_loader_only

    if ns.model == "none":
        profile_loader_only(loaded, steps=ns.steps, warmup=ns.warmup, device=device)
    else:
        profile(loaded, steps=ns.steps, warmup=ns.warmup, trace_steps=ns.trace_steps, device=device)
    return 0
