"""The human side of a profile: a short Markdown summary and a bar chart of the phases."""

from __future__ import annotations

from pathlib import Path


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def summary(r: dict) -> str:
    if r.get("model") == "none":
        return (
            f"# Profile of {r['spec']}: the loader alone\n\n"
            f"{r['device']}, {r['world_size']} rank(s), batch {r['batch_per_rank']} per rank, "
            f"{r['data']} data: **{r['loader_images_per_s']:,.1f} images/s** "
            f"({', '.join(f'{v:,.1f}' for v in r['loader_images_per_s_per_rank'])} per rank) "
            f"over {r['batches_per_rank']} batches per rank.\n"
        )
    lines = [
        f"# Profile of {r['spec']}",
        "",
        (
            f"{r['device']}, {r['world_size']} rank(s); batch {r['batch_size']} ({r['batch_per_rank']} per rank x "
            f"{r['accumulation']} accumulation), method {r['method']} ({r['phases']}), {r['precision']}, "
            f"{'compiled' if r['compiled'] else 'eager'}, {r['data']} data; {r['steps']} timed steps "
            f"after {r['warmup']} warm-up."
            + (
                f" Measured at the schedule's last phase: stage {r['schedule']['stage']} "
                f"({r['schedule']['resolution']}x{r['schedule']['resolution']}, {r['schedule']['phase']})."
                if "schedule" in r
                else ""
            )
        ),
        "",
        (
            f"- **{r['images_per_s']:,.1f} real images/s** read (all ranks; per rank: "
            f"{', '.join(f'{v:,.1f}' for v in r['images_per_s_per_rank'])}), "
            f"{r['iteration_s']:.4g} s per step (median {r['iteration_s_median']:.4g}, "
            f"min {r['iteration_s_min']:.4g}, max {r['iteration_s_max']:.4g})"
        ),
        f"- {_si(r['flops_per_iteration'], 'FLOP')} per step -> {_si(r['achieved_flops_per_s'], 'FLOP/s')} achieved"
        + (
            f", **MFU {r['mfu']:.1%}** of {_si(r['peak_flops_per_s'], 'FLOP/s')} ({r['peak_source']})"
            if r["mfu"] is not None
            else f"; MFU unknown: {r['peak_source']}"
        )
        + (
            f"; the best a 1024x1024 matrix product reached here: {_si(r['matmul_flops_per_s'], 'FLOP/s')}"
            if r.get("matmul_flops_per_s")
            else ""
        ),
        f"- peak memory per rank ({r['peak_memory_kind']}): "
        + ", ".join(f"{m / 2**30:.2f} GiB" for m in r["peak_memory_bytes_per_rank"]),
        f"- warm-up steps: {', '.join(f'{s:.3g} s' for s in r['warmup_s'])}"
        + (f"; compilation ({r['compile_scope']}) about {r['compile_s']:.1f} s" if r["compile_s"] is not None else "")
        + f"; recompilations while timed: {r['recompiles']}",
        "",
        "| phase | s per step | share |",
        "|---|---:|---:|",
    ]
    for name, seconds in r["phases_s"].items():
        if seconds or name in ("data_wait", "comm"):
            lines.append(f"| {name} | {seconds:.4g} | {seconds / r['iteration_s']:.1%} |")
    lines += [
        "",
        (
            f"Communication: {r['comm_share']:.1%} of the step (DeepSpeed's gradient all-reduce; "
            "cross-replica BN statistics are inside the forward phases)."
        ),
        "",
        f"**Verdict: {r['verdict']}.**",
        "",
    ]
    return "\n".join(lines)


def plot_phases(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, v) for k, v in r["phases_s"].items() if v > 0]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.2))
    ax.barh([k for k, _ in items][::-1], [v * 1e3 for _, v in items][::-1], color="#4c72b0")
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v * 1e3, i, f" {v / r['iteration_s']:.0%}", va="center", fontsize=8)
    ax.set_xlabel("milliseconds per step")
    ax.set_title(
        f"{r['spec']}: {r['images_per_s']:,.3g} images/s, {r['precision']}, "
        f"{'compiled' if r['compiled'] else 'eager'}, {r['world_size']} rank(s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
