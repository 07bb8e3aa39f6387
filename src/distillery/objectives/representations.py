"""Losses on internal representations: hidden states, embeddings and attention maps.

Which layers are compared is a *layer map*: pairs ``(student_layer, teacher_layer)`` where layer
0 is the embedding output and layer i the output of block i (HF ``output_hidden_states``
numbering; for attention maps, i is block i and 0 is not allowed). As in HF, the last entry
(i = L) is taken after the model's final norm, the others are the raw residual stream: map last
layers to last layers (``uniform`` and ``last`` do) or use ``hidden_cosine``, which ignores scale.
The distillation step (``step``) gathers the mapped tensors, projects the student's hidden states
to the teacher's width when they differ, and hands the losses below plain stacked tensors:

- ``student_states`` / ``teacher_states``: ``(L, N, D)``, L mapped layers, N flattened positions;
- ``student_attentions`` / ``teacher_attentions``: ``(L, N, A, T)``, the attention rows of
  query position n over T key positions for A (matched) heads.

Each returns the **sum over positions in** ``mask`` of a per-position value that is averaged
over mapped layers (and heads), so a term's weight means the same whatever the map's size.
Computation is in float32; masked positions are zeroed first and get exactly zero gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from distillery.errors import DistilleryError
from distillery.objectives.logits import _masked_sum
from distillery.objectives.registry import register_objective

LayerSpec = Literal["uniform", "last", "embeddings"] | list[tuple[int, int]]
HeadPolicy = Literal["auto", "average", "map"]


def _counted(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 ``(L, N, ...)`` with positions outside ``mask`` ``(N,)`` set to zero."""
    keep = mask.reshape(1, -1, *([1] * (x.ndim - 2)))
    return torch.where(keep, x.float(), 0.0)


@register_objective("hidden_cosine")
def hidden_cosine(
    student_states: torch.Tensor, teacher_states: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 − cos(student, teacher) per position and mapped layer (DistilBERT's L_cos)."""
    s, t = _counted(student_states, mask), _counted(teacher_states, mask)
    per_position = (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean(0)  # (N,)
    return _masked_sum(per_position, mask)


@register_objective("hidden_mse")
def hidden_mse(
    student_states: torch.Tensor, teacher_states: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error over features per position and mapped layer (TinyBERT's L_hidn)."""
    s, t = _counted(student_states, mask), _counted(teacher_states, mask)
    per_position = (s - t).pow(2).mean(-1).mean(0)  # (N,)
    return _masked_sum(per_position, mask)


@register_objective("attention_kl")
def attention_kl(
    student_attentions: torch.Tensor, teacher_attentions: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """KL(teacher row ‖ student row) of attention distributions, per query position, averaged
    over mapped layers and heads. Keys the teacher gives zero weight (causal) contribute 0."""
    s, t = _counted(student_attentions, mask), _counted(teacher_attentions, mask)
    tiny = torch.finfo(torch.float32).tiny
    kl = torch.where(t > 0, t * (t.clamp_min(tiny).log() - s.clamp_min(tiny).log()), 0.0)
    per_position = kl.sum(-1).mean(dim=(0, 2))  # (L, N, A, T) -> (N,)
    return _masked_sum(per_position, mask)


def layer_pairs(
    spec: LayerSpec, n_student: int, n_teacher: int, *, attention: bool = False
) -> list[tuple[int, int]]:
    """The ``(student, teacher)`` layer pairs a spec names, checked against both depths.

    ``uniform``: student block i ↔ teacher block ⌊i·L_t/L_s + ½⌋ (at least 1), i = 1..L_s (the
    last blocks meet); ``last``: the last blocks only; ``embeddings``: the embedding outputs
    (hidden states only); a list of pairs: exactly those.
    """
    if spec == "uniform":
        half_up = [(i * n_teacher + n_student // 2) // n_student for i in range(1, n_student + 1)]
        pairs = [(i, max(1, j)) for i, j in enumerate(half_up, start=1)]
    elif spec == "last":
        pairs = [(n_student, n_teacher)]
    elif spec == "embeddings":
        pairs = [(0, 0)]
    else:
        pairs = [(int(s), int(t)) for s, t in spec]
    low = 1 if attention else 0
    for s, t in pairs:
        if not (low <= s <= n_student and low <= t <= n_teacher):
            what = "attention maps exist for blocks 1..L" if attention else "0 is the embeddings"
            raise DistilleryError(
                f"layer pair [{s}, {t}] is out of range: the student has {n_student} layers, the "
                f"teacher {n_teacher} ({what})"
            )
    if not pairs:
        raise DistilleryError("layers: give at least one [student, teacher] pair")
    return pairs


def check_heads(n_student: int, n_teacher: int, policy: HeadPolicy) -> None:
    """Refuse ``heads: map`` when the teacher's head count is not a multiple of the student's."""
    if policy == "map" and n_teacher % n_student:
        raise DistilleryError(
            f"attention heads: the teacher's {n_teacher} heads cannot be mapped onto the "
            f"student's {n_student} (not a multiple); use heads: average"
        )


def match_heads(
    student: torch.Tensor, teacher: torch.Tensor, policy: HeadPolicy
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention maps ``(B, A_s, T, T)`` and ``(B, A_t, T, T)`` with the same number of heads.

    ``average``: both averaged over heads (one map each); ``map``: teacher heads averaged in
    A_t/A_s consecutive groups, one group per student head (needs A_t divisible by A_s);
    ``auto``: one to one when the counts are equal, else ``map`` if it divides, else ``average``.
    Averages of attention distributions are attention distributions.
    """
    a_s, a_t = student.shape[1], teacher.shape[1]
    if policy == "auto":
        policy = "map" if a_t % a_s == 0 else "average"
    if policy == "average":
        return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    check_heads(a_s, a_t, policy)
    b, _, q, k = teacher.shape
    return student, teacher.reshape(b, a_s, a_t // a_s, q, k).mean(2)
