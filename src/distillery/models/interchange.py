"""Interchange intervention training (IIT; Wu, Geiger et al. 2022, "Causal Distillation for
Language Models", arXiv 2112.02505).

A pair of inputs (base, source) is run through teacher and student; in each model, the states of
an aligned layer at chosen positions are swapped from the source run into the base run, and the
student's counterfactual output distribution is pulled towards the teacher's. The student thus
learns to carry, in its aligned layer, what the teacher's layer carries causally.

As everywhere in ``objectives``, ``iit_loss`` returns the **sum** over counted positions; the
engine divides by the count. It needs a live teacher module: counterfactual runs cannot be cached.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.models.interventions import capture_states, check_layer, interchange
from distillery.objectives.logits import forward_kl
from distillery.objectives.registry import get_objective

# (student_logits (N, V), teacher_logits (N, V), mask (N,)) -> sum over mask
Divergence = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_DIVERGENCE_SIGNALS = ("student_logits", "teacher_logits", "mask")


def pair_index(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row i of a batch, the row ``source[i] ≠ i`` it takes its source from.

    A random cyclic shift of a random permutation: every row is a source exactly once and no row
    is paired with itself.
    """
    if batch_size < 2:
        raise DistilleryError(
            f"interchange pairs need a batch of at least 2 rows, not {batch_size}"
        )
    draw_on = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(batch_size, generator=generator, device=draw_on)
    source = torch.empty_like(order)
    source[order] = order.roll(-1)
    return source


def pair_batch(
    input_ids: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base_ids, source_ids)``: the batch itself and its rows re-paired by ``pair_index``."""
    source = pair_index(input_ids.shape[0], generator).to(input_ids.device)
    return input_ids, input_ids[source]


def interchange_logits(
    model: nn.Module,
    base_ids: torch.Tensor,
    source_ids: torch.Tensor,
    layer: int,
    positions: torch.Tensor,
    *,
    source_grad: bool = True,
) -> torch.Tensor:
    """Logits of ``model`` on ``base_ids`` with ``layer``'s states at ``positions`` (bool
    ``(B, T)``) taken from its own run on ``source_ids``.

    ``source_grad=False`` runs the source under ``torch.no_grad`` (e.g. a frozen teacher); with
    ``True`` gradients also reach the model through the swapped-in states. The base run follows
    the caller's grad mode.
    """
    check_layer(model, layer)
    if base_ids.shape != source_ids.shape:
        raise DistilleryError(
            f"interchange base {tuple(base_ids.shape)} and source {tuple(source_ids.shape)} "
            "inputs must have the same shape"
        )
    grad_mode = nullcontext() if source_grad else torch.no_grad()
    with grad_mode, capture_states(model, [layer]) as states:
        model(input_ids=source_ids, use_cache=False)
    with interchange(model, layer, positions, states[layer]):
        return model(input_ids=base_ids, use_cache=False).logits


def _resolve(divergence: str | Divergence) -> Divergence:
    """A divergence callable, looking names up in the objective registry."""
    if not isinstance(divergence, str):
        return divergence
    objective = get_objective(divergence)
    if objective.signals != _DIVERGENCE_SIGNALS:
        raise DistilleryError(
            f"IIT needs a divergence between student and teacher logits; {divergence!r} reads "
            f"{', '.join(objective.signals)}"
        )
    return objective.fn


def iit_loss(
    student: nn.Module,
    teacher: nn.Module,
    base_ids: torch.Tensor,
    source_ids: torch.Tensor,
    alignment: tuple[int, int],
    positions: torch.Tensor,
    divergence: str | Divergence = forward_kl,
    *,
    mask: torch.Tensor | None = None,
    source_grad: bool = True,
    **divergence_params: float,
) -> torch.Tensor:
    """Sum over ``mask`` (default: every position) of ``divergence`` between the teacher's and
    the student's counterfactual outputs, for ``alignment = (student_layer, teacher_layer)``.

    ``divergence`` is a callable ``(student_logits (N, V), teacher_logits (N, V), mask (N,))``
    returning a sum, or the name of a registered logit objective (e.g. ``"forward_kl"``);
    ``divergence_params`` (e.g. ``temperature``) are passed on. The teacher runs under
    ``torch.no_grad``: gradients reach the student only. ``source_grad``: whether they also flow
    through the student's source run.
    """
    student_layer, teacher_layer = alignment
    fn = _resolve(divergence)
    with torch.no_grad():
        teacher_logits = interchange_logits(
            teacher, base_ids, source_ids, teacher_layer, positions, source_grad=False
        )
    student_logits = interchange_logits(
        student, base_ids, source_ids, student_layer, positions, source_grad=source_grad
    )
    if student_logits.shape != teacher_logits.shape:
        raise DistilleryError(
            f"IIT compares outputs of the same shape; student logits are "
            f"{tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if mask is None:
        mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        mask = mask.reshape(-1).to(device=s.device, dtype=torch.bool)
        if mask.shape[0] != s.shape[0]:
            raise DistilleryError(
                f"IIT mask has {mask.shape[0]} positions but the outputs have {s.shape[0]}"
            )
    return fn(s, t, mask, **divergence_params)
