"""Sharding plans (FSDP2, ``torch.distributed.fsdp.fully_shard``) for ``train.parallel: fsdp``.

Under ``torchrun`` each process holds a 1/world slice of every parameter: each transformer
block is one unit (all-gathered for its forward and backward, then freed), the root (embeddings,
final norm, output head) another. Gradients are reduce-scattered as means over processes, as
DDP all-reduces them, so the engine's loss scaling is the same for both. A frozen teacher gets
the same plan without gradients. Full (unsharded) state dicts are gathered to rank 0 for
checkpoints and export, and loaded back by every rank, each keeping its own slice.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from distillery.models.surgery import decoder_layers

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def device_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over every process of the job, on ``device``'s kind (gloo CPU or NCCL GPU)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_plan(model: nn.Module) -> list[str]:
    """The module paths sharded, in the order ``fully_shard`` is applied: each transformer
    block, then the root (``""``), which takes every parameter left."""
    path, _ = decoder_layers(model)
    blocks = [name for name, _ in model.named_modules() if name.rpartition(".")[0] == path]
    return [*blocks, ""]


def shard_model(model: nn.Module, mesh: DeviceMesh, *, frozen: bool = False) -> nn.Module:
    """Shard ``model`` in place by ``shard_plan`` onto ``mesh`` (its slices move to the mesh's
    device) and return it. ``frozen``: a teacher for inference (eval mode, no gradients); its
    root keeps its gathered weights after the first forward, so the output head can also be
    called on its own (chunked logits)."""
    if frozen:
        model.eval().requires_grad_(False)
    modules = dict(model.named_modules())
    for name in shard_plan(model):
        # The student's root stays gathered from forward to backward (torch's default for a
        # root); a block is freed after its forward and gathered again for its backward.
        reshard = None if name == "" else True
        if frozen and name == "":
            reshard = False
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=reshard)
    return model


def sharded_copy(model: nn.Module, device: torch.device, *, frozen: bool = False) -> nn.Module:
    """A sharded deep copy of ``model`` on ``device``; ``model`` itself is left whole."""
    return shard_model(copy.deepcopy(model), device_mesh(device), frozen=frozen)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with ``fully_shard``."""
    return isinstance(model, FSDPModule)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, on the CPU of rank 0 (``{}`` on other ranks).
    A collective: every rank must call it."""
    return get_model_state_dict(model, options=FULL)


def gather_into(
    target: nn.Module, sharded: nn.Module, *, device: torch.device | None = None
) -> None:
    """Copy the whole weights of ``sharded`` into the plain ``target`` on rank 0 (then moved to
    ``device`` if given); other ranks' ``target`` is left as it was. A collective."""
    state = full_state(sharded)
    if dist.get_rank() == 0:
        target.load_state_dict(state)
        if device is not None:
            target.to(device)


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (every rank holds it) into a sharded model: each rank keeps its
    slice."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(modules: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter names of ``modules`` (sharded model and
    unsharded extras under one container), on the CPU of rank 0; a collective."""
    return get_optimizer_state_dict(modules, optimizer, options=FULL)


def load_full_optimizer_state(
    modules: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what ``full_optimizer_state`` gathered (every rank holds it) back into slices."""
    set_optimizer_state_dict(
        modules, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def clip_grad_norm(groups: Iterable[Iterable[nn.Parameter]], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded (DTensor) and plain parameters together: the 2-norm of
    all gradients (each group's norm made whole across ranks), every gradient scaled by
    ``min(1, max_norm / (norm + 1e-6))``, as torch does. Returns the norm before clipping."""
    grads = [[p.grad for p in group if p.grad is not None] for group in groups]
    squares = 0.0
    for group in grads:
        if group:
            norm = torch.nn.utils.get_total_norm(group, 2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            squares += float(norm) ** 2
    total = math.sqrt(squares)
    coef = min(1.0, max_norm / (total + 1e-6))
    for group in grads:
        for grad in group:
            grad.mul_(coef)
    return total
