"""A teacher with another tokenizer than the student's: span alignment through the text.

Each row of student token ids is decoded to text, with the character offset where each student
token ends; the text is tokenized again with the teacher's tokenizer (its offsets mapping); the
teacher runs on that. A student position i and a teacher position j are **aligned** when the text
up to the end of student token i equals the text up to the end of teacher token j (equal end
offsets, as GOLD and DSKD align spans): both then predict what follows the same prefix. The
teacher's logits — in its own vocabulary — are handed out at the aligned positions, with a mask
of the student positions that have one (the others carry no distillation loss), so only
objectives that compare different vocabularies apply (``objectives.cross_vocab``: ULD).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from distillery.config import LiveTeacherSpec, needs_teacher
from distillery.errors import DistilleryError
from distillery.models.heads import cut_vocab, has_plain_head, head_inputs
from distillery.models.loading import check_fits_data
from distillery.objectives import get_objective
from distillery.teachers.signals import LiveTeacher, TeacherBase, TeacherOutput


@dataclass
class AlignedOutput(TeacherOutput):
    """A teacher's view of a batch in *its own* vocabulary: ``logits`` ``(N, V_t)`` (or
    ``chunk_logits``) at the teacher position aligned with each of the N = B·T student
    positions, and ``mask`` ``(N,)``: which student positions have one."""

    mask: torch.Tensor | None = None


def token_ends(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[int], list[bool]]:
    """(the text of ``ids``, each token's end offset in it (characters), whether the token ends
    on a character boundary).

    Decoded incrementally over a short window of tokens, as streaming decoders do, so a token
    whose bytes end inside a character (byte-level BPE) adds no text until the token completing
    the character: it is then not ``whole``, and its end is the previous character's."""
    decode = tokenizer.backend_tokenizer.decode
    ids = [int(i) for i in ids]
    text, ends, whole = "", [], []
    prefix = read = 0  # ids[prefix:read] are decoded; ids[read:] wait for a whole character
    before = ""
    for i in range(len(ids)):
        after = decode(ids[prefix : i + 1], skip_special_tokens=False)
        emitted = len(after) > len(before) and not after.endswith("\ufffd")
        if emitted:
            text += after[len(before) :]
            prefix, read = read, i + 1
            before = decode(ids[prefix:read], skip_special_tokens=False)
        ends.append(len(text))
        whole.append(emitted)
    if read < len(ids):  # a row that ends inside a character
        text += decode(ids[prefix:], skip_special_tokens=False)[len(before) :]
    return text, ends, whole


def align(
    student_ends: Sequence[int], whole: Sequence[bool], teacher_ends: Sequence[int]
) -> list[int]:
    """For each student position, the teacher position whose token ends at the same character
    offset (the last one, when several teacher tokens end there, e.g. the bytes of one
    character), or -1: not aligned (no teacher token ends there, or the student token ends
    inside a character, or before any text)."""
    last: dict[int, int] = {end: j for j, end in enumerate(teacher_ends) if end > 0}
    return [
        last.get(end, -1) if ok and end > 0 else -1
        for end, ok in zip(student_ends, whole, strict=True)
    ]


class CrossTokenizerTeacher(TeacherBase):
    """A frozen teacher with its own tokenizer, read at the student positions aligned with its
    own (module docstring). ``max_length``: the teacher's positions (default: its config's
    ``max_position_embeddings``); a row the teacher tokenizes longer is cut there, and student
    positions past the cut are not aligned."""

    has_internals = False
    kind = "a teacher with another tokenizer"

    def __init__(
        self,
        model: PreTrainedModel,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        max_length: int | None = None,
    ) -> None:
        for role, tok in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
            if getattr(tok, "backend_tokenizer", None) is None:
                raise DistilleryError(
                    f"a teacher with another tokenizer needs fast tokenizers (offsets); the "
                    f"{role}'s is a slow {type(tok).__name__}"
                )
        check_fits_data(model, teacher_tokenizer, 1, "teacher")
        self.live = LiveTeacher(model)
        self.model, self.config = self.live.model, self.live.config
        self.compute_params = self.live.compute_params
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        # From ``profile`` on a sample, when the factory measures them: teacher tokens per
        # student token, and the share of student positions aligned.
        self.ratio, self.aligned = 1.0, 1.0
        self.vocab = len(teacher_tokenizer)
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        pad = teacher_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (teacher_tokenizer.eos_token_id or 0)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher ids ``(B, T_t)``, right-padded; index ``(B·T,)`` of the aligned flattened
        teacher position of each student position, -1 where none)."""
        rows = [token_ends(self.student_tokenizer, row) for row in input_ids.tolist()]
        encoded = self.teacher_tokenizer(
            [text for text, _, _ in rows],
            add_special_tokens=False,
            return_offsets_mapping=True,
            padding=False,
            truncation=False,
        )
        teacher_rows = [ids[: self.max_length] for ids in encoded["input_ids"]]
        width = max([1, *(len(ids) for ids in teacher_rows)])
        index = []
        for b, ((_, ends, whole), offsets) in enumerate(
            zip(rows, encoded["offset_mapping"], strict=True)
        ):
            kept = [end for _, end in offsets[: len(teacher_rows[b])]]
            index += [j if j < 0 else b * width + j for j in align(ends, whole, kept)]
        teacher_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for b, ids in enumerate(teacher_rows):
            teacher_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return teacher_ids.to(input_ids.device), torch.tensor(index, device=input_ids.device)

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> AlignedOutput:
        """The teacher's logits ``(N, V_t)`` at the positions aligned with the student's (rows
        of unaligned positions are the teacher's first position's: masked out), whole or, with
        ``logits=False``, ``chunk_logits`` projecting the aligned hidden states a chunk of
        student positions at a time (right padding is harmless: a causal teacher's real
        positions never attend to it)."""
        self.logits_only(hidden_states=hidden_states, attentions=attentions)
        teacher_ids, index = self.encode(input_ids)
        mask = index >= 0  # (N,)
        safe = index.clamp(min=0)
        if not has_plain_head(self.model):  # post-processed logits: made whole, then gathered
            full = self.model(input_ids=teacher_ids).logits.flatten(0, 1)  # (B·T_t, V)
            aligned = cut_vocab(full[safe], self.vocab).float()  # (N, V_t)
            if logits:
                return AlignedOutput(logits=aligned, mask=mask)
            return AlignedOutput(chunk_logits=lambda part, _s=None: aligned[part], mask=mask)
        with head_inputs(self.model) as captured:
            self.model(input_ids=teacher_ids)
        hidden = captured["hidden"].flatten(0, 1)[safe]  # (N, H): aligned hidden states
        head = self.live.head

        def chunk(part: slice, _student: torch.Tensor | None = None) -> torch.Tensor:
            with torch.no_grad():
                return cut_vocab(head(hidden[part]), self.vocab).float()  # (C, V_t)

        if logits:
            return AlignedOutput(logits=chunk(slice(None)), mask=mask)
        return AlignedOutput(chunk_logits=chunk, mask=mask)

    def profile(self, input_ids: torch.Tensor) -> tuple[float, float]:
        """(teacher tokens per student token, share of student positions aligned) on a sample
        of rows: what a teacher forward costs per student token relative to one tokenizer, and
        how much of the text the distillation loss sees."""
        teacher_ids, index = self.encode(input_ids)
        tokens = max(input_ids.numel(), 1)
        return float((teacher_ids != self.pad_id).sum()) / tokens, float(
            (index >= 0).sum()
        ) / tokens


def own_tokenizer(cfg: Any) -> bool:
    """Whether a run's teacher keeps its own tokenizer (``teacher.tokenizer: own``)."""
    return isinstance(cfg.teacher, LiveTeacherSpec) and cfg.teacher.tokenizer == "own"


def check_own_tokenizer(cfg: Any) -> None:
    """Refuse, in one line each, what a teacher with its own tokenizer cannot do (before any
    model is loaded)."""
    if not own_tokenizer(cfg):
        return
    token_wise = [
        o.kind
        for o in cfg.objectives
        if needs_teacher(o) and (o.kind == "iit" or not get_objective(o.kind).cross_vocab)
    ]
    if token_wise:
        raise DistilleryError(
            f"teacher tokenizer differs from the student's: use uld; objectives {token_wise} "
            "compare the two token by token (or layer by layer), which needs one tokenizer"
        )
    if cfg.model.init_from_teacher is not None:
        raise DistilleryError(
            "model.init_from_teacher copies the teacher's layers and embeddings: not from a "
            "teacher with its own tokenizer (another vocabulary); drop one of the two"
        )
    if cfg.data.task != "lm" or cfg.on_policy is not None:
        raise DistilleryError(
            "teacher.tokenizer: own is for causal language models on token blocks "
            "(data.task: lm, no on_policy)"
        )
    if cfg.train.parallel == "fsdp":
        raise DistilleryError("teacher.tokenizer: own is not available with train.parallel: fsdp")
