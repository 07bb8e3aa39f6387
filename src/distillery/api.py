"""The lab's distillation loss for your own training loop.

    objectives = [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2}]
    distiller = Distiller(student, teacher, objectives)
    out = distiller(batch["input_ids"], batch["labels"], batch["attention_mask"])
    out.loss.backward()  # out.terms: each term's mean, for logging

The same contract as the engine (the loss contract in the README): every objective is summed over
the positions that count and divided once, by ``num_items`` when given (the labelled positions of
the whole accumulated or multi-process batch, as ``transformers.Trainer`` counts them), else by
this batch's; soft terms carry T²; ``chunk_size`` > 0 takes the chunked big-vocabulary path.
Labels follow the Hugging Face convention (``labels`` aligned with ``input_ids``, -100 ignored,
shifted here), for causal language models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.models.heads import check_plain_head
from distillery.objectives.logits import IGNORE_INDEX
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import EnsembleTeacher, LiveTeacher, TeacherSignal

DEFAULT_OBJECTIVES = ({"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0})


@dataclass
class DistillOutput:
    """``loss``: the weighted sum divided by ``count`` (differentiable); ``terms``: each term's
    unweighted sum over the same ``count`` (detached); ``count``: the positions divided by."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    count: torch.Tensor


def next_token_labels(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hugging Face labels (aligned with ``input_ids``; default: the inputs) → the lab's labels
    ``(B, T)``: position t predicts token t+1; the last position, -100 labels and padding are
    ignored. Left padding is refused (the step runs the models without an attention mask)."""
    if labels is None:
        labels = input_ids
    if labels.shape != input_ids.shape:
        raise DistilleryError(f"labels {tuple(labels.shape)} ≠ input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None:
        keep = attention_mask.bool()
        if (keep[:, 1:] & ~keep[:, :-1]).any():
            raise DistilleryError("left padding is not supported: pad batches on the right")
        labels = torch.where(keep, labels, IGNORE_INDEX)
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def _signal(teacher: Any, vocab: int | None) -> TeacherSignal | None:
    """A model, several models (an ensemble: the mean of their probabilities) or any teacher
    signal of ``distillery.teachers``."""
    if teacher is None or hasattr(teacher, "run"):
        return teacher
    if isinstance(teacher, nn.Module):
        return LiveTeacher(teacher)  # type: ignore[arg-type]
    members = [LiveTeacher(t) for t in teacher]
    if vocab is None:
        vocab = members[0].head.weight.shape[0]
    return EnsembleTeacher(members, vocab=vocab)


class Distiller:
    """``student`` taught by ``teacher`` through ``objectives`` (config entries, e.g.
    ``{"kind": "hidden_mse", "layers": "uniform"}``; default CE + forward KL at T=2, or CE alone
    without a teacher). ``vocab``: cut both models' logits to the tokenizer's tokens (padded
    embedding tables); ``chunk_size``: positions per chunk of logits (0: all at once), with
    ``matmul_dtype`` (e.g. ``torch.bfloat16``) for its matmuls and ``compile_loss`` to fuse its
    passes with ``torch.compile``. Learned
    projections of representation terms are in ``parameters()``: add them to your optimizer."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | TeacherSignal | None = None,
        objectives: Sequence[Any] | None = None,
        *,
        vocab: int | None = None,
        chunk_size: int = 0,
        matmul_dtype: torch.dtype | None = None,
        compile_loss: bool = False,
    ) -> None:
        if objectives is None:
            objectives = DEFAULT_OBJECTIVES if teacher is not None else DEFAULT_OBJECTIVES[:1]
        if chunk_size:
            check_plain_head(student, "student")
        self.student = student
        self.step = DistillStep(
            terms_from_config(list(objectives)),
            _signal(teacher, vocab),
            student=student,
            vocab=vocab,
            chunk_size=chunk_size,
            matmul_dtype=matmul_dtype,
            compile_loss=compile_loss,
        )
        device = next(student.parameters()).device
        self.step.modules.to(device)

    @property
    def teacher(self) -> TeacherSignal | None:
        return self.step.teacher

    def parameters(self) -> list[nn.Parameter]:
        """What the objectives train besides the student (learned projections)."""
        return self.step.parameters()

    def __call__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        model: nn.Module | None = None,
        num_items: int | torch.Tensor | None = None,
    ) -> DistillOutput:
        """The loss on one batch. ``model``: the student as your loop runs it (e.g. wrapped in
        DDP; default ``self.student``); ``num_items``: the global count to divide by."""
        targets = next_token_labels(input_ids, labels, attention_mask)
        total, sums = self.step(model or self.student, input_ids, targets)
        count = torch.as_tensor(
            num_items if num_items is not None else (targets != IGNORE_INDEX).sum(),
            device=total.device,
        ).clamp_min(1)
        terms = {name: value.detach() / count for name, value in sums.items()}
        return DistillOutput(total / count, terms, count)
