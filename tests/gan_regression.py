"""Five steps of tiny_biggan on the demo shards, recorded before the method layer existed
(`python tests/gan_regression.py SHARDS OUT.json`), so that `method: gan` can be checked against
what main trained then: the logged losses of a step without accumulation, and a digest of every
weight of G, D and the EMA after five steps with two D steps and two micro-batches each.

Re-recorded on 2026-12-06 when attention moved to the fused kernels and feature maps to channels-last:
different kernels, so different bits; the logged losses of the two recordings agree within a relative
1e-5 (plain) and 6.3e-5 (accumulated, with R1) over the five steps."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

CASES = {
    # one D step, one micro-batch: each logged loss is the one value computed in its phase
    "plain": ["train.batch_size=8", "method.d_steps=1"],
    # accumulation and repeated D steps, with R1 and BigGAN's orthogonal regularisation
    "accumulated": [
        "train.batch_size=8",
        "train.batch_per_rank=4",
        "method.d_steps=2",
        "method.r1_gamma=1.0",
        "method.ortho_reg=1e-4",
    ],
}
COMMON = [
    "train.max_steps=5",
    "train.log_every=1",
    "train.sample_every=100",
    "train.checkpoint_every=100",
    "eval.every=0",
]
LOGGED = ("loss_d", "loss_g", "d_real", "d_fake")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and raw bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_case(name: str, shards: Path, run_dir: Path) -> dict:
    from pipeline.spec import load_spec
    from pipeline.train import checkpoint, loop

    loop.train(load_spec("tiny_biggan", [f"data.shards={shards}", f"run.dir={run_dir}", *CASES[name], *COMMON]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = checkpoint.latest(run_dir)
    from safetensors.torch import load_file

    return {
        "losses": [{k: r[k] for k in LOGGED} for r in rows],
        "G": digest(checkpoint.network_weights(last, "generator")),
        "D": digest(checkpoint.network_weights(last, "discriminator")),
        "EMA": digest(load_file(checkpoint.ema_file(last, "generator"))),
    }


def machine() -> dict:
    """What the recorded digests hold on: torch, its CPU kernels and the CPU model (the same AVX512
    capability gave other digests on an AMD EPYC than where the fixture was first recorded)."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": model}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


if __name__ == "__main__":
    shards, out = Path(sys.argv[1]), Path(sys.argv[2])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = {"machine": machine(), "cases": {n: run_case(n, shards, Path(tmp) / n) for n in CASES}}
    out.write_text(json.dumps(record, indent=1) + "\n")
