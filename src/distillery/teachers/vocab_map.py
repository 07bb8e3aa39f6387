"""Distilling a student with a trimmed vocabulary (``distillery prune`` with ``vocab``) from its
untrimmed teacher.

The student's folder holds ``vocab_map.json``: student token ``i`` is teacher token
``teacher_ids[i]``. The data are cut with the student's (trimmed) tokenizer; the teacher reads
the same text as ``teacher_ids[student ids]`` and its logits are handed out at the kept columns
only, ``(…, K)``, so every logit objective compares two distributions over the student's K
tokens (hidden states and attention maps are the same positions: unchanged).

The teacher's mass on dropped tokens: softmax over the gathered columns renormalises it away, so
the target is the teacher's distribution **conditioned on the kept tokens**, p_t(v | v kept). The
cache's left-over bucket (``teachers.topk``) cannot hold it exactly: the bucket is spread over
the student's tokens outside the top-k, and here every student token is known exactly and none
stands for the dropped ones (a student cannot put mass on tokens it does not have). Dropped
tokens never occur in the trimming corpus, so on its text that mass is small.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillery.config import CachedTeacherSpec
from distillery.data import has_tokenizer, load_tokenizer
from distillery.errors import DistilleryError
from distillery.models import check_same_tokenizer
from distillery.models.vocab_trim import VOCAB_MAP_FILE, read_vocab_map, save_vocab_map
from distillery.teachers.cross_tokenizer import own_tokenizer
from distillery.teachers.signals import TeacherBase, TeacherOutput, TeacherSignal


@dataclass
class StudentVocab:
    """A trimmed student's map to its teacher's vocabulary (``vocab_map.json`` in ``folder``)."""

    folder: Path
    teacher_ids: list[int]  # (K,) the teacher id of each student id
    teacher_vocab_size: int  # V: the teacher tokenizer's tokens

    def wrap(self, signal: TeacherSignal | None) -> TeacherSignal | None:
        """``signal`` read in the student's ids (None stays None)."""
        return None if signal is None else VocabMappedTeacher(signal, self.teacher_ids)


def trimmed_student(cfg: Any) -> StudentVocab | None:
    """The vocabulary map of a run's student folder (``cfg.model.path``), None when it has none;
    refuses, in one line each and before any model is loaded, what it cannot be distilled with."""
    folder = cfg.model.path
    found = read_vocab_map(folder) if folder is not None else None
    if found is None:
        return None
    where = f"the student {folder} has a trimmed vocabulary ({VOCAB_MAP_FILE})"
    if isinstance(cfg.teacher, CachedTeacherSpec):
        raise DistilleryError(
            f"{where}: a teacher cache holds the teacher's own token ids; use the live teacher "
            "(teacher.kind: live)"
        )
    if own_tokenizer(cfg):
        raise DistilleryError(f"{where}, a part of the teacher's: drop teacher.tokenizer: own")
    if cfg.data.tokenizer is not None:
        raise DistilleryError(f"{where}: the data are cut with its tokenizer; drop data.tokenizer")
    if cfg.data.task not in ("lm", "prompts"):
        raise DistilleryError(f"{where}: it is a causal LM (data.task: lm or prompts)")
    if any(o.kind == "iit" for o in cfg.objectives):
        raise DistilleryError(f"{where}: iit runs the teacher on the student's ids; drop iit")
    if cfg.model.init_from_teacher is not None:
        raise DistilleryError(
            f"{where}: it is cut from the teacher already; drop init_from_teacher"
        )
    return StudentVocab(Path(folder), *found)


def check_tokenizers(cfg: Any, tokenizer: Any, vocab: StudentVocab | None) -> None:
    """Every teacher (and a student folder) must use the tokenizer the data was cut with (the
    student's, with a teacher that keeps its own); a trimmed student's must be its teachers'
    trimmed to ``vocab`` (``check_trimmed``)."""
    if vocab is not None:
        for folder in cfg.teacher_paths:
            if has_tokenizer(folder):
                check_trimmed(vocab, load_tokenizer(folder), tokenizer, folder)
        return
    own = own_tokenizer(cfg)
    paths = [] if own else cfg.teacher_paths
    others = paths[1:] if cfg.data.tokenizer is None else paths
    student = cfg.model.path and (paths or (own and cfg.data.tokenizer))
    for folder in [*others, *([cfg.model.path] if student else [])]:
        if has_tokenizer(folder):
            check_same_tokenizer(load_tokenizer(folder), tokenizer)


def check_trimmed(vocab: StudentVocab, teacher_tok: Any, student_tok: Any, teacher: Any) -> None:
    """Refuse, in one line, a teacher whose vocabulary is not the one the student was trimmed
    from (another size, or other tokens at the kept ids)."""
    size = len(teacher_tok)
    if size != vocab.teacher_vocab_size:
        raise DistilleryError(
            f"{vocab.folder / VOCAB_MAP_FILE} maps into a teacher vocabulary of "
            f"{vocab.teacher_vocab_size} tokens but the teacher {teacher} has {size}: distil "
            "from the teacher it was trimmed from (or prune again)"
        )
    k = len(vocab.teacher_ids)
    mine = student_tok.convert_ids_to_tokens(list(range(k))) if len(student_tok) == k else None
    if mine != teacher_tok.convert_ids_to_tokens(vocab.teacher_ids):
        raise DistilleryError(
            f"the student {vocab.folder}'s tokenizer is not the teacher {teacher}'s trimmed to "
            f"its {VOCAB_MAP_FILE}: prune the student again"
        )


class VocabMappedTeacher(TeacherBase):
    """A teacher signal over V tokens seen by a student with K of them (module docstring): it
    reads ``teacher_ids[input_ids]`` and answers logits ``(…, K)``, the teacher's columns
    ``teacher_ids`` (softmax over them: the teacher conditioned on the kept tokens)."""

    kind = "a teacher of a trimmed student"

    def __init__(self, inner: TeacherSignal, teacher_ids: list[int]) -> None:
        config = getattr(inner.config, "get_text_config", lambda: inner.config)()
        rows = getattr(config, "vocab_size", None)
        if rows is not None and max(teacher_ids) >= rows:
            raise DistilleryError(
                f"the student's vocabulary map names teacher token {max(teacher_ids)} but the "
                f"teacher has {rows} output rows: distil from the teacher it was trimmed from"
            )
        self.inner = inner
        self.teacher_ids = torch.tensor(teacher_ids, dtype=torch.long)  # (K,)
        self.compute_params, self.config = inner.compute_params, inner.config
        self.has_internals = inner.has_internals

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput:
        """The inner teacher on the same text, its logits gathered at the kept columns (whole,
        or a chunk of positions at a time); hidden states and attention maps unchanged."""
        kept = self.teacher_ids.to(input_ids.device)
        out = self.inner.run(
            kept[input_ids], logits=logits, hidden_states=hidden_states, attentions=attentions
        )
        mapped = dataclasses.replace(out, logits=None, chunk_logits=None)
        if out.logits is not None:
            mapped.logits = out.logits.index_select(-1, kept)  # (B, T, K)
        if out.chunk_logits is not None:
            chunk = out.chunk_logits  # the student's logits are over other columns: not passed
            mapped.chunk_logits = lambda part, _student=None: chunk(part, None).index_select(
                -1, kept
            )  # (C, K)
        return mapped


def copy_vocab_map(student: Path | None, dest: Path) -> None:
    """Give the exported folder ``dest`` the vocabulary map of the student folder it came from."""
    found = read_vocab_map(student) if student is not None else None
    if found is not None:
        save_vocab_map(dest, *found)
