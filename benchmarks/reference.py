"""Time the authors' BigGAN-PyTorch (github.com/ajbrock/BigGAN-PyTorch) training iteration on this
machine, as its users run it (fp32, eager), for side-by-side comparisons (`benchmarks/train.py
--reference DIR`). Nothing of the reference is copied here: this script imports the checkout
given on the command line and calls its own `train_fns.GAN_training_function`.

The configuration is BigGAN-deep 128 as in its scripts/launch_BigGAN_deep.sh, at `--ch` (32:
biggan_deep_128_ch32, whose parameter counts it reproduces) with hier z, shared embedding 128,
attention at 64, SN eps 1e-6, BN eps 1e-5, Adam betas (0, 0.999) eps 1e-6, in-place ReLUs, two D
steps and one G step per iteration, D on the concatenated real and fake batch, its EMA updated
every iteration (before ema_start it copies G, which is what it does early in a run). Real
images are random tensors: the loader is not timed.

Usage: python benchmarks/reference.py --checkout DIR [--batch 4] [--ch 32] [--steps 6] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types


class _Stub(types.ModuleType):
    """A stand-in module whose attributes are empty classes: the reference's utils and datasets
    import torchvision and h5py for data loading, which is not timed (and PyPI's torchvision does
    not import beside the CPU build of torch)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def _stub_modules() -> None:
    names = ("h5py", "torchvision", "torchvision.transforms", "torchvision.datasets", "torchvision.datasets.folder")
    names += ("torchvision.datasets.utils", "torchvision.utils", "torchvision.models", "torchvision.models.inception")
    for name in names:
        if name in sys.modules:
            continue
        sys.modules[name] = _Stub(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkout", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ns = ap.parse_args()
    _stub_modules()
    sys.path.insert(0, ns.checkout)
    import BigGANdeep as model  # the reference's modules, from the checkout
    import torch
    import train_fns
    import utils
    from torch import nn

    config = {
        "G_ch": ns.ch,
        "D_ch": ns.ch,
        "G_depth": 2,
        "D_depth": 2,
        "resolution": 128,
        "G_attn": "64",
        "D_attn": "64",
        "n_classes": 1000,
        "G_shared": True,
        "shared_dim": 128,
        "hier": True,
        "dim_z": 128,
        "G_activation": nn.ReLU(inplace=True),
        "D_activation": nn.ReLU(inplace=True),
        "G_lr": 5e-5,
        "D_lr": 2e-4,
        "G_B1": 0.0,
        "G_B2": 0.999,
        "D_B1": 0.0,
        "D_B2": 0.999,
        "adam_eps": 1e-6,
        "SN_eps": 1e-6,
        "BN_eps": 1e-5,
        "G_init": "ortho",
        "D_init": "ortho",
        "skip_init": False,
        "batch_size": ns.batch,
        "num_D_steps": 2,
        "num_D_accumulations": 1,
        "num_G_accumulations": 1,
        "toggle_grads": True,
        "split_D": False,
        "D_ortho": 0.0,
        "G_ortho": 0.0,
        "ema": True,
        "ema_decay": 0.9999,
        "ema_start": 20000,
        "G_fp16": False,
        "D_fp16": False,
    }
    torch.manual_seed(0)
    G, D = model.Generator(**config), model.Discriminator(**config)
    G_ema = model.Generator(**{**config, "skip_init": True, "no_optim": True})
    ema = utils.ema(G, G_ema, config["ema_decay"], config["ema_start"])
    z_, y_ = utils.prepare_z_y(ns.batch, G.dim_z, config["n_classes"], device="cpu")
    state = {"itr": 0}
    step = train_fns.GAN_training_function(G, D, model.G_D(G, D), z_, y_, ema, state, config)
    G.train()
    D.train()
    times = []
    for _ in range(ns.warmup + ns.steps):
        x = torch.rand(ns.batch * 2, 3, 128, 128) * 2 - 1
        y = torch.randint(0, config["n_classes"], (ns.batch * 2,))
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
        state["itr"] += 1
    params = {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())}
    result = {
        "s_per_iteration": statistics.median(times[ns.warmup :]),
        "first_iteration_s": times[0],
        "params": params,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
