"""On-policy distillation (GKD, Agarwal et al. 2024): completions the student writes itself.

``OnPolicyStep`` wraps a ``DistillStep``. Before each global batch (``start_step``) it decides,
with probability λ drawn from a generator seeded by (seed, step) — the same on every rank and
after a resume — whether this batch is on-policy. If it is, every row's prompt (the tokens
before its first labelled position) is completed by the current student (no gradient, eval
mode, then back to train mode) with a generator seeded by (seed, step, row of the global
batch), and the row becomes ``prompt + sample``, right-padded, labelled on the sample only.
The teacher then scores those rows inside the wrapped step, and its divergences count the
sampled tokens only. Otherwise the rows are the data's own (supervised KD; λ = 0 is exactly
the wrapped step).

The engine asks a step for every micro-batch's ``counts`` before the first backward and then
calls it on the same micro-batches in the same order: the samples are drawn in ``counts`` (so
the loss is divided by the sampled rows' labelled positions) and used by ``__call__``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from distillery.distributed import DistEnv
from distillery.errors import DistilleryError
from distillery.models.generation import Sampling, row_generator, sample
from distillery.objectives.logits import IGNORE_INDEX
from distillery.step.step import DistillStep
from distillery.step.terms import Term
from distillery.teachers import TeacherSignal


def prompt_lengths(labels: torch.Tensor) -> list[int]:
    """Per row ``(B, T)`` labels: the prompt's length (first labelled position + 1), or 0 for a
    row with no label (left as it is)."""
    labelled = labels != IGNORE_INDEX  # (B, T)
    first = labelled.int().argmax(dim=1)
    return [int(f) + 1 if any_ else 0 for f, any_ in zip(first, labelled.any(1), strict=True)]


def completion_rows(
    prompts: list[list[int]], samples: list[list[int]], seq_len: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) ``(B, seq_len)``: prompt + sample right-padded, labels on the sample."""
    ids = torch.full((len(prompts), seq_len), pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (prompt, new) in enumerate(zip(prompts, samples, strict=True)):
        row = torch.tensor([*prompt, *new][:seq_len], dtype=torch.long)
        ids[i, : row.numel()] = row
        p = len(prompt)
        labels[i, p - 1 : row.numel() - 1] = row[p:]  # position t predicts token t+1
    return ids, labels


class OnPolicyStep:
    """A ``DistillStep`` whose completions are, on a λ share of the batches, the student's."""

    def __init__(
        self,
        inner: DistillStep,
        student: nn.Module,
        sampling: Sampling,
        fraction: float,
        *,
        seed: int,
        batch_size: int,
        pad_token_id: int,
        stop_ids: list[int],
        env: DistEnv | None = None,
    ) -> None:
        env = env or DistEnv()
        self.inner, self.student, self.sampling, self.fraction = inner, student, sampling, fraction
        self.seed, self.pad_token_id, self.stop_ids = seed, pad_token_id, stop_ids
        self.first_row = env.rank * (batch_size // env.world_size)  # this rank's global rows
        self.modules = inner.modules
        self.uses_every_parameter = inner.uses_every_parameter
        self.step, self.on_policy = -1, False
        self._rows = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sampled_steps = 0  # on-policy steps taken by this process

    # what recipes and evaluation read of a step
    @property
    def teacher(self) -> TeacherSignal | None:
        return self.inner.teacher

    @property
    def terms(self) -> list[Term]:
        return self.inner.terms

    def parameters(self) -> list[nn.Parameter]:
        return self.inner.parameters()

    def flops_per_token(self, student_params: int) -> float:
        return self.inner.flops_per_token(student_params)

    def is_on_policy(self, step: int) -> bool:
        """Whether global batch ``step`` samples from the student (λ from (seed, step))."""
        if self.fraction <= 0.0:
            return False
        return bool(np.random.default_rng([self.seed, step, 0x6B64]).random() < self.fraction)

    def generation_flops(
        self, prompt_lengths: list[int], student_params: int, seq_len: int
    ) -> float:
        """FLOPs of sampling completions for prompts of these lengths: 2·N per prompt token
        (its forward) and per new token, counting each row's whole budget of new tokens (an
        upper bound, exact when no row stops early)."""
        budget = [p + min(self.sampling.max_new_tokens, seq_len - p) for p in prompt_lengths]
        return 2.0 * student_params * float(sum(budget))

    def start_step(self, step: int) -> None:
        """Called before global batch ``step``: decide it, reset the row count."""
        if self._pending:
            raise DistilleryError("on-policy step: samples were drawn but never trained on")
        self.step, self.on_policy, self._rows = step, self.is_on_policy(step), 0
        self.sampled_steps += self.on_policy

    def _sampled(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels) of this micro-batch with the student's completions."""
        lengths = prompt_lengths(labels)
        seq_len = input_ids.shape[1]
        rows = [i for i, p in enumerate(lengths) if p > 0]
        device = next(self.student.parameters()).device
        prompts = [input_ids[i, : lengths[i]].tolist() for i in rows]
        generators = [
            row_generator(self.seed, self.step, self.first_row + self._rows + i, device)
            for i in rows
        ]
        self._rows += input_ids.shape[0]
        if not rows:
            return input_ids, labels
        new = sample(
            self.student,
            prompts,
            self.sampling,
            generators,
            pad_token_id=self.pad_token_id,
            stop_ids=self.stop_ids,
            vocab=self.inner.vocab,
            max_new=[seq_len - len(p) for p in prompts],
        )
        ids, out_labels = input_ids.clone(), labels.clone()
        made_ids, made_labels = completion_rows(prompts, new, seq_len, self.pad_token_id)
        ids[rows], out_labels[rows] = made_ids.to(ids.device), made_labels.to(ids.device)
        return ids, out_labels

    def counts(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.on_policy:
            ids, new_labels = self._sampled(input_ids, labels)
            self._pending.append((input_ids.cpu(), ids, new_labels))
            input_ids, labels = ids, new_labels
        return self.inner.counts(input_ids, labels)

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.on_policy:
            if not self._pending:
                raise DistilleryError("on-policy step: called on a micro-batch never counted")
            original, ids, new_labels = self._pending.pop(0)
            if not torch.equal(original, input_ids.cpu()):
                raise DistilleryError("on-policy step: micro-batches came in another order")
            input_ids, labels = ids.to(input_ids.device), new_labels.to(labels.device)
        return self.inner(model, input_ids, labels, counts=counts)
