"""What a run's schedule and numerics are made of: seeds, the learning-rate curve, a FLOPs
budget turned into steps, and autocast."""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch

from distillery.config import TrainConfig
from distillery.errors import DistilleryError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine down to ``min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
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
