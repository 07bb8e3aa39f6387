"""The teacher signal: one call that gives what the objectives need of the teacher(s) for a batch.

A live model (``LiveTeacher``), several combined (``EnsembleTeacher``), one model's MC-dropout
samples combined (``MCDropoutTeacher``) or a model's logits divided by a fitted temperature
(``TemperatureScaled``); objectives, the engine and the evaluation see only ``run`` and its
``TeacherOutput``. Logits are next-token ``(B, T, V)`` or, for classifiers, ``(B, C)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import PreTrainedModel

from distillery.errors import DistilleryError
from distillery.models.dropout import dropout_on
from distillery.models.heads import cut_vocab, has_plain_head, head_inputs
from distillery.models.loading import compute_params, use_eager_attention

Combine = Literal["mean", "confident"]


@dataclass
class TeacherOutput:
    """A teacher's view of one batch; fields not asked for are None."""

    logits: torch.Tensor | None = None  # (B, T, V)
    # Instead of ``logits`` (``run(logits=False)``, or always for a teacher that must see the
    # student's logits): ``chunk_logits(part, student_logits)`` gives the logits ``(C, V)`` of
    # the flattened positions ``part``, made on demand, so a whole batch of them never exists at
    # once. ``student_logits`` ``(C, V)`` (detached) lets a sparse teacher complete its tail.
    chunk_logits: Callable[[slice, torch.Tensor | None], torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L+1 × (B, T, H), 0 = embeddings
    attentions: tuple[torch.Tensor, ...] | None = None  # L × (B, A, T, T)


class TeacherSignal(Protocol):
    """What a distillation run reads of its teacher(s), however it is produced."""

    compute_params: int  # parameters doing matmuls in one forward (all members of an ensemble)
    config: Any  # widths, depth and heads, for representation objectives
    has_internals: bool  # whether hidden states and attention maps can be asked for

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput: ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...


def mean_distribution(
    member_logits: Sequence[torch.Tensor],
    vocab: int | None,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """log Σ_k w_k softmax(z_k) (float32), each ``z_k`` cut to ``vocab``; equal weights if none."""
    logp = torch.stack(
        [torch.log_softmax(cut_vocab(z, vocab).float(), dim=-1) for z in member_logits]
    )  # (K, ..., V)
    if log_weights is None:
        return torch.logsumexp(logp, dim=0) - math.log(len(member_logits))
    w = log_weights.to(logp.device).reshape(-1, *([1] * (logp.ndim - 1)))
    return torch.logsumexp(logp + w, dim=0)


def combined_output(
    outs: Sequence[TeacherOutput], combine: Callable[[list[torch.Tensor]], torch.Tensor]
) -> TeacherOutput:
    """One output from several (members, samples): ``combine`` applied to their whole logits,
    or to each chunk of positions as it is asked for."""
    if all(o.logits is not None for o in outs):
        return TeacherOutput(logits=combine([o.logits for o in outs]))  # type: ignore[misc]
    chunks = [o.chunk_logits for o in outs]
    return TeacherOutput(
        chunk_logits=torch.no_grad()(
            lambda part, _student=None: combine([c(part, None) for c in chunks])  # type: ignore[misc]
        )
    )


class TeacherBase:
    """What every teacher signal shares: whole logits from ``run``, however it answers."""

    kind = "a live teacher"  # how the signal is named in errors

    def logits_only(self, **internals: bool) -> None:
        """Refuse, in one line, hidden states or attention maps from a signal without them."""
        if any(internals.values()):
            raise DistilleryError(
                f"hidden-state and attention objectives need a single teacher, not {self.kind}"
            )

    def run(self, input_ids: torch.Tensor, **kwargs: bool) -> TeacherOutput:
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits ``(B, T, V)`` for a batch (e.g. for evaluation)."""
        out = self.run(input_ids)
        if out.logits is not None:
            return out.logits
        assert out.chunk_logits is not None
        return out.chunk_logits(slice(None), None).reshape(*input_ids.shape, -1)


def _float(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() for t in tensors)


class LiveTeacher(TeacherBase):
    """A frozen model run forward on every batch: eval mode, no gradients."""

    has_internals = True

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.compute_params = compute_params(model)
        self.config = model.config
        self.head = model.get_output_embeddings()
        self._plain_head = has_plain_head(model)

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput:
        """One forward pass. ``logits=False`` skips the output projection and returns
        ``chunk_logits``, which projects the final hidden states a chunk at a time (models
        that post-process their logits get them made whole and sliced)."""
        if attentions:
            use_eager_attention(self.model)
        project = logits or not self._plain_head
        with nullcontext({}) if project else head_inputs(self.model) as captured:
            out = self.model(
                input_ids=input_ids,
                output_hidden_states=hidden_states,
                output_attentions=attentions,
            )
        # float32 out, whatever precision the teacher runs in (``teachers.factory.lean_teacher``)
        result = TeacherOutput(
            hidden_states=_float(out.hidden_states) if hidden_states else None,
            attentions=_float(out.attentions) if attentions else None,
        )
        if logits:
            result.logits = out.logits.float()
        elif project:
            full = out.logits.reshape(input_ids.numel(), -1)  # (N, V)
            result.chunk_logits = lambda part, _student=None: full[part].float()
        else:
            hidden = captured["hidden"].reshape(input_ids.numel(), -1)  # (N, H)
            result.chunk_logits = torch.no_grad()(
                lambda part, _student=None: self.head(hidden[part]).float()
            )
        return result


class EnsembleTeacher(TeacherBase):
    """Several teachers sharing a tokenizer, seen as one: their next-token distributions combined.

    ``mean``: the weighted mean of their probabilities at T=1 (the logits handed out are its
    logs; an objective at temperature T then softens that mixture, ∝ p̄^(1/T));
    ``confident``: at each position, the distribution of the teacher whose top probability is
    highest (each next-token prediction is an example). Logits are cut to ``vocab`` (the shared
    tokenizer's tokens) before combining, so differently padded tables line up.
    """

    has_internals = False
    kind = "an ensemble"

    def __init__(
        self,
        members: Sequence[LiveTeacher],
        *,
        vocab: int,
        weights: Sequence[float] | None = None,
        combine: Combine = "mean",
    ) -> None:
        if len(members) < 2:
            raise DistilleryError("an ensemble needs at least two teachers")
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise DistilleryError(
                f"teacher_weights: give {len(members)} non-negative weights, not all zero "
                f"(got {weights})"
            )
        self.members, self.vocab, self.combine = list(members), vocab, combine
        self.log_weights = torch.tensor(weights, dtype=torch.float32).div(sum(weights)).log()
        self.compute_params = sum(m.compute_params for m in members)
        self.config = members[0].config

    def combined(self, member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Combined logits ``(..., vocab)`` (float32 log-probabilities) from each member's."""
        if self.combine == "mean":
            return mean_distribution(member_logits, self.vocab, self.log_weights)
        logp = torch.stack(
            [torch.log_softmax(cut_vocab(z, self.vocab).float(), dim=-1) for z in member_logits]
        )  # (M, ..., V)
        best = logp.max(dim=-1).values.argmax(dim=0)  # (...,): the most confident member
        return logp.gather(0, best[None, ..., None].expand(1, *logp.shape[1:]))[0]

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput:
        """The members' combined logits (whole, or a chunk of positions at a time)."""
        self.logits_only(hidden_states=hidden_states, attentions=attentions)
        outs = [m.run(input_ids, logits=logits) for m in self.members]
        return combined_output(outs, self.combined)


class MCDropoutTeacher(TeacherBase):
    """One model's predictive distribution under MC dropout: the mean of ``samples`` stochastic
    passes with its dropout on (Gal & Ghahramani 2016). Costs ``samples`` forward passes."""

    has_internals = False
    kind = "MC dropout"

    def __init__(self, teacher: LiveTeacher, samples: int, *, vocab: int | None = None) -> None:
        if samples < 2:
            raise DistilleryError(f"MC dropout needs at least 2 samples, got {samples}")
        with dropout_on(teacher.model):  # refuses a model without dropout now, not mid-run
            pass
        self.teacher, self.samples, self.vocab = teacher, samples, vocab
        self.compute_params = samples * teacher.compute_params
        self.config = teacher.config

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput:
        """The samples' mean distribution (whole, or a chunk of positions at a time)."""
        self.logits_only(hidden_states=hidden_states, attentions=attentions)
        with dropout_on(self.teacher.model):
            outs = [self.teacher.run(input_ids, logits=logits) for _ in range(self.samples)]
        return combined_output(outs, lambda zs: mean_distribution(zs, self.vocab))


class TemperatureScaled(TeacherBase):
    """A teacher signal's logits divided by a temperature (post-hoc calibration, Guo et al.
    2017: the temperature is fitted on validation data, ``eval.calibration.fit_temperature``)."""

    has_internals = False
    kind = "a temperature-scaled teacher"

    def __init__(self, inner: TeacherSignal, temperature: float) -> None:
        if temperature <= 0:
            raise DistilleryError(f"temperature must be > 0, got {temperature}")
        self.inner, self.temperature = inner, temperature
        self.compute_params, self.config = inner.compute_params, inner.config

    @torch.no_grad()
    def run(
        self, input_ids: torch.Tensor, *, logits: bool = True, **internals: bool
    ) -> TeacherOutput:
        self.logits_only(**internals)
        out = self.inner.run(input_ids, logits=logits)
        if out.logits is not None:
            return TeacherOutput(logits=out.logits.float() / self.temperature)
        chunk = out.chunk_logits
        assert chunk is not None
        return TeacherOutput(
            chunk_logits=lambda part, student=None: chunk(part, student).float() / self.temperature
        )
