"""Everything that touches DeepSpeed: process setup and one engine per network.

Rules verified on this stack (shared/NOTES.md): gradient clipping is set explicitly (DeepSpeed
0.19 clips at 1.0 by default); each network has its own engine, optimizer and checkpoint
directory; one backward per micro-batch per engine; bf16 (as autocast) rather than fp16 with two engines.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

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


def setup(device: str | None = None, timeout_s: float = 1800) -> World:
    """Join (or, for a single process, create) the process group DeepSpeed's launcher describes
    in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A collective that waits longer
    than `timeout_s` for another rank raises (see `lost_peer`)."""
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
    timeout = datetime.timedelta(seconds=timeout_s)
    # Groups created later take torch's default timeout (30 min), not the world group's:
    # DeepSpeed reduces gradients in its own clone of the world group (utils/groups.py,
    # _clone_world_group), so a hung rank held the others there for half an hour. The run's
    # timeout becomes the default for every group this process creates.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout
    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        # A single process: a group of one on a free port, without RANK / MASTER_PORT in the
        # environment, which child processes would inherit.
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timeout
        )
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)  # wraps an existing group
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


class Engine:
    """The one seam to DeepSpeed: an engine (optimizer, ZeRO partitions, checkpoint directory)
    around one network, or several networks a method optimises with one loss (each with its own
    Adam settings as a param group). Nothing outside this module touches DeepSpeed's API.

    `module` is the raw module (a network, or a ModuleDict of them) for forwards: the engine's own
    forward adds output hooks that break torch.autograd.grad (R1) and run reductions inside
    another network's backward. `backward` scales by the accumulation steps and reduces;
    `step` steps at accumulation boundaries and returns the gradient norm there."""

    def __init__(self, name: str, modules: dict[str, torch.nn.Module], opts: dict, config: dict):
        import deepspeed
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        from pipeline.regions import timed

        self.name, self.networks = name, tuple(modules)
        self.zero_stage = config["zero_optimization"]["stage"]
        module = next(iter(modules.values())) if len(modules) == 1 else torch.nn.ModuleDict(modules)
        optimizer = _optimizer(name, {n: (modules[n], o) for n, o in opts.items()})
        if not isinstance(optimizer, torch.optim.Adam):  # DeepSpeed asks for this to wrap SGD in ZeRO
            config = {**config, "zero_allow_untested_optimizer": True}
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        if type(self._engine.checkpoint_engine) is not TorchCheckpointEngine:  # the one our config asks for
            raise RuntimeError(
                f"unexpected DeepSpeed checkpoint engine {type(self._engine.checkpoint_engine).__name__}"
            )
        self._engine.checkpoint_engine = _safe_checkpoint_engine()(config_params=self._engine._config)
        # DeepSpeed all-reduces gradients inside backward(): charged to the region `comm`
        self._engine.allreduce_gradients = timed("comm", self._engine.allreduce_gradients)
        self.module = module

    def scale_lr(self, scale: float) -> None:
        """Set every param group's learning rate to its spec value times `scale` (after a rollback)."""
        for group, base in zip(self._engine.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * scale

    def reset_optimizer(self) -> None:
        """Forget the optimizer's state (Adam's moments and step counts; SGD's momentum), keeping
        the weights and learning rates: the next step starts it afresh. ZeRO 1/2 wrap the torch
        optimizer that holds the state (of their fp32 partitions)."""
        optimizer = self._engine.optimizer
        getattr(optimizer, "optimizer", optimizer).state.clear()

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self) -> torch.Tensor | None:
        """Step (DeepSpeed steps only at accumulation boundaries); the L2 norm of the accumulated
        gradient at a boundary, None in between. Under ZeRO 1/2 gradients live in DeepSpeed's
        partitions rather than in .grad, and the norm is DeepSpeed's own global one."""
        boundary = self._engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.zero_stage == 0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._engine.step()
        if boundary and self.zero_stage > 0:
            value = self._engine.get_global_grad_norm()
            norm = None if value is None else torch.as_tensor(value, dtype=torch.float32)
        return norm

    def save(self, directory: Path) -> None:
        self._engine.save_checkpoint(str(directory), tag=TAG)

    def load(self, directory: Path, written_by: int) -> None:
        """Restore the engine from `directory`, saved by `written_by` ranks. ZeRO 0 keeps the
        optimizer state whole. ZeRO 1/2 partition it over the ranks, and on another number of
        ranks DeepSpeed 0.19 refuses to load it ("Automatic adjustment of ZeRO's optimizer state
        partitioning with a new world size is not currently supported"): then DeepSpeed loads the
        weights (and its fp32 partitions from them: the networks are fp32, so exactly) and Adam's
        state is partitioned anew here (`_repartitioned`)."""
        moved = self.zero_stage > 0 and written_by != torch.distributed.get_world_size()
        loaded, _ = self._engine.load_checkpoint(
            str(directory), tag=TAG, load_optimizer_states=not moved, load_lr_scheduler_states=False
        )
        if loaded is None:
            from pipeline.errors import user_error

            raise user_error(f"cannot load {directory}", hint="the checkpoint is incomplete; use an earlier one")
        if moved:
            self._engine.optimizer.optimizer.load_state_dict(self._repartitioned(directory, written_by))

    def _repartitioned(self, directory: Path, written_by: int) -> dict:
        """This rank's share of the optimizer state that `written_by` ranks saved under ZeRO 1/2, as
        the state dict of the optimizer ZeRO wraps (one flat parameter per param group). ZeRO
        flattens a group's parameters in order, pads the end to a multiple of the ranks and gives
        each rank an equal slice (deepspeed/runtime/zero/stage_1_and_2.py); so the saved slices,
        each cut to its length without padding (GROUP_PADDINGS, per rank) and joined in rank
        order, are the group's whole state, which is sliced again for this rank."""
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, GROUP_PADDINGS, OPTIMIZER_STATE_DICT

        zero = self._engine.optimizer
        saved = []
        for rank in range(written_by):
            file = self._engine._get_rank_zero_ckpt_name(str(directory), TAG, 0, rank, False)
            if not Path(file).is_file():
                from pipeline.errors import user_error

                raise user_error(f"{file} is missing", hint="the checkpoint is incomplete; use an earlier one")
            saved.append(self._engine.checkpoint_engine.load(file, map_location="cpu")[OPTIMIZER_STATE_DICT])
        rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
        state: dict[int, dict[str, Any]] = {}
        for group, mine in enumerate(zero.single_partition_of_fp32_groups):
            size, state[group] = mine.numel(), {}
            # a group without state (SGD without momentum keeps none) has nothing to share out
            for key, first in saved[0][BASE_OPTIMIZER_STATE]["state"].get(group, {}).items():
                if not (torch.is_tensor(first) and first.dim() > 0):  # Adam's step: the same on every rank
                    state[group][key] = first
                    continue
                slices = []
                for part in saved:
                    value = part[BASE_OPTIMIZER_STATE]["state"][group][key]
                    slices.append(value[: value.numel() - part[GROUP_PADDINGS][group]])
                whole = torch.cat(slices)
                if whole.numel() > ranks * size:
                    raise RuntimeError(
                        f"{directory}: param group {group} of {self.name} holds {whole.numel()} values of {key}, "
                        f"which {ranks} partitions of {size} do not fit"
                    )
                share = whole[rank * size : (rank + 1) * size]
                state[group][key] = torch.cat([share, share.new_zeros(size - share.numel())])
        return {"state": state, "param_groups": saved[0][BASE_OPTIMIZER_STATE]["param_groups"]}


TAG = "ckpt"  # the tag of every engine checkpoint, in the engine's own directory


def saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full module an engine saved into `directory` (ZeRO 0-2 keep it whole, from
    model-parallel rank 0), on the CPU, read without unpickling code."""
    from pipeline.errors import user_error
    from pipeline.safe_files import read_torch

    file = directory / TAG / "mp_rank_00_model_states.pt"
    if not file.is_file():
        raise user_error(f"{file} is missing", hint="the checkpoint is incomplete; use an earlier one")
    return cast(dict, read_torch(file, map_location="cpu"))["module"]  # DeepSpeed saves a dict


def _betas(opt) -> tuple[float, float]:
    beta1, beta2 = opt.betas
    return float(beta1), float(beta2)


def _optimizer(engine: str, networks: dict) -> torch.optim.Optimizer:
    """One optimizer over the networks of an engine, a param group each with its own settings
    (networks -> (module, OptimizerSpec)); the networks of one engine share an optimizer kind."""
    kinds = {(opt.kind, opt.fused) for _, opt in networks.values()}
    if len(kinds) > 1:
        from pipeline.errors import user_error

        raise user_error(
            f"the networks of engine {engine} ({', '.join(networks)}) are optimised together, so they need one "
            f"optimizer kind and fused setting, not {' and '.join(f'{k} (fused {f})' for k, f in sorted(kinds))}",
            hint="give them the same opt.kind and opt.fused",
        )
    (kind, fused), *_ = kinds
    if kind == "sgd":
        groups = [{"params": list(m.parameters()), "lr": o.lr, "momentum": o.momentum} for m, o in networks.values()]
        return torch.optim.SGD(groups)
    groups = [
        {"params": list(m.parameters()), "lr": o.lr, "betas": _betas(o), "eps": o.eps} for m, o in networks.values()
    ]
    return torch.optim.Adam(groups, fused=True) if fused else torch.optim.Adam(groups)


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


# what the collectives of gloo and NCCL say when another rank died or stopped answering
_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out", "NCCL")


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank of a multi-rank run is gone or
    hung (killed, crashed, its node lost, or past run.collective_timeout_s)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return False
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _LOST)
    )


def shut_down() -> None:
    """Leave the process group, if this process joined one: a process that exits with its gloo
    group alive was seen to abort in the group's destructor ("terminate called without an active
    exception", exit status 250) after its work was done."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def all_sum(values: torch.Tensor, device) -> torch.Tensor:
    """A small tensor summed over ranks (one collective, on `device`, which NCCL needs); returned on the CPU."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values.cpu()
    t = values.to(device, torch.float64)
    torch.distributed.all_reduce(t)
    return t.cpu()
