"""Distillation objectives: small pure loss functions in one registry.

Every objective returns a **sum** over the positions that count (``mask``); the engine divides
once by the global number of valid positions, so micro-batches, chunks and ranks add up exactly.
"""

from distillery.objectives.logits import cross_entropy, forward_kl, hard_labels
from distillery.objectives.registry import (
    OBJECTIVES,
    ObjectiveFn,
    get_objective,
    register_objective,
)

__all__ = [
    "OBJECTIVES",
    "ObjectiveFn",
    "cross_entropy",
    "forward_kl",
    "get_objective",
    "hard_labels",
    "register_objective",
]
