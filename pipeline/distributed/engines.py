"""Everything that touches DeepSpeed: process setup and one engine per network.

Rules verified on this stack (shared/NOTES.md): gradient clipping is set explicitly (DeepSpeed
0.19 clips at 1.0 by default); each network has its own engine, optimizer and checkpoint
directory; one backward per micro-batch per engine; bf16 (as autocast) rather than fp16 with two engines.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: str | None = None) -> World:
    """Join (or, for a single process, create) the process group DeepSpeed's launcher describes
    in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT."""
    gpu = torch.cuda.is_available() and device != "cpu"
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not gpu:
        # DeepSpeed's CPU backend JIT-builds a shared-memory op with the C++ compiler (about a
        # minute on 2 cores, and a traceback without a compiler) for its inference all-reduce,
        # which training never calls: gradients and cross-replica BN reduce through gloo. Marked
        # incompatible, the op is skipped (deepspeed/comm/torch.py, build_shm_op).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    backend = "nccl" if gpu else "gloo"
    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        # A single process: a group of one on a free port, without RANK / MASTER_PORT in the
        # environment, which child processes would inherit.
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # wraps an existing group
    local = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local)
    return World(
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        local,
        torch.device("cuda", local) if gpu else torch.device("cpu"),
    )


def engine_config(train, micro_batch: int, accumulation: int, world_size: int) -> dict:
    return {
        "train_batch_size": micro_batch * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 0.0,  # explicit: DeepSpeed >= 0.19 would clip at 1.0
        "zero_optimization": {"stage": train.zero_stage},
        # bf16 is torch.autocast, not DeepSpeed's bf16 mode: that one casts parameters but not
        # buffers, which breaks BatchNorm (bf16 weight, fp32 running stats) and spectral norm. The
        # engine's forward switches an outer autocast off unless its own torch_autocast is on.
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": train.precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_engine(module: torch.nn.Module, opt, config: dict):
    """A DeepSpeed engine around `module` with Adam (lr, betas, eps from the spec), whose
    checkpoints are read back without unpickling code (`_SafeCheckpointEngine`)."""
    import deepspeed
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    optimizer = torch.optim.Adam(module.parameters(), lr=opt.lr, betas=tuple(float(b) for b in opt.betas), eps=opt.eps)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:  # the one our config asks for
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = _safe_checkpoint_engine()(config_params=engine._config)
    return engine


@functools.cache
def _safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, reading with weights_only=True: its own `load` calls
    torch.load(weights_only=False), which runs whatever a tampered file's pickle says. Every
    engine state DeepSpeed reads (model, optimizer, ZeRO partitions) goes through `load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipeline.safe_files import read_torch

    # the classes DeepSpeed 0.19 pickles into ZeRO 1/2 optimizer states (besides tensors, numbers
    # and containers); each is rebuilt from plain values, never by calling code from the file
    stored = (ZeroStageEnum, LossScaler, fragment_address)

    class _SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return read_torch(path, map_location=map_location, allowed=stored)

    return _SafeCheckpointEngine


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_mean(values: dict[str, float], device) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(values, (t / torch.distributed.get_world_size()).tolist(), strict=True))
