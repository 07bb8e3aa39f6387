"""What a run's schedule and numerics are made of: seeds, the learning-rate curve, a FLOPs
budget turned into steps, and autocast."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np
import torch

from distillery.config import TrainConfig
from distillery.errors import DistilleryError, Diverged


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine down to ``min_lr_ratio``
    (over the whole schedule whose ``cfg.schedule_slice`` this run is, when set)."""
    total, at = float(cfg.steps), float(step)
    if cfg.schedule_slice is not None:  # the whole schedule, in this run's steps
        start, end = cfg.schedule_slice
        total = cfg.steps / (end - start)
        at += start * total
    warmup = min(cfg.warmup_steps, total)
    if at < warmup:
        return (at + 1) / warmup
    span = max(1.0, total - warmup)
    progress = min(1.0, (at - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_for_budget(cfg: TrainConfig, flops_per_step: float) -> TrainConfig:
    """``cfg`` with ``steps`` set to the whole steps ``cfg.flops_budget`` pays for (unchanged
    without a budget); a budget smaller than one step is refused."""
    if cfg.flops_budget is None:
        return cfg
    steps = int(cfg.flops_budget // flops_per_step)
    if steps < 1:
        raise DistilleryError(
            f"train.flops_budget={cfg.flops_budget:.3g} is less than one step "
            f"({flops_per_step:.3g} FLOPs); raise it"
        )
    return cfg.model_copy(update={"steps": steps})


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (``auto``: on GPU only), else nothing."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: Any
) -> dict[str, tuple[Any, Any]]:
    """After a resume: make the optimizer follow ``cfg`` (lr, weight decay, betas) rather than
    the checkpoint's values, so a run resumed with a lower lr really runs with it; returns what
    changed, ``{field: (checkpoint's, now)}``. The schedule's shape (warmup, decay) already reads
    ``cfg``. Unchanged settings leave every number as it was (exact resume)."""
    changed: dict[str, tuple[Any, Any]] = {}
    old_lr = scheduler.base_lrs[0]
    if old_lr != cfg.lr:
        changed["train.lr"] = (old_lr, cfg.lr)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    factor = lr_factor(scheduler.last_epoch, cfg)
    decay_group = optimizer.param_groups[0]  # the engine puts decayed parameters first
    if decay_group["weight_decay"] != cfg.weight_decay:
        changed["train.weight_decay"] = (decay_group["weight_decay"], cfg.weight_decay)
        decay_group["weight_decay"] = cfg.weight_decay
    for group in optimizer.param_groups:
        if tuple(group["betas"]) != tuple(cfg.betas):
            changed["train.betas"] = (tuple(group["betas"]), tuple(cfg.betas))
            group["betas"] = tuple(cfg.betas)
        group["lr"] = cfg.lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # type: ignore[attr-defined]
    return changed


def check_finite(step: int, loss: float, grad_norm: float | None, lr: float) -> None:
    """Stop before an update that would break the weights: the loss or the gradients are not
    finite. Nothing was updated, so the last checkpoint and the weights stay good."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    what = "loss" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
    raise Diverged(
        f"the {what} is not finite at step {step + 1} (diverged, at lr {lr:.3g}); the weights "
        "were not updated and the last checkpoint is intact: lower train.lr or raise "
        "train.warmup_steps (or set a lower train.grad_clip), then --resume (the new settings "
        "take effect)"
    )
