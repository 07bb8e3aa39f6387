"""Distillation objectives: small pure loss functions in one registry.

Every objective returns a **sum** over the positions that count (``mask``); the engine divides
once by the global number of valid positions, so micro-batches, chunks and ranks add up exactly.
"""

from distillery.objectives.cross_vocab import universal_logit_distance
from distillery.objectives.logits import (
    cross_entropy,
    forward_kl,
    generalized_jsd,
    hard_labels,
    reverse_kl,
    total_variation,
)
from distillery.objectives.registry import (
    OBJECTIVES,
    ObjectiveFn,
    get_objective,
    register_objective,
)
from distillery.objectives.representations import attention_kl, hidden_cosine, hidden_mse

__all__ = [
    "OBJECTIVES",
    "ObjectiveFn",
    "attention_kl",
    "cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "get_objective",
    "hard_labels",
    "hidden_cosine",
    "hidden_mse",
    "register_objective",
    "reverse_kl",
    "total_variation",
    "universal_logit_distance",
]
