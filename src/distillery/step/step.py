"""The distillation step: between the engine and {teachers, objectives}.

On one micro-batch it runs the student (through DDP, so gradients synchronise), asks the teacher
signal for what the terms need, and returns the weighted **sums** of the terms; the engine
divides once by the global count of labelled positions (the loss contract). It also owns what
the terms train besides the student (learned projections) and says what a trained token costs.

Labels are next tokens ``(B, T)`` for a language model, masked tokens ``(B, T)`` (ignore index
elsewhere) for a masked LM, or one class per example ``(B,)`` for a classifier (whose logits are
``(B, C)``): either way a flat row of predictions per label. Representation terms count the
labelled positions (``states_on="labels"``, causal LMs) or every non-padding token
(``"tokens"``: masked LMs and classifiers, as DistilBERT's cosine loss does); given the global
counts, such a term is scaled by labels / tokens, so after the engine's one division it is a
mean over tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.models.heads import chunk_rows, cut_vocab, head_inputs
from distillery.models.interchange import iit_loss, pair_batch
from distillery.models.interventions import sample_positions
from distillery.objectives.chunked import chunked_loss
from distillery.objectives.logits import IGNORE_INDEX
from distillery.objectives.representations import match_heads
from distillery.step.terms import Term, resolve
from distillery.teachers import TeacherOutput, TeacherSignal
from distillery.teachers.cross_tokenizer import AlignedOutput


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def chunk_options(train: Any, vocab: int) -> dict[str, Any]:
    """``DistillStep``'s chunked-path keywords from a ``TrainConfig`` (``auto``: the positions
    whose logits over ``vocab`` words fit the budget)."""
    size = train.logit_chunk_size
    return {
        "chunk_size": chunk_rows(vocab) if size == "auto" else size,
        "matmul_dtype": torch.bfloat16 if train.logit_matmul == "bf16" else None,
        "compile_loss": train.compile_loss,
    }


class DistillStep:
    """``Σ weight_i · objective_i`` on one micro-batch, as per-position **sums**.

    ``vocab`` cuts logits to the tokenizer's real tokens (embedding tables are often padded, and
    teacher and student may be padded differently). ``chunk_size`` > 0 computes the logits a
    chunk of positions at a time (``objectives.chunked``) instead of all at once, its matmuls in
    ``matmul_dtype`` (None: the hidden states'), its passes fused when ``compile_loss``.
    Representation terms need ``student`` (the raw model) to resolve their layer maps; their
    learned projections live in ``modules`` and train with the student. ``teacher_enabled``
    off (codistillation before its peers have targets) skips every term that reads the teacher.
    """

    def __init__(
        self,
        terms: list[Term],
        teacher: TeacherSignal | None = None,
        *,
        student: nn.Module | None = None,
        vocab: int | None = None,
        chunk_size: int = 0,
        matmul_dtype: torch.dtype | None = None,
        compile_loss: bool = False,
        states_on: Literal["labels", "tokens"] = "labels",
        pad_token_id: int | None = None,
    ) -> None:
        if not terms:
            raise DistilleryError("objectives: give at least one")
        needing = [t.name for t in terms if t.objective.needs_teacher]
        if needing and teacher is None:
            raise DistilleryError(f"objectives {needing} need a teacher (--teacher DIR)")
        self.terms, self.teacher, self.vocab, self.chunk_size = terms, teacher, vocab, chunk_size
        self.matmul_dtype, self.compile_loss = matmul_dtype, compile_loss
        self.states_on, self.pad_token_id = states_on, pad_token_id
        self.teacher_enabled = True
        reads = {t.reads for t in terms}
        self.wants_states, self.wants_attentions = "states" in reads, "attentions" in reads
        self.modules = nn.ModuleDict()  # trained with the student, saved in checkpoints
        if reads - {"logits"}:
            assert teacher is not None
            if student is None:
                raise DistilleryError("representation objectives need the student model")
            self.modules = resolve(terms, student, teacher)

    # ----------------------------------------------------------------- what the engine reads
    def active_terms(self, reads: str | None = None) -> list[Term]:
        """The terms computed now (those reading ``reads`` only, if given)."""
        return [
            t
            for t in self.terms
            if (self.teacher_enabled or not t.objective.needs_teacher)
            and (reads is None or t.reads == reads)
        ]

    @property
    def uses_every_parameter(self) -> bool:
        """Whether every student parameter gets a gradient (a logit term reaches the head);
        without one, representation terms may leave the head and later blocks unused."""
        return any(t.reads == "logits" for t in self.terms)

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the step itself (the projections)."""
        return list(self.modules.parameters())

    @property
    def needs_teacher(self) -> bool:
        """Whether any term reads the teacher."""
        return any(t.objective.needs_teacher for t in self.terms)

    @property
    def teacher_forward(self) -> bool:
        """Whether the teacher's plain forward pass is needed (not only counterfactual runs)."""
        return any(
            t.objective.needs_teacher for t in self.active_terms() if t.reads != "interchange"
        )

    def teacher_flops_per_token(self) -> float:
        """FLOPs of the teacher's forward pass per token (0 when no active term needs it)."""
        return 2.0 * self.teacher.compute_params if self.teacher and self.teacher_forward else 0.0

    def interchange_flops_per_token(self, student_params: int) -> float:
        """Expected FLOPs per token of the counterfactual runs: per interchange term, with its
        probability, two teacher forwards (source, base) and two student forward + backward
        passes."""
        if self.teacher is None:
            return 0.0
        per_batch = 2 * 2.0 * self.teacher.compute_params + 2 * 6.0 * student_params
        terms = self.active_terms("interchange")
        return sum(t.interchange["probability"] * per_batch for t in terms)  # type: ignore[index]

    def flops_per_token(self, student_params: int) -> float:
        """FLOPs per trained token: the student's forward and backward (6·N), the teacher's
        forward and the counterfactual runs."""
        return (
            6.0 * student_params
            + self.teacher_flops_per_token()
            + self.interchange_flops_per_token(student_params)
        )

    def _state_mask(self, input_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """``(B·T,)``: the positions representation terms count."""
        if self.states_on == "labels":
            return label_mask
        if self.pad_token_id is None:
            return torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        return (input_ids != self.pad_token_id).reshape(-1)

    def counts(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(labelled positions, positions the representation terms count) in a micro-batch;
        the engine sums them over the global batch and divides the loss by the first."""
        label_mask = labels.reshape(-1) != IGNORE_INDEX
        state_mask = self._state_mask(input_ids, label_mask)
        return torch.stack([label_mask.sum(), state_mask.sum()]).float()

    # ----------------------------------------------------------------- the terms
    def term_sums(self, signals: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Every active logit term's unweighted sum on one set of signals, stacked ``(K,)``."""
        return torch.stack([t.objective(signals, **t.params) for t in self.active_terms("logits")])

    def _logit_sums(
        self,
        raw: nn.Module,
        student: Any,
        captured: dict[str, torch.Tensor],
        teacher: TeacherOutput,
        labels: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted total, unweighted sums ``(K,)``) of the logit terms: chunk by chunk from
        the captured hidden states, or on the whole logits."""
        terms = self.active_terms("logits")
        weights = torch.tensor([t.weight for t in terms], device=mask.device)
        wants_teacher = any(t.objective.needs_teacher for t in terms)
        n = mask.shape[0]
        # A teacher with another tokenizer: logits in its own vocabulary, at aligned positions.
        own_vocab = isinstance(teacher, AlignedOutput)
        teacher_mask = teacher.mask if own_vocab else None
        if self.chunk_size:
            return chunked_loss(
                self.term_sums,
                weights,
                captured["hidden"].reshape(n, -1),  # (N, H)
                raw.get_output_embeddings(),  # type: ignore[operator]
                labels,
                mask,
                chunk_size=self.chunk_size,
                teacher_logits=teacher.chunk_logits if wants_teacher else None,
                vocab=self.vocab,
                teacher_mask=teacher_mask,
                cut_teacher=not own_vocab,
                matmul_dtype=self.matmul_dtype,
                compile=self.compile_loss,
            )
        student_logits = cut_vocab(student.logits, self.vocab)  # (B, T, V)
        vocab = student_logits.shape[-1]
        flat = student_logits.reshape(-1, vocab)  # (N, V)
        signals = {"student_logits": flat, "labels": labels, "mask": mask, "teacher_logits": None}
        signals["teacher_mask"] = teacher_mask
        if wants_teacher:
            if teacher.logits is not None:
                teacher_logits = teacher.logits.reshape(n, -1)  # (N, V_t)
            else:  # a teacher that answers chunk-wise (e.g. from a cache): all at once
                assert teacher.chunk_logits is not None
                teacher_logits = teacher.chunk_logits(slice(None), flat.detach())
            if not own_vocab:
                teacher_logits = cut_vocab(teacher_logits, self.vocab)
            if not own_vocab and teacher_logits.shape[-1] != vocab:
                raise DistilleryError(
                    f"teacher has {teacher_logits.shape[-1]} output tokens, student {vocab}: "
                    "they must share a tokenizer (set the vocabulary both use)"
                )
            signals["teacher_logits"] = teacher_logits
        sums = self.term_sums(signals)
        return (weights * sums).sum(), sums

    def _representation_sum(
        self, term: Term, student: Any, teacher: TeacherOutput, mask: torch.Tensor
    ) -> torch.Tensor:
        """One representation term's sum: the mapped layers of both models, flattened to
        positions, in float32 (projection included, outside autocast)."""
        fn = term.objective
        if fn.reads == "states":
            assert teacher.hidden_states is not None
            s = torch.stack([student.hidden_states[i] for i, _ in term.pairs]).flatten(1, 2)
            s = torch.where(mask[None, :, None], s.float(), 0.0)  # (L, N, D_s); padding → 0
            if term.name in self.modules:
                with torch.autocast(s.device.type, enabled=False):
                    s = self.modules[term.name](s)  # (L, N, D_t)
            t = torch.stack([teacher.hidden_states[j] for _, j in term.pairs]).flatten(1, 2)
            signals = {"student_states": s, "teacher_states": t.float(), "mask": mask}
            return fn(signals, **term.params)
        # Attention maps: one layer pair at a time (the maps are the big tensors here); the
        # objective averages over layers, so the mean over pairs is the same value.
        assert teacher.attentions is not None
        total = torch.zeros((), device=mask.device)
        for i, j in term.pairs:
            s, t = match_heads(
                student.attentions[i - 1].float(), teacher.attentions[j - 1].float(), term.heads
            )
            # (B, A, T, T) -> (1, B·T, A, T): each query position's rows, one per head
            signals = {
                "student_attentions": s.transpose(1, 2).flatten(0, 1)[None],
                "teacher_attentions": t.transpose(1, 2).flatten(0, 1)[None],
                "mask": mask,
            }
            total = total + fn(signals, **term.params)
        return total / len(term.pairs)

    def _interchange_sum(
        self, term: Term, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One interchange term's sum on this micro-batch (zero when the batch is not drawn).
        The draws use torch's global generator, which checkpoints save and restore."""
        spec = term.interchange
        assert spec is not None and self.teacher is not None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise DistilleryError(f"{term.name}: not available under torchrun yet; run it alone")
        if spec["probability"] < 1.0 and float(torch.rand(())) >= spec["probability"]:
            return torch.zeros((), device=input_ids.device)
        pair = term.pairs[int(torch.randint(len(term.pairs), ()))]
        base, source = pair_batch(input_ids)
        positions = sample_positions(
            tuple(input_ids.shape), spec["positions"], spec["fraction"], device=input_ids.device
        )
        return iit_loss(
            unwrap(model),
            self.teacher.model,  # type: ignore[attr-defined]
            base,
            source,
            pair,
            positions,
            term.objective.fn,
            mask=mask,
            **term.params,
        )

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term name: unweighted sum}) for one micro-batch. ``counts``: the
        global batch's ``counts`` (summed over micro-batches and ranks), which scale the
        representation sums to means over tokens (module docstring); None: unscaled."""
        flat_labels = labels.reshape(-1)  # (N,)
        mask = flat_labels != IGNORE_INDEX  # (N,)
        state_scale = 1.0
        if counts is not None:
            n_labels, n_states = counts.tolist()[:2]
            state_scale = max(n_labels, 1.0) / max(n_states, 1.0)
        raw = unwrap(model)
        internals: dict[str, bool] = {}
        if self.wants_states:
            internals["output_hidden_states"] = True
        if self.wants_attentions:
            internals["output_attentions"] = True
        logit_terms = self.active_terms("logits")
        project = not self.chunk_size and bool(logit_terms)
        # Through DDP (``model``), so gradients are synchronised.
        with nullcontext({}) if project else head_inputs(raw) as captured:
            student = model(input_ids=input_ids, **internals)
        teacher = TeacherOutput()
        if self.teacher is not None and self.teacher_forward:
            teacher = self.teacher.run(
                input_ids,
                logits=project and any(t.objective.needs_teacher for t in logit_terms),
                hidden_states=self.wants_states,
                attentions=self.wants_attentions,
            )
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=input_ids.device)
        if logit_terms:
            total, logit_sums = self._logit_sums(raw, student, captured, teacher, flat_labels, mask)
            sums = {t.name: logit_sums[i] for i, t in enumerate(logit_terms)}
        state_mask = self._state_mask(input_ids, mask)  # (N,) positions representations count
        for term in self.active_terms():
            if term.reads == "interchange":
                sums[term.name] = self._interchange_sum(term, model, input_ids, mask)
            elif term.reads != "logits":
                value = self._representation_sum(term, student, teacher, state_mask)
                sums[term.name] = value * state_scale
            else:
                continue
            total = total + term.weight * sums[term.name]
        return total, {t.name: sums[t.name] for t in self.active_terms()}
