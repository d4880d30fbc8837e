"""Cross-replica BatchNorm: on 2 gloo ranks, each holding part of a global batch, it equals plain
BatchNorm over the whole batch (outputs, input and parameter gradients, running statistics),
eagerly and under torch.compile(fullgraph=True); on a single process it is plain BatchNorm."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline.blocks import sync_bn
from pipeline.blocks.layers import BatchNorm
from pipeline.blocks.sync_bn import sync_batch_norm
from pipeline.distributed.engines import free_port

WORLD = 2
STEPS = 2  # running stats accumulate; compiled, the second step reuses the graph and its backward
# must not see the running stats its forward updated (it did when they fed the sums; see sync_bn)
MOMENTUM, EPS = 0.1, 1e-5
TOL = 1e-10  # float64
# name -> (global shape, rows of the global batch per rank, affine, momentum)
CASES = {
    "nchw": ((8, 3, 4, 4), (4, 4), True, MOMENTUM),
    "nc": ((8, 3), (4, 4), True, MOMENTUM),
    "nchw_uneven": ((8, 3, 4, 4), (3, 5), True, MOMENTUM),
    "nchw_no_affine": ((8, 3, 4, 4), (4, 4), False, MOMENTUM),  # as inside ConditionalBatchNorm
    "nc_cumulative": ((8, 3), (4, 4), True, None),  # momentum None: running stats are plain averages
}
COMPILE_CASES = ("nchw", "nc", "nc_cumulative")


def _data(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (mean 3, std 2, so that E[x^2] - mean^2 cancels a little) and the global
    upstream gradient."""
    shape = CASES[name][0]
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    x = 3 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, torch.randn(shape, generator=gen, dtype=torch.float64)


def _init_affine(bn: nn.Module) -> None:
    if bn.affine:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            bn.weight.copy_(1 + 0.5 * torch.randn(bn.weight.shape, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen, dtype=torch.float64))


def _ours(name: str) -> BatchNorm:
    shape, _, affine, momentum = CASES[name]
    bn = BatchNorm(shape[1], eps=EPS, momentum=momentum, affine=affine, cross_replica=True).double().train()
    _init_affine(bn)
    return bn


def _reference(name: str) -> nn.Module:
    shape, _, affine, momentum = CASES[name]
    cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    bn = cls(shape[1], eps=EPS, momentum=momentum, affine=affine).double().train()
    _init_affine(bn)
    return bn


def _run(bn: nn.Module, forward, x: torch.Tensor, g: torch.Tensor) -> dict:
    """One training forward and backward; what a step produced."""
    x = x.clone().requires_grad_()
    y = forward(x)
    y.backward(g)
    out = {"y": y.detach(), "dx": x.grad}
    if bn.affine:
        out["dw"], out["db"] = bn.weight.grad.clone(), bn.bias.grad.clone()
        bn.weight.grad = bn.bias.grad = None
    return out


def _worker(rank: int, port: int, outdir: str, compiled: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        results = {}
        for name in COMPILE_CASES if compiled else CASES:
            rows = CASES[name][1]
            lo, hi = sum(rows[:rank]), sum(rows[: rank + 1])
            bn = _ours(name)
            forward = torch.compile(bn, fullgraph=True) if compiled else bn
            steps = []
            for step in range(STEPS):
                x, g = _data(name, step)
                steps.append(_run(bn, forward, x[lo:hi], g[lo:hi]))
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            torch._dynamo.utils.counters.clear()
            results[name] = {
                "steps": steps,
                "graphs": graphs,
                "running_mean": bn.running_mean.clone(),
                "running_var": bn.running_var.clone(),
                "num_batches_tracked": bn.num_batches_tracked.clone(),
            }
        if not compiled:
            # one collective per forward; none on the meta device (shape inference), which is plain BN
            calls = []
            all_reduce = sync_bn.funcol.all_reduce
            sync_bn.funcol.all_reduce = lambda *a, **k: calls.append(a[0].shape) or all_reduce(*a, **k)
            try:
                _ours("nchw")(_data("nchw", 0)[0][4 * rank : 4 * (rank + 1)])
                meta = BatchNorm(3, eps=EPS, momentum=MOMENTUM, affine=True, cross_replica=True).to("meta")
                meta(torch.empty(4, 3, 4, 4, device="meta"))
            finally:
                sync_bn.funcol.all_reduce = all_reduce
            results["collectives"] = calls
            # a group of this rank alone: the function then normalises with the local statistics
            groups = [dist.new_group([r]) for r in range(WORLD)]
            x, _ = _data("nchw", 0)
            x = x[4 * rank : 4 * (rank + 1)]
            rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
            y = sync_batch_norm(x, rm, rv, None, None, MOMENTUM, EPS, group=groups[rank])
            erm, erv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
            expected = F.batch_norm(x, erm, erv, None, None, True, MOMENTUM, EPS)
            results["own_group"] = {"y": y, "expected": expected, "rm": rm, "erm": erm, "rv": rv, "erv": erv}
            # bf16 activations, float32 running statistics
            x = _data("nchw", 0)[0][4 * rank : 4 * (rank + 1)].to(torch.bfloat16)
            rm, rv = torch.zeros(3), torch.ones(3)
            y = sync_batch_norm(x, rm, rv, None, None, MOMENTUM, EPS)
            results["bf16"] = {"y": y, "rm": rm, "rv": rv}
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, compiled: bool) -> list[dict]:
    mp.spawn(_worker, args=(free_port(), str(tmp_path), compiled), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    assert err <= TOL, f"{what}: max error {err:.3g}"


def _check_against_reference(ranks: list[dict], names, compiled: bool = False) -> None:
    for name in names:
        ref = _reference(name)
        for step in range(STEPS):
            x, g = _data(name, step)
            want = _run(ref, ref, x, g)
            got = [r[name]["steps"][step] for r in ranks]
            for key in ("y", "dx"):  # each rank holds its rows: concatenated, they are the global batch's
                _close(torch.cat([s[key] for s in got]), want[key], f"{name} step {step} {key}")
            for key in ("dw", "db") if ref.affine else ():  # each rank's share; summed (as DDP/ZeRO do)
                _close(sum(s[key] for s in got), want[key], f"{name} step {step} {key}")
        for r, res in enumerate(ranks):  # every rank holds the global running statistics
            _close(res[name]["running_mean"], ref.running_mean, f"{name} rank {r} running_mean")
            _close(res[name]["running_var"], ref.running_var, f"{name} rank {r} running_var")
            assert res[name]["num_batches_tracked"].item() == STEPS
            if compiled:  # one graph (no graph break), not recompiled for the second step
                assert res[name]["graphs"] == 1, f"{name} rank {r}: {res[name]['graphs']} graphs"


def test_two_gloo_ranks_equal_batchnorm_over_the_global_batch(tmp_path):
    ranks = _spawn(tmp_path, compiled=False)
    _check_against_reference(ranks, CASES)
    for r, res in enumerate(ranks):
        assert res["collectives"] == [torch.Size([2 * 3 + 1])]  # [sum x, sum x^2, count] in one
        own = res["own_group"]
        for got, want in (("y", "expected"), ("rm", "erm"), ("rv", "erv")):
            _close(own[got], own[want], f"rank {r} alone in its group: {got}")
    # bf16: the output keeps bf16, the statistics are float32 ones of the global (bf16) batch
    x = _data("nchw", 0)[0].to(torch.bfloat16).float()
    rm, rv = torch.zeros(3), torch.ones(3)
    want = F.batch_norm(x, rm, rv, None, None, True, MOMENTUM, EPS)
    got = torch.cat([res["bf16"]["y"] for res in ranks])
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() <= 2**-7 * want.abs().max().item()  # bf16 rounding
    for res in ranks:
        assert (res["bf16"]["rm"] - rm).abs().max().item() < 1e-6
        assert (res["bf16"]["rv"] - rv).abs().max().item() < 1e-6


def test_compiled_fullgraph_on_two_gloo_ranks(tmp_path):
    ranks = _spawn(tmp_path, compiled=True)
    _check_against_reference(ranks, COMPILE_CASES, compiled=True)


@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (8, 3)])
def test_single_process_is_plain_batchnorm(shape):
    assert not dist.is_initialized() or dist.get_world_size() == 1  # no group, or one of this process alone
    ours = BatchNorm(shape[1], eps=EPS, momentum=MOMENTUM, affine=True, cross_replica=True).double()
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], eps=EPS, momentum=MOMENTUM).double()
    _init_affine(ours), _init_affine(ref)
    for _step in range(STEPS):
        x, g = 3 + 2 * torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        got, want = _run(ours, ours, x, g), _run(ref, ref, x, g)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert torch.equal(ours.running_mean, ref.running_mean) and torch.equal(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(ours(x), ref(x))
