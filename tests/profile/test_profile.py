"""Profiling runs on CPU: FLOPs against flop_counter, phases against the step time, the files,
the loader alone, 2 ranks, the verdict and the peak table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.blocks.attention import explicit_attention
from pipeline.profile.flops import step_flops
from pipeline.profile.peak import GPU_PEAK_TFLOPS, gpu_peak
from pipeline.profile.run import quiet_kineto, verdict
from pipeline.spec import load_spec
from pipeline.train.loop import Trainer

TINY = ["data.synthetic=true", "train.batch_size=4"]


@pytest.mark.parametrize(
    "extra",
    [
        [],  # BigGAN: hinge, ortho_reg in G, 1 D step
        ["method.d_steps=2", "train.batch_per_rank=2", "method.r1_gamma=1.0", "method.ortho_reg=0"],  # accumulation, R1
    ],
    ids=["biggan", "accumulation_r1"],
)
def test_flops_per_step_match_flop_counter_over_a_real_step(tmp_path, extra):
    loaded = load_spec("tiny_biggan", TINY + extra + [f"run.dir={tmp_path}"])
    trainer = Trainer(loaded, resume=False)
    trainer.run_step()  # first step outside the count (lazy initialisation)
    # the model's FLOPs: attention by its formula, not the fused kernel's zero-padded queries and keys
    with FlopCounterMode(display=False) as counter, explicit_attention():
        trainer.run_step()
    counted = counter.get_total_flops()
    planned = step_flops(loaded, trainer.micro, trainer.accum)
    assert sum(v for k, v in planned.items() if k != "sn") == pytest.approx(counted, rel=0.02)
    assert planned["D_bwd"] > planned["D_fwd"] > 0 and planned["G_bwd"] > 0


def test_profile_writes_report_trace_and_plot(cli, tmp_path):
    result = cli(
        "profile", "tiny_biggan", *TINY, f"run.dir={tmp_path}", "--steps", "2", "--warmup", "1", "--trace-steps", "1"
    )
    assert result.code == 0, result.err
    out = tmp_path / "profile"
    report = json.loads((out / "report.json").read_text())
    phases = report["phases_s"]
    named = sum(v for k, v in phases.items() if k != "other")
    assert named == pytest.approx(report["iteration_s"], rel=0.05)  # the phases add up to the step
    for name in ("G_fwd", "D_fwd", "D_bwd", "G_bwd", "opt_D", "opt_G", "ema", "comm"):
        assert phases[name] > 0, name
    assert report["images_per_s"] == pytest.approx(report["images_per_step"] / report["iteration_s"])
    assert report["images_per_step"] == 4 and report["world_size"] == 1 and report["batch_per_rank"] == 4
    assert report["recompiles"] == 0 and 0 < report["mfu"] < 1
    assert report["flops_per_iteration"] == pytest.approx(sum(report["flops_per_iteration_by_phase"].values()))
    text = (out / "report.md").read_text()
    assert "Verdict: compute-bound" in text and text.strip().endswith("**")
    assert "Verdict: compute-bound" in result.out
    assert (out / "phases.png").read_bytes()[:4] == b"\x89PNG"
    trace = json.loads((out / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"data_wait", "G_fwd", "D_fwd", "D_bwd", "G_bwd", "opt_D", "opt_G", "ema"} <= names


def test_loader_alone_and_real_data(cli, demo_shards, tmp_path):
    common = [
        f"data.shards={demo_shards}",
        f"run.dir={tmp_path}",
        "train.batch_size=16",
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    result = cli("profile", "demo", *common, "--model", "none")
    assert result.code == 0, result.err
    alone = json.loads((tmp_path / "profile" / "report.json").read_text())
    batches = 2 * load_spec("demo").spec.method.d_steps  # 2 steps, a batch per D step
    assert alone["model"] == "none" and alone["loader_images_per_s"] > 0 and alone["batches_per_rank"] == batches
    result = cli("profile", "demo", *common, "--trace-steps", "0", "method.d_steps=1")
    assert result.code == 0, result.err
    full = json.loads((tmp_path / "profile" / "report.json").read_text())
    assert full["data"] == "real" and full["loader_images_per_s"] > 0 and full["phases_s"]["data_wait"] > 0
    assert full["verdict"].startswith(("data-bound", "compute-bound"))


@pytest.mark.slow
def test_two_ranks_report_per_rank_and_total(tmp_path, root, clean_env):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "profile",
            "tiny_biggan",
            *TINY,
            "procs=2",
            f"run.dir={tmp_path}",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--trace-steps",
            "0",
        ],
        cwd=root,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "profile" / "report.json").read_text())
    assert report["world_size"] == 2 and report["batch_per_rank"] == 2
    assert len(report["images_per_s_per_rank"]) == 2
    assert report["images_per_s"] == pytest.approx(sum(report["images_per_s_per_rank"]))
    assert report["phases_s"]["comm"] > 0 and 0 < report["comm_share"] < 1


def test_bad_arguments_are_user_errors(cli):
    result = cli("profile", "tiny_biggan", *TINY, "--steps", "0")
    assert result.code == 2 and "--steps" in result.err


def test_verdict_names_the_bound_and_the_largest_phase():
    report = {
        "phases_s": {"data_wait": 0.5, "D_fwd": 0.2, "D_bwd": 0.1, "other": 0.0},
        "iteration_s": 0.8,
        "loader_images_per_s": 100.0,
        "model_images_per_s": 300.0,
    }
    assert verdict(report).startswith("data-bound") and "D_fwd" in verdict(report)
    report["loader_images_per_s"] = 1000.0
    assert verdict(report).startswith("compute-bound")


def test_gpu_peak_finds_the_most_specific_entry_for_a_device_name(monkeypatch):
    # names as torch.cuda.get_device_name gives them -> the table entry they are
    for name, entry in [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),  # not the SXM part, whose name fragment it contains
        ("NVIDIA A100-SXM4-80GB", "A100"),  # not the A10, whose name fragment it contains
        ("NVIDIA A10", "A10"),
    ]:
        peak, what = gpu_peak(name, "bf16")
        assert (peak, what) == (GPU_PEAK_TFLOPS[entry]["bf16"] * 1e12, f"{entry} dense bf16 (data sheet)"), name
    for entry in GPU_PEAK_TFLOPS:  # no entry hides behind an earlier, shorter one
        assert gpu_peak(f"NVIDIA {entry}", "bf16")[1].startswith(f"{entry} dense"), entry
    assert gpu_peak("Some Future GPU", "bf16") is None
    assert gpu_peak("NVIDIA L40", "bf16") is None  # not the L4, whose name is a prefix of it
    # fp32 training runs convolutions in TF32 (PyTorch's default), so its peak is TF32's unless that is off
    assert torch.backends.cudnn.allow_tf32 is True
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp32")[0] == GPU_PEAK_TFLOPS["H100"]["tf32"] * 1e12
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp32")[0] == GPU_PEAK_TFLOPS["H100"]["fp32"] * 1e12


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2596.130
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
"""


def test_the_cpu_peak_is_cores_times_clock_times_flops_per_cycle(monkeypatch):
    from pipeline.profile.peak import ANY_X86_GHZ, CpuInfo, flops_per_cycle, max_clock_ghz

    zen4 = CpuInfo.parse(ZEN4)
    assert (zen4.vendor, zen4.family, zen4.model, zen4.name) == ("AuthenticAMD", 25, 17, "AMD EPYC")
    # Zen 4 runs AVX-512 on two 256-bit FMA pipes: 2 x 8 lanes x 2 FLOPs; bf16 dot products double it
    assert flops_per_cycle(zen4, "fp32")[0] == 32 and flops_per_cycle(zen4, "bf16")[0] == 64
    intel = CpuInfo("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8480+", frozenset({"avx2", "fma", "avx512f"}))
    assert flops_per_cycle(intel, "fp32")[0] == 64 and flops_per_cycle(intel, "bf16")[0] == 64  # no bf16 unit
    amx = CpuInfo("GenuineIntel", 6, 143, "Xeon", frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    assert flops_per_cycle(amx, "bf16") == (1024, "AMX bf16 tiles")
    assert flops_per_cycle(CpuInfo("", -1, -1, "", frozenset({"avx2", "fma"})), "fp32")[0] == 32
    # the clock: the family's highest boost where cpufreq is hidden (no CPU listed: none read), the
    # user's figure, else the highest of any x86 core
    monkeypatch.delenv("PIPELINE_CPU_MAX_GHZ", raising=False)
    assert max_clock_ghz(zen4, [])[0] == 4.4 and "Zen 4" in max_clock_ghz(zen4, [])[1]
    assert max_clock_ghz(CpuInfo("AuthenticAMD", 25, 17, "AMD Ryzen 9 7950X", frozenset()), []) == (
        ANY_X86_GHZ,
        "the highest boost of any x86 core; this CPU's is unknown (set PIPELINE_CPU_MAX_GHZ)",
    )  # a desktop Zen 4 boosts to 5.7 GHz: not an EPYC's bound
    monkeypatch.setenv("PIPELINE_CPU_MAX_GHZ", "3.5")
    assert max_clock_ghz(zen4, []) == (3.5, "PIPELINE_CPU_MAX_GHZ")
    from pipeline.errors import SpecError

    for bad in ("fast", "nan", "0", "3500"):  # 3500: MHz, not GHz
        monkeypatch.setenv("PIPELINE_CPU_MAX_GHZ", bad)
        with pytest.raises(SpecError, match=f"PIPELINE_CPU_MAX_GHZ is '{bad}', not a clock in GHz"):
            max_clock_ghz(zen4, [])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cpu_peak_bounds_what_this_machine_reaches(precision, monkeypatch):
    # the measured matrix product was the denominator once, and the demo's convolutions beat it (MFU 111%)
    from pipeline.profile.peak import cpu_peak, matmul_rate

    monkeypatch.delenv("PIPELINE_CPU_MAX_GHZ", raising=False)
    peak, what = cpu_peak(precision)
    assert matmul_rate(precision, seconds=0.3) <= peak, what


PROFILE_ONCE = """
import torch
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
    torch.ones(4) @ torch.ones(4)
"""


def test_the_profiler_prints_no_kineto_markers(root, clean_env, monkeypatch):
    # without quiet_kineto, kineto writes "USDT: ... profiler_start" and "profiler_stop" to stderr
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    default = {k: v for k, v in clean_env.items() if k != "KINETO_LOG_LEVEL"}
    quiet_kineto()  # what `profile` does before its trace: the environment its profiler then starts in
    quiet = default | {"KINETO_LOG_LEVEL": os.environ["KINETO_LOG_LEVEL"]}
    err = {
        name: subprocess.run(
            [sys.executable, "-c", PROFILE_ONCE], cwd=root, env=env, capture_output=True, text=True, check=True
        ).stderr
        for name, env in (("default", default), ("quiet", quiet))
    }
    if "profiler_start" not in err["default"]:
        pytest.skip("this torch's kineto prints no trace markers to silence")
    assert "USDT" not in err["quiet"] and "profiler_st" not in err["quiet"], err["quiet"]
