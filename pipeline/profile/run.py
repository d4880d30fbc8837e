"""`python -m pipeline profile SPEC`: where the time of a training step goes.

Builds the run with `Trainer` (the builders, engines, data and phases `train` uses), then:
1. the loader alone: images/s of the input pipeline with no model (skipped for synthetic data);
2. warm-up steps: compilation and autotuning, timed and reported apart;
3. timed steps with named regions (exclusive seconds per phase; see `regions.py`);
4. a few traced steps under `torch.profiler` (a Chrome / Perfetto trace with the same names).
Writes runs/NAME/profile/: report.json, report.md, phases.png, trace.json. Nothing is
checkpointed and an existing run is not resumed or touched.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from pipeline.distributed import engines as dist
from pipeline.methods import describe
from pipeline.precision import DTYPES
from pipeline.profile.flops import meta_step
from pipeline.profile.peak import device_peak, matmul_rate
from pipeline.regions import Regions
from pipeline.runs import Run

SHARED_REGIONS = ("data_wait", "ema", "comm")  # besides each phase's forward, backward and optimizer regions


# kineto, torch.profiler's engine, writes its USDT trace markers to stderr ("USDT:... profiler_start",
# "profiler_stop", at its highest severity, 5, above ERROR, which torch otherwise sets as the
# threshold). It reads the threshold from KINETO_LOG_LEVEL once, when the process's first profiler
# starts (pytorch/kineto 114171df, libkineto/src/init.cpp: libkineto_init, suppressLibkinetoLogMessages).
KINETO_QUIET = "6"  # above every severity; KINETO_LOG_LEVEL=4 in the environment shows errors again


def quiet_kineto() -> None:
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def loader_rate(loader, batches: int, warmup: int, images_per_batch: int, device: torch.device) -> float:
    """Images/s of `loader` alone (this rank): `warmup` batches untimed, then `batches` timed."""
    for _ in range(warmup):
        next(loader)
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    batch[0].sum().item()  # the last batch is really there
    _sync(device)
    return batches * images_per_batch / (time.perf_counter() - start)


def profile_loader_only(loaded, *, steps: int, warmup: int, device: str | None = None) -> dict:
    """`--model none`: the input pipeline alone, as many batches as `steps` training steps take."""
    from pipeline.data.dali import loader_from_spec
    from pipeline.train.preflight import batch_plan

    spec, t = loaded.spec, loaded.spec.train
    world = dist.setup(device, spec.run.collective_timeout_s)
    micro, accum = batch_plan(t, world.size)
    dtype = DTYPES[t.precision]
    stream, labelled = next(iter(spec.method.streams(spec).items()))  # the first stream the method reads
    loader = loader_from_spec(
        spec,
        stream=stream,
        labelled=labelled,
        batch_size=micro,
        device=world.device,
        rank=world.rank,
        world_size=world.size,
        dtype=dtype,
    )
    per_step = meta_step(loaded, micro, accum)[1][stream]
    batches = steps * per_step
    rate = loader_rate(loader, batches, warmup * per_step, micro, world.device)
    per_rank = _gather(rate)
    report = {
        "spec": spec.name,
        "model": "none",
        "data": "synthetic" if all(s.synthetic for s in spec.data.all_streams().values()) else "real",
        "device": _device_name(world.device),
        "world_size": world.size,
        "batch_per_rank": micro,
        "batches_per_rank": batches,
        "loader_images_per_s": sum(per_rank),
        "loader_images_per_s_per_rank": per_rank,
    }
    return _write(loaded, report, world)


def profile(loaded, *, steps: int, warmup: int, trace_steps: int = 2, device: str | None = None) -> dict:
    from pipeline.train.loop import Trainer
    from pipeline.train.preflight import check_before_building, world_size_from_environment

    spec, t = loaded.spec, loaded.spec.train
    check_before_building(loaded.spec, world_size_from_environment())
    tr = Trainer(loaded, device=device, resume=False)
    world, dev = tr.world, tr.world.device
    # a method with a schedule is measured where it ends (ProGAN: the last stage, stable)
    tr.start_at(tr.method.profiled_at())
    peak, peak_source = device_peak(dev, t.precision)  # MFU's denominator (refused settings stop here)

    # the step's FLOPs and the batches it reads, from one run of the phases on the meta device
    flops, reads = meta_step(loaded, tr.micro, tr.accum)

    # ----- 1. the loader alone: the first stream the method reads, as many batches as the
    # phases read from it in `steps` steps
    name, loader = next(iter(tr.streams.items()))
    loader_alone = None
    if spec.data.all_streams()[name].shards is not None:
        batches = reads[name]
        loader_alone = _gather(loader_rate(loader, steps * batches, batches, tr.micro, dev))

    # ----- 2. warm-up (compilation)
    warm_s = []
    for _ in range(warmup):
        start = time.perf_counter()
        tr.run_step()
        _sync(dev)
        warm_s.append(time.perf_counter() - start)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    # ----- 3. timed steps, phases by region
    graphs_before = _graphs_compiled()
    step_s = []
    with Regions(dev) as regions:
        for _ in range(steps):
            start = time.perf_counter()
            tr.run_step()
            _sync(dev)
            step_s.append(time.perf_counter() - start)
    recompiles = _graphs_compiled() - graphs_before

    # ----- 4. a trace of a few more steps
    out_dir = _out_dir(loaded)
    trace_path = None
    if trace_steps:
        quiet_kineto()
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []
        )
        with torch.profiler.profile(activities=activities) as prof, Regions(dev):
            for _ in range(trace_steps):
                tr.run_step()
                _sync(dev)
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            trace_path = out_dir / "trace.json"
            prof.export_chrome_trace(str(trace_path))

    # ----- the figures
    total_s = sum(step_s)
    iteration_s = total_s / steps
    phases = {name: regions.seconds.get(name, 0.0) / steps for name in SHARED_REGIONS}
    phases |= {name: s / steps for name, s in regions.seconds.items() if name not in SHARED_REGIONS}
    phases["other"] = max(0.0, iteration_s - sum(phases.values()))
    flops_rank = sum(v for k, v in flops.items() if k != "sn")
    flops_iteration = flops_rank * world.size
    images_per_step = tr.images_last_step  # real images read from the streams, all ranks
    images_per_rank = _gather(images_per_step / world.size / iteration_s)
    images_per_s = sum(images_per_rank)
    achieved = flops_iteration / iteration_s
    model_rate = images_per_step / max(iteration_s - phases["data_wait"], 1e-12)
    compute_s = [s - iteration_s for s in warm_s]
    grown = tr.schedule.record() if tr.schedule is not None else {}  # a growing method's stage, phase, alpha
    report = {
        "spec": spec.name,
        "data": "synthetic" if all(s.synthetic for s in spec.data.all_streams().values()) else "real",
        "device": _device_name(dev),
        "world_size": world.size,
        "batch_size": tr.micro * tr.accum * world.size,
        "batch_per_rank": tr.micro,
        **({"schedule": grown} if grown else {}),
        "accumulation": tr.accum,
        "method": spec.method.kind,
        "phases": describe(tr.method.phases),
        "precision": t.precision,
        "compiled": spec.compile.enabled,
        "compile_scope": spec.compile.scope if spec.compile.enabled else None,
        "channels_last": spec.compile.channels_last,
        "steps": steps,
        "warmup": warmup,
        "images_per_step": images_per_step,
        "images_per_s": images_per_s,
        "images_per_s_per_rank": images_per_rank,
        "iteration_s": iteration_s,
        "iteration_s_median": statistics.median(step_s),
        "iteration_s_min": min(step_s),
        "iteration_s_max": max(step_s),
        "phases_s": phases,
        "phases_sum_s": sum(v for k, v in phases.items() if k != "other"),
        "comm_share": phases["comm"] / iteration_s,
        "flops_per_iteration": flops_iteration,
        "flops_per_iteration_by_phase": {k: v * world.size for k, v in flops.items() if k != "sn"},
        "sn_flops_per_iteration": flops["sn"] * world.size,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak * world.size if peak else None,
        "peak_source": peak_source,
        "mfu": achieved / (peak * world.size) if peak else None,
        # beside the peak, never its stand-in: the best a plain matrix product reached here
        "matmul_flops_per_s": matmul_rate(t.precision) * world.size if dev.type == "cpu" else None,
        "compile_s": sum(compute_s) if spec.compile.enabled else None,
        "warmup_s": warm_s,
        "recompiles": recompiles,
        "peak_memory_bytes_per_rank": _gather(_peak_memory(dev)),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "process max RSS",
        "loader_images_per_s": sum(loader_alone) if loader_alone else None,
        "model_images_per_s": model_rate,
        "trace": str(trace_path) if trace_path else None,
    }
    report["verdict"] = verdict(report)
    return _write(loaded, report, world)


def verdict(r: dict) -> str:
    phases = {k: v for k, v in r["phases_s"].items() if k not in ("data_wait", "other")}
    largest = max(phases, key=lambda name: phases[name])
    share = phases[largest] / r["iteration_s"]
    if r["loader_images_per_s"] is not None and r["loader_images_per_s"] < r["model_images_per_s"]:
        return (
            f"data-bound: the loader alone delivers {r['loader_images_per_s']:,.0f} images/s, the model "
            f"consumes {r['model_images_per_s']:,.0f}; add loader threads (data.num_threads), decode on the "
            f"GPU, or store smaller JPEGs. Largest phase: {largest} ({share:.0%})"
        )
    basis = (
        "the loader was not measured (synthetic data)"
        if r["loader_images_per_s"] is None
        else f"the loader alone delivers {r['loader_images_per_s']:,.0f} images/s, the model consumes "
        f"{r['model_images_per_s']:,.0f}"
    )
    return f"compute-bound; {basis}. Largest phase: {largest} ({share:.0%} of the step)"


def _gather(value: float) -> list[float]:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(values, value)
        return values
    return [value]


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _out_dir(loaded) -> Path:
    return Run(loaded.spec.run_dir).profile


def _write(loaded, report: dict, world) -> dict:
    if world.is_main:
        from pipeline.profile.report import plot_phases, summary

        out = _out_dir(loaded)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        text = summary(report)
        (out / "report.md").write_text(text)
        if "phases_s" in report:
            plot_phases(report, out / "phases.png")
        print(text, end="")
        print(f"\nwritten to {out}/")
    dist.barrier()
    return report
