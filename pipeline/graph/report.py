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
        table.add_column("FLOPs/img", justify="right", footer=_si(plan.flops_per_image))
        for row in plan.rows:
            table.add_row(row.name, row.kind, row.shape, f"{row.params:,}", _si(row.flops))
        console.print(table)
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
