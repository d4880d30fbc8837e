"""The human-readable report of `validate`: one table per network and totals."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def print_report(loaded, plans, console: Console | None = None) -> None:
    console = console or Console()
    spec = loaded.spec
    console.print(f"[bold]{spec.name}[/bold]  {loaded.path}" + (f"\n{spec.description}" if spec.description else ""))
    for which, plan in plans.items():
        table = Table(title=f"{which}", title_justify="left", show_footer=True)
        table.add_column("node", footer="total")
        table.add_column("kind")
        table.add_column("output", footer=" + ".join("x".join(map(str, s)) for s in plan.output_shapes))
        table.add_column("params", justify="right", footer=f"{plan.params:,}")
        # a growing network: the FLOPs of its last stage (its stages' converters never run together)
        table.add_column("FLOPs/img", justify="right", footer=_si(plan.flops_per_image))
        for row in plan.rows:
            table.add_row(row.name, row.kind, row.shape, f"{row.params:,}", _si(row.flops))
        console.print(table)
        if plan.growth is not None:
            _print_stages(plan, console)
        if plan.sn_flops_per_forward:
            console.print(
                f"  + spectral norm power iteration: {_si(plan.sn_flops_per_forward)} FLOPs per training "
                "forward, whatever the batch size"
            )
    console.print(
        "FLOPs: convolutions and matrix products as torch.utils.flop_counter counts them "
        "(2 per multiply-add), forward, per image.",
        style="dim",
    )


def _print_stages(plan, console: Console) -> None:
    g = plan.growth
    table = Table(
        title=f"{plan.which} by stage (grows along {g.chain!r}; a fade-in also runs the previous stage's converters)",
        title_justify="left",
    )
    for name in ("stage", "resolution", "params", "FLOPs/img", "fade-in params", "fade-in FLOPs/img"):
        table.add_column(name, justify="right")
    for s in g.stages:
        fade = (f"{s.fade_params:,}", _si(s.fade_flops)) if s.index else ("-", "-")
        table.add_row(str(s.index), f"{s.resolution}x{s.resolution}", f"{s.params:,}", _si(s.flops), *fade)
    console.print(table)
