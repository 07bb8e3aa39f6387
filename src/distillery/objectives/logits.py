"""Losses on output distributions.

Shapes: ``student_logits`` and ``teacher_logits`` are ``(N, V)`` (positions flattened),
``labels`` is ``(N,)`` int64 with ``-100`` for ignored positions, ``mask`` is ``(N,)`` bool.
Each function returns the **sum** over masked-in positions (a 0-dim float32 tensor); the caller
divides by the global count of valid positions. Computation is in float32 whatever the input
dtype, so bf16 logits do not lose the small probabilities that divergences depend on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillery.data.packed import IGNORE_INDEX as IGNORE_INDEX  # re-exported
from distillery.objectives.registry import Alpha, Beta, Temperature, register_objective


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


def _soft_logp(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax of ``logits / temperature`` (float32, masked rows zeroed first)."""
    return F.log_softmax(_counted(logits, mask) / temperature, dim=-1)  # (N, V)


def _kl_rows(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row ``(N,)``; tokens with p = 0 contribute 0·log 0 = 0 (not NaN)."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), 0.0).sum(-1)


@register_objective("forward_kl")
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) with both distributions softened at ``temperature``."""
    t = float(temperature)
    kl = _kl_rows(_soft_logp(teacher_logits, mask, t), _soft_logp(student_logits, mask, t))
    return _masked_sum(kl, mask) * (t * t)


@register_objective("reverse_kl")
def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """T² · KL(p_student ‖ p_teacher): mode-seeking, as in MiniLLM (forward KL, roles swapped)."""
    return forward_kl(teacher_logits, student_logits, mask, temperature=temperature)


@register_objective("jsd")
def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: Beta = 0.5,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """T² · generalized JSD(β) as in GKD (Agarwal et al. 2024).

    With M = β·p_teacher + (1−β)·p_student: β·KL(p_teacher ‖ M) + (1−β)·KL(p_student ‖ M).
    The end points are the limits GKD names: β=0 is forward KL, β=1 is reverse KL.
    """
    t, b = float(temperature), float(beta)
    if b == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature=t)
    if b == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature=t)
    student_logp = _soft_logp(student_logits, mask, t)
    teacher_logp = _soft_logp(teacher_logits, mask, t)
    mixture_logp = _mixture(teacher_logp, student_logp, b)  # (N, V)
    jsd = b * _kl_rows(teacher_logp, mixture_logp) + (1.0 - b) * _kl_rows(
        student_logp, mixture_logp
    )
    return _masked_sum(jsd, mask) * (t * t)


def _mixture(p_logp: torch.Tensor, q_logp: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1−w)·q) ``(N, V)``, taken in log space; 0 < w < 1."""
    return torch.logsumexp(torch.stack([p_logp + math.log(w), q_logp + math.log(1.0 - w)]), 0)


def _skewed_kl_rows(p_logp: torch.Tensor, q_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(p ‖ α·p + (1−α)·q) per row ``(N,)``."""
    if alpha == 0.0:
        return _kl_rows(p_logp, q_logp)
    return _kl_rows(p_logp, _mixture(p_logp, q_logp, alpha))


@register_objective("skew_kl")
def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: Alpha = 0.1,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """T² · skew KL (DistiLLM, Ko et al. 2024): KL(p_teacher ‖ α·p_teacher + (1−α)·p_student).

    α=0 is forward KL; the mixture keeps the student's side away from zero, so the loss and its
    gradient stay bounded (by −log α per position) where the student misses teacher mass.
    """
    t = float(temperature)
    teacher_logp = _soft_logp(teacher_logits, mask, t)
    student_logp = _soft_logp(student_logits, mask, t)
    return _masked_sum(_skewed_kl_rows(teacher_logp, student_logp, float(alpha)), mask) * (t * t)


@register_objective("skew_reverse_kl")
def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: Alpha = 0.1,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """T² · skew reverse KL (DistiLLM): KL(p_student ‖ α·p_student + (1−α)·p_teacher); α=0
    is reverse KL (skew KL, roles swapped)."""
    return skew_kl(teacher_logits, student_logits, mask, alpha=alpha, temperature=temperature)


@register_objective("tvd")
def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """T² · total variation distance ½·Σ|p_teacher − p_student| at ``temperature``."""
    t = float(temperature)
    student_p = _soft_logp(student_logits, mask, t).exp()
    teacher_p = _soft_logp(teacher_logits, mask, t).exp()
    tv = 0.5 * (teacher_p - student_p).abs().sum(-1)  # (N,)
    return _masked_sum(tv, mask) * (t * t)
