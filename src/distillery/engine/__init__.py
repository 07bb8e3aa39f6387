"""The one training loop (``Engine``), its checkpoints and its schedule."""

from distillery.engine.checkpoints import checkpoint_step, list_checkpoints
from distillery.engine.loop import Engine, Progress, TrainStep
from distillery.engine.schedule import (
    autocast_context,
    lr_factor,
    seed_everything,
    steps_for_budget,
)

__all__ = [
    "Engine",
    "Progress",
    "TrainStep",
    "autocast_context",
    "checkpoint_step",
    "list_checkpoints",
    "lr_factor",
    "seed_everything",
    "steps_for_budget",
]
