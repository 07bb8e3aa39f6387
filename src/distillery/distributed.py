"""torch.distributed set-up for data-parallel runs launched with ``torchrun``."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str, timeout_seconds: float | None = None) -> DistEnv:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU);
    collectives give up after ``timeout_seconds`` (torch's default when None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        kwargs = {}
        if timeout_seconds is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_seconds)
        dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group (after a barrier when ``clean``; it avoids gloo aborts at exit).

    After a failure the barrier is skipped: the other ranks may never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of ``value`` over all ranks (``value`` itself when running alone)."""
    if env.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def resolve_device(choice: str, env: DistEnv | None = None) -> torch.device:
    """``auto`` → this rank's GPU when there is one, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            from distillery.errors import DistilleryError

            raise DistilleryError("train.device=cuda but no GPU is visible; use device=auto or cpu")
        return torch.device("cuda", env.local_rank if env else 0)
    return torch.device("cpu")


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a lone process, read from torchrun's ``RANK`` (also before
    or after a process group exists, unlike ``DistEnv.is_main``)."""
    return int(os.environ.get("RANK", "0")) == 0
