"""Losses on output distributions.

Shapes: ``student_logits`` and ``teacher_logits`` are ``(N, V)`` (positions flattened),
``labels`` is ``(N,)`` int64 with ``-100`` for ignored positions, ``mask`` is ``(N,)`` bool.
Each function returns the **sum** over masked-in positions (a 0-dim float32 tensor); the caller
divides by the global count of valid positions. Computation is in float32 whatever the input
dtype, so bf16 logits do not lose the small probabilities that divergences depend on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillery.objectives.registry import register_objective

IGNORE_INDEX = -100


def _counted(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 logits with masked-out rows zeroed, so padding (even NaN/inf) gets no gradient."""
    return torch.where(mask[:, None], logits.float(), 0.0)


def _masked_sum(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``per_position`` over ``mask``."""
    return torch.where(mask, per_position, 0.0).sum()


@register_objective("ce")
def cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Task loss: −log p_student(label), summed over ``mask``."""
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    nll = F.cross_entropy(_counted(student_logits, mask), safe_labels, reduction="none")  # (N,)
    return _masked_sum(nll, mask)


@register_objective("hard_labels")
def hard_labels(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy towards the teacher's top-1 token (its "hard label"), summed over ``mask``."""
    teacher_top1 = _counted(teacher_logits, mask).argmax(dim=-1)  # (N,)
    nll = F.cross_entropy(_counted(student_logits, mask), teacher_top1, reduction="none")
    return _masked_sum(nll, mask)


@register_objective("forward_kl")
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) with both distributions softened at ``temperature``."""
    t = float(temperature)
    student_logp = F.log_softmax(_counted(student_logits, mask) / t, dim=-1)  # (N, V)
    teacher_logp = F.log_softmax(_counted(teacher_logits, mask) / t, dim=-1)  # (N, V)
    teacher_p = teacher_logp.exp()
    # Tokens the teacher gives probability 0 contribute 0·log 0 = 0 (not NaN).
    kl = torch.where(teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0).sum(-1)
    return _masked_sum(kl, mask) * (t * t)
