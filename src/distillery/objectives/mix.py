"""A weighted sum of named objectives, computed on one micro-batch.

Labels are next tokens ``(B, T)`` for a language model, masked tokens ``(B, T)`` (ignore index
elsewhere) for a masked LM, or one class per example ``(B,)`` for a classifier (whose logits are
``(B, C)``): either way a flat row of predictions per label. Representation terms count the
labelled positions (``states_on="labels"``, causal LMs) or every non-padding token
(``"tokens"``: masked LMs and classifiers, whose labels are sparse or one per text, as
DistilBERT's cosine loss does); the engine then passes ``state_scale`` = labels / tokens in the
global batch, so after its one division by the label count such a term is a mean over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.models.interventions import num_layers, sample_positions
from distillery.objectives.chunked import chunked_loss, head_inputs
from distillery.objectives.interchange import iit_loss, pair_batch
from distillery.objectives.logits import IGNORE_INDEX
from distillery.objectives.registry import Objective, get_objective
from distillery.objectives.representations import (
    HeadPolicy,
    LayerSpec,
    check_heads,
    layer_pairs,
    match_heads,
)
from distillery.teachers import TeacherOutput, TeacherSignal, use_eager_attention


@dataclass
class Term:
    """One entry of the mix: a registered objective, its weight and its parameters.

    Representation objectives also say which layers they compare (``layers``, see
    ``representations.layer_pairs``), how attention heads are matched (``heads``) and whether
    the student's hidden states go through a learned projection (``projection``: ``auto`` =
    only when the widths differ, ``linear`` = always).
    """

    name: str
    objective: Objective
    weight: float
    params: dict[str, Any] = field(default_factory=dict)
    layers: LayerSpec | None = None  # default: "last" for hidden states, "uniform" for attention
    heads: HeadPolicy = "auto"
    projection: Literal["auto", "linear"] = "auto"
    pairs: list[tuple[int, int]] = field(default_factory=list)  # resolved by LossMix
    # Interchange intervention training: positions / fraction / probability; ``objective`` is
    # then the divergence between the counterfactual outputs (``objectives.interchange``).
    interchange: dict[str, Any] | None = None

    @property
    def reads(self) -> str:
        """``logits``, ``states``, ``attentions`` or ``interchange`` (counterfactual runs)."""
        return "interchange" if self.interchange is not None else self.objective.reads


ROUTING = ("layers", "heads", "projection")  # Term fields set from config, not loss parameters


def terms_from_config(objectives: Sequence[Any]) -> list[Term]:
    """Terms from config entries (``kind``, ``weight`` and the objective's own parameters)."""
    terms: list[Term] = []
    seen: dict[str, int] = {}
    for entry in objectives:
        spec = entry.model_dump() if hasattr(entry, "model_dump") else dict(entry)
        kind, weight = spec.pop("kind"), float(spec.pop("weight", 1.0))
        if kind == "iit":
            divergence = get_objective(spec.pop("divergence", "forward_kl"))
            keys = ("positions", "fraction", "probability")
            defaults = {"positions": "span", "fraction": 0.5, "probability": 1.0}
            swap = {k: spec.pop(k, defaults[k]) for k in keys}
            layers = spec.pop("layers", "uniform")
            unknown = set(spec) - set(divergence.params)
            if unknown:
                raise DistilleryError(f"objective 'iit' has no parameter(s) {sorted(unknown)}")
            seen[kind] = seen.get(kind, 0) + 1
            name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
            terms.append(Term(name, divergence, weight, spec, layers=layers, interchange=swap))
            continue
        objective = get_objective(kind)
        routing = {k: spec.pop(k) for k in ROUTING if k in spec}
        allowed = {
            "logits": (),
            "states": ("layers", "projection"),
            "attentions": ("layers", "heads"),
        }
        misplaced = sorted(set(routing) - set(allowed[objective.reads]))
        if misplaced:
            raise DistilleryError(f"objective {kind!r} has no parameter(s) {misplaced}")
        unknown = set(spec) - set(objective.params)
        if unknown:
            raise DistilleryError(f"objective {kind!r} has no parameter(s) {sorted(unknown)}")
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
        terms.append(Term(name, objective, weight, spec, **routing))
    return terms


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class LossMix:
    """``Σ weight_i · objective_i`` as per-position **sums**; the engine divides by the count.

    ``vocab`` cuts logits to the tokenizer's real tokens (embedding tables are often padded, and
    teacher and student may be padded differently). ``chunk_size`` > 0 computes the logits a
    chunk of positions at a time (see ``objectives.chunked``) instead of all at once.
    Representation terms need ``student`` (the raw model) to resolve their layer maps; their
    learned projections live in ``projections`` and are trained with the student.
    """

    def __init__(
        self,
        terms: list[Term],
        teacher: TeacherSignal | None = None,
        *,
        student: nn.Module | None = None,
        vocab: int | None = None,
        chunk_size: int = 0,
        states_on: Literal["labels", "tokens"] = "labels",
        pad_token_id: int | None = None,
    ) -> None:
        if not terms:
            raise DistilleryError("objectives: give at least one")
        self.terms = terms
        self.teacher = teacher
        self.vocab = vocab
        self.chunk_size = chunk_size
        self.states_on, self.pad_token_id = states_on, pad_token_id
        self.needs_teacher = any(t.objective.needs_teacher for t in terms)
        if self.needs_teacher and teacher is None:
            needing = [t.name for t in terms if t.objective.needs_teacher]
            raise DistilleryError(f"objectives {needing} need a teacher (--teacher DIR)")
        self.logit_terms = [t for t in terms if t.reads == "logits"]
        self.interchange_terms = [t for t in terms if t.reads == "interchange"]
        # The teacher's plain forward pass, unless only counterfactual runs need the teacher.
        self.teacher_forward = any(
            t.objective.needs_teacher for t in terms if t.reads != "interchange"
        )
        self.projections = nn.ModuleDict()
        reads = {t.reads for t in terms}
        self.wants_states, self.wants_attentions = "states" in reads, "attentions" in reads
        if self.wants_states or self.wants_attentions or self.interchange_terms:
            assert teacher is not None
            if student is None:
                raise DistilleryError("representation objectives need the student model")
            self._resolve(student, teacher)

    def _resolve(self, student: nn.Module, teacher: TeacherSignal) -> None:
        """Layer pairs and projections of the representation terms, from both configs."""
        if not teacher.has_internals:
            names = [t.name for t in self.terms if t.reads != "logits"]
            raise DistilleryError(f"objectives {names} need a single teacher, not an ensemble")
        s_cfg, t_cfg = student.config, teacher.config
        for term in self.terms:
            reads = term.reads
            if reads == "logits":
                continue
            if reads == "interchange":
                if not isinstance(getattr(teacher, "model", None), nn.Module):
                    raise DistilleryError(
                        f"{term.name}: interchange interventions run the teacher model itself; "
                        "give one live teacher (no teacher cache, ensemble or MC dropout)"
                    )
                term.pairs = layer_pairs(
                    term.layers or "uniform", num_layers(student), num_layers(teacher.model)
                )
                continue
            default = "uniform" if reads == "attentions" else "last"
            term.pairs = layer_pairs(
                term.layers or default,
                s_cfg.num_hidden_layers,
                t_cfg.num_hidden_layers,
                attention=reads == "attentions",
            )
            if reads == "attentions":
                check_heads(s_cfg.num_attention_heads, t_cfg.num_attention_heads, term.heads)
                if getattr(s_cfg, "attention_dropout", 0.0):
                    raise DistilleryError(
                        f"{term.name}: the student drops out attention weights "
                        f"(attention_dropout={s_cfg.attention_dropout}), so its maps are not "
                        "distributions; set model.overrides.attention_dropout=0"
                    )
                use_eager_attention(student)  # type: ignore[arg-type]
            elif term.projection == "linear" or s_cfg.hidden_size != t_cfg.hidden_size:
                self.projections[term.name] = nn.Linear(
                    s_cfg.hidden_size, t_cfg.hidden_size, bias=False
                )

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objectives themselves (the projections)."""
        return list(self.projections.parameters())

    def teacher_flops_per_token(self) -> float:
        """FLOPs of the teacher's forward pass per token (0 without a teacher)."""
        return 2.0 * self.teacher.compute_params if self.teacher_forward and self.teacher else 0.0

    def interchange_flops_per_token(self, student_params: int) -> float:
        """Expected FLOPs per token of the counterfactual runs: per interchange term, with its
        probability, two teacher forwards (source, base) and two student forward + backward
        passes."""
        if not self.interchange_terms or self.teacher is None:
            return 0.0
        per_batch = 2 * 2.0 * self.teacher.compute_params + 2 * 6.0 * student_params
        return sum(t.interchange["probability"] * per_batch for t in self.interchange_terms)  # type: ignore[index]

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

    def _state_mask(self, input_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """``(B·T,)``: the positions representation terms count."""
        if self.states_on == "labels":
            return label_mask
        if self.pad_token_id is None:
            return torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        return (input_ids != self.pad_token_id).reshape(-1)

    def counts(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(labelled positions, positions the representation terms count) in a micro-batch."""
        label_mask = labels.reshape(-1) != IGNORE_INDEX
        state_mask = self._state_mask(input_ids, label_mask)
        return torch.stack([label_mask.sum(), state_mask.sum()]).float()

    @staticmethod
    def _weights(terms: list[Term], device: torch.device) -> torch.Tensor:
        return torch.tensor([t.weight for t in terms], device=device)

    def term_sums(self, signals: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Every logit term's unweighted sum on one set of signals, stacked ``(K,)``."""
        return torch.stack([t.objective(signals, **t.params) for t in self.logit_terms])

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
            if term.name in self.projections:
                with torch.autocast(s.device.type, enabled=False):
                    s = self.projections[term.name](s)  # (L, N, D_t)
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

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        state_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term name: unweighted sum}) for one micro-batch; representation
        sums are multiplied by ``state_scale`` (see the module docstring)."""
        flat_labels = labels.reshape(-1)  # (N,)
        mask = flat_labels != IGNORE_INDEX  # (N,)
        n = mask.shape[0]
        raw = unwrap(model)
        internals: dict[str, bool] = {}
        if self.wants_states:
            internals["output_hidden_states"] = True
        if self.wants_attentions:
            internals["output_attentions"] = True
        project = not self.chunk_size and bool(self.logit_terms)
        # Through DDP (``model``), so gradients are synchronised.
        with nullcontext({}) if project else head_inputs(raw) as captured:
            student = model(input_ids=input_ids, **internals)
        teacher_logits_needed = any(t.objective.needs_teacher for t in self.logit_terms)
        teacher = TeacherOutput()
        if self.teacher_forward:
            assert self.teacher is not None
            teacher = self.teacher.run(
                input_ids,
                logits=project and teacher_logits_needed,
                hidden_states=self.wants_states,
                attentions=self.wants_attentions,
            )
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=input_ids.device)
        if self.logit_terms and self.chunk_size:
            total, logit_sums = chunked_loss(
                self.term_sums,
                self._weights(self.logit_terms, captured["hidden"].device),
                captured["hidden"].reshape(n, -1),  # (N, H)
                raw.get_output_embeddings(),  # type: ignore[operator]
                flat_labels,
                mask,
                chunk_size=self.chunk_size,
                teacher_logits=teacher.chunk_logits if teacher_logits_needed else None,
                vocab=self.vocab,
            )
        elif self.logit_terms:
            student_logits = student.logits[..., : self.vocab]  # (B, T, V)
            vocab = student_logits.shape[-1]
            signals: dict[str, torch.Tensor | None] = {
                "student_logits": student_logits.reshape(-1, vocab),  # (N, V)
                "labels": flat_labels,
                "mask": mask,
                "teacher_logits": None,
            }
            if teacher_logits_needed:
                if teacher.logits is not None:
                    teacher_logits = teacher.logits[..., : self.vocab].reshape(n, -1)  # (N, V)
                else:  # a teacher that answers chunk-wise (e.g. from a cache): all at once
                    assert teacher.chunk_logits is not None
                    flat = signals["student_logits"]
                    assert flat is not None
                    teacher_logits = teacher.chunk_logits(slice(None), flat.detach())
                    teacher_logits = teacher_logits[..., : self.vocab]
                if teacher_logits.shape[-1] != vocab:
                    raise DistilleryError(
                        f"teacher has {teacher_logits.shape[-1]} output tokens, student {vocab}: "
                        "they must share a tokenizer (set the vocabulary both use)"
                    )
                signals["teacher_logits"] = teacher_logits
            logit_sums = self.term_sums(signals)
            total = (self._weights(self.logit_terms, logit_sums.device) * logit_sums).sum()
        for i, term in enumerate(self.logit_terms):
            sums[term.name] = logit_sums[i]
        state_mask = self._state_mask(input_ids, mask)  # (N,) positions representations count
        for term in self.terms:
            if term.reads == "interchange":
                value = self._interchange_sum(term, model, input_ids, mask)
                sums[term.name] = value
                total = total + term.weight * value
            elif term.reads != "logits":
                value = self._representation_sum(term, student, teacher, state_mask) * state_scale
                sums[term.name] = value
                total = total + term.weight * value
        return total, {t.name: sums[t.name] for t in self.terms}
