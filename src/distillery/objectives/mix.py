"""A weighted sum of named objectives, computed on one micro-batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.objectives.chunked import chunked_loss, head_inputs
from distillery.objectives.logits import IGNORE_INDEX
from distillery.objectives.registry import Objective, get_objective
from distillery.teachers import TeacherSignal


@dataclass
class Term:
    """One entry of the mix: a registered objective, its weight and its parameters."""

    name: str
    objective: Objective
    weight: float
    params: dict[str, Any] = field(default_factory=dict)


def terms_from_config(objectives: Sequence[Any]) -> list[Term]:
    """Terms from config entries (``kind``, ``weight`` and the objective's own parameters)."""
    terms: list[Term] = []
    seen: dict[str, int] = {}
    for entry in objectives:
        spec = entry.model_dump() if hasattr(entry, "model_dump") else dict(entry)
        kind, weight = spec.pop("kind"), float(spec.pop("weight", 1.0))
        objective = get_objective(kind)
        unknown = set(spec) - set(objective.params)
        if unknown:
            raise DistilleryError(f"objective {kind!r} has no parameter(s) {sorted(unknown)}")
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
        terms.append(Term(name, objective, weight, spec))
    return terms


def shift_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token labels ``(B, T)``: position t predicts token t+1; last and padding are -100."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        labels[:, :-1] = torch.where(keep, labels[:, :-1], IGNORE_INDEX)
    return labels


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class LossMix:
    """``Σ weight_i · objective_i`` as per-position **sums**; the engine divides by the count.

    ``vocab`` cuts logits to the tokenizer's real tokens (embedding tables are often padded, and
    teacher and student may be padded differently). ``chunk_size`` > 0 computes the logits a
    chunk of positions at a time (see ``objectives.chunked``) instead of all at once.
    """

    def __init__(
        self,
        terms: list[Term],
        teacher: TeacherSignal | None = None,
        *,
        vocab: int | None = None,
        chunk_size: int = 0,
    ) -> None:
        if not terms:
            raise DistilleryError("objectives: give at least one")
        self.terms = terms
        self.teacher = teacher
        self.vocab = vocab
        self.chunk_size = chunk_size
        self.needs_teacher = any(t.objective.needs_teacher for t in terms)
        if self.needs_teacher and teacher is None:
            needing = [t.name for t in terms if t.objective.needs_teacher]
            raise DistilleryError(f"objectives {needing} need a teacher (--teacher DIR)")

    def teacher_flops_per_token(self) -> float:
        """FLOPs of the teacher's forward pass per token (0 without a teacher)."""
        return 2.0 * self.teacher.compute_params if self.needs_teacher and self.teacher else 0.0

    def _weights(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([t.weight for t in self.terms], device=device)

    def term_sums(self, signals: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Every term's unweighted sum on one set of signals, stacked ``(K,)``."""
        return torch.stack([t.objective(signals, **t.params) for t in self.terms])

    def __call__(
        self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term name: unweighted sum}) for one micro-batch."""
        flat_labels = labels.reshape(-1)  # (N,)
        mask = flat_labels != IGNORE_INDEX  # (N,)
        if self.chunk_size:
            raw = unwrap(model)
            with head_inputs(raw) as captured:
                model(input_ids=input_ids)  # through DDP, so gradients are synchronised
            student_hidden = captured["hidden"]
            teacher_hidden = teacher_head = None
            if self.needs_teacher:
                assert self.teacher is not None
                teacher_hidden = self.teacher.hidden(input_ids).reshape(mask.shape[0], -1)
                teacher_head = self.teacher.head
            total, sums = chunked_loss(
                self.term_sums,
                self._weights(student_hidden.device),
                student_hidden.reshape(mask.shape[0], -1),  # (N, H)
                raw.get_output_embeddings(),  # type: ignore[operator]
                flat_labels,
                mask,
                chunk_size=self.chunk_size,
                teacher_hidden=teacher_hidden,
                teacher_head=teacher_head,
                vocab=self.vocab,
            )
            return total, {t.name: sums[i] for i, t in enumerate(self.terms)}
        else:
            student_logits = model(input_ids=input_ids).logits[..., : self.vocab]  # (B, T, V)
            vocab = student_logits.shape[-1]
            signals: dict[str, torch.Tensor | None] = {
                "student_logits": student_logits.reshape(-1, vocab),  # (N, V)
                "labels": flat_labels,
                "mask": mask,
                "teacher_logits": None,
            }
            if self.needs_teacher:
                assert self.teacher is not None
                teacher_logits = self.teacher.logits(input_ids)[..., : self.vocab]  # (B, T, V)
                if teacher_logits.shape[-1] != vocab:
                    raise DistilleryError(
                        f"teacher has {teacher_logits.shape[-1]} output tokens, student {vocab}: "
                        "they must share a tokenizer (set the vocabulary both use)"
                    )
                signals["teacher_logits"] = teacher_logits.reshape(-1, vocab)
            sums = self.term_sums(signals)
        total = (self._weights(sums.device) * sums).sum()
        return total, {t.name: sums[i] for i, t in enumerate(self.terms)}
