"""Losses between distributions over *different* vocabularies (a teacher with another tokenizer).

Shapes: ``student_logits`` ``(N, V_s)``, ``teacher_logits`` ``(N, V_t)`` with ``V_t`` ≠ ``V_s``
allowed, ``mask`` ``(N,)`` bool; ``teacher_mask`` ``(N,)`` bool (None: all) marks the positions
that have a teacher prediction at all (``teachers.cross_tokenizer``: the student positions whose
prefix ends where a teacher token ends). Each returns the **sum** over ``mask & teacher_mask``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from distillery.objectives.logits import _masked_sum, _soft_logp
from distillery.objectives.registry import Temperature, register_objective

Ranks = Annotated[int, Field(ge=1)]


def sorted_probabilities(logp: torch.Tensor, width: int, top_k: int | None) -> torch.Tensor:
    """``exp(logp)`` ``(N, V)`` sorted in decreasing order per row, the first ``top_k`` ranks
    (None: all), zero-padded on the right to ``width`` (or ``top_k``) columns."""
    probs = logp.exp()
    keep = probs.shape[-1] if top_k is None else min(top_k, probs.shape[-1])
    ranked = probs.topk(keep, dim=-1).values if top_k is not None else probs.sort(-1, True)[0]
    target = width if top_k is None else min(top_k, width)
    return F.pad(ranked, (0, target - keep))  # (N, target)


@register_objective("uld", cross_vocab=True)
def universal_logit_distance(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    teacher_mask: torch.Tensor | None = None,
    *,
    temperature: Temperature = 1.0,
    top_k: Ranks | None = None,
) -> torch.Tensor:
    """T² · ULD (Boizard et al. 2024): Σ_r |p_s(r) − p_t(r)|, the L1 distance between the
    student's and the teacher's probabilities sorted in decreasing order (rank r), the shorter
    vector padded with zeros to the larger vocabulary; both softened at ``temperature``.

    Needs no shared vocabulary (it compares the shapes of the distributions, not token by
    token). ``top_k``: only the first ``top_k`` ranks of each (a partial sort, for memory at a
    big vocabulary; the tail ranks are left out); None sorts the full vectors, as the paper.
    """
    t = float(temperature)
    keep = mask if teacher_mask is None else mask & teacher_mask
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    student_ranked = sorted_probabilities(_soft_logp(student_logits, keep, t), width, top_k)
    teacher_ranked = sorted_probabilities(_soft_logp(teacher_logits, keep, t), width, top_k)
    distance = (student_ranked - teacher_ranked).abs().sum(-1)  # (N,)
    return _masked_sum(distance, keep) * (t * t)
