"""FLOPs of one training step, from the graphs and the phase plan.

Both networks are instantiated on the meta device (no storage) at the run's micro-batch and put
through the phases of `pipeline.train.loop.Trainer` under `torch.utils.flop_counter`: in a D step,
G forward without gradients on `micro` latents and D forward and backward on `2 micro` images
(real and generated) that need no gradient, plus R1 / gradient penalty when the spec has them; in
the G step, G forward, D forward with D frozen (its weight gradients are skipped), BigGAN's
orthogonal regularization, and the backward through both. Each phase is multiplied by how often
it runs: `d_steps x accumulation` D steps and `accumulation` G steps per step.

Counted as flop_counter counts: convolutions and matrix products (2 FLOPs per multiply-add),
forward and backward. Spectral norm's power iteration (matrix-vector products, a few per weight
per forward, independent of the batch) is reported apart, as `validate` does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.graph import analyze_spec
from pipeline.graph.build import instantiate
from pipeline.train.regularizers import gradient_penalty, ortho_penalty, r1_penalty

PHASE_FLOPS = ("G_fwd", "D_fwd", "D_bwd", "G_bwd")


@contextmanager
def _count(totals: dict[str, float], name: str, times: int):
    with FlopCounterMode(display=False) as counter:
        yield
    totals[name] = totals.get(name, 0.0) + counter.get_total_flops() * times


def step_flops(loaded, micro: int, accum: int) -> dict[str, float]:
    """FLOPs per step (all phases, one rank) by region name, and `sn` for spectral norm."""
    spec, t = loaded.spec, loaded.spec.train
    plans = analyze_spec(loaded)
    G = instantiate(loaded, plans["generator"], "meta").train()
    D = instantiate(loaded, plans["discriminator"], "meta").train()
    d = spec.data
    d_times, totals = t.d_steps * accum, {}
    with torch.device("meta"):
        z = torch.zeros(micro, spec.latent.z_dim)
        y = torch.zeros(micro, dtype=torch.long)
        real = torch.zeros(micro, d.channels, d.resolution, d.resolution, requires_grad=bool(t.r1_gamma))

        # ----- a D step: fakes without gradients, D forward and backward on real + fake
        with torch.no_grad(), _count(totals, "G_fwd", d_times):
            fake = G(z, y)
        with _count(totals, "D_fwd", d_times):
            logits = D(torch.cat([real, fake]), torch.cat([y, y])).float()
            d_loss = logits.sum()
            if t.r1_gamma:
                d_loss = d_loss + r1_penalty(logits[:micro], real)
            if t.gp_weight:
                d_loss = d_loss + gradient_penalty(D, real, fake, y)
        with _count(totals, "D_bwd", d_times):
            d_loss.backward()

        # ----- the G step: D frozen, gradients flow through it into G
        D.requires_grad_(False)
        with _count(totals, "G_fwd", accum):
            fake = G(z, y)
        with _count(totals, "D_fwd", accum):
            g_loss = D(fake, y).float().sum()
        if t.ortho_reg:
            with _count(totals, "G_fwd", accum):
                g_loss = g_loss + ortho_penalty(G, t.ortho_reg)
        with _count(totals, "G_bwd", accum):
            g_loss.backward()
    # power iterations: every G forward (D steps and G step) and every D forward
    sn_g, sn_d = plans["generator"].sn_flops_per_forward, plans["discriminator"].sn_flops_per_forward
    totals["sn"] = float((sn_g + sn_d) * (d_times + accum))
    return totals
