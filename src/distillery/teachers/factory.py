"""One factory for the teacher signal of a run, from its ``TeacherSpec``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from distillery.config import CachedTeacherSpec, LiveTeacherSpec, MCDropoutTeacherSpec
from distillery.data import PackedTokens
from distillery.teachers.cache import CachedTeacher, cache_key, check_cache_objectives
from distillery.teachers.signals import (
    EnsembleTeacher,
    LiveTeacher,
    MCDropoutTeacher,
    TeacherSignal,
)


def build_teacher(
    spec: LiveTeacherSpec | MCDropoutTeacherSpec | CachedTeacherSpec,
    models: Sequence[PreTrainedModel],
    *,
    device: torch.device,
    vocab: int,
    tokenizer: Any,
    train_data: PackedTokens,
    objectives: Sequence[Any],
) -> tuple[TeacherSignal, TeacherSignal]:
    """(the signal the step reads while training, the live signal the final evaluation asks).

    ``models`` are the loaded folders of ``spec.paths``; ``vocab`` the tokens logits are cut
    to. With a cache the live teacher waits on the CPU until the final evaluation.
    """
    cached = isinstance(spec, CachedTeacherSpec)
    members = [LiveTeacher(m if cached else m.to(device)) for m in models]
    live: TeacherSignal = members[0]
    if isinstance(spec, LiveTeacherSpec) and len(members) > 1:
        live = EnsembleTeacher(members, vocab=vocab, weights=spec.weights, combine=spec.combine)
    if isinstance(spec, MCDropoutTeacherSpec):
        live = MCDropoutTeacher(members[0], spec.samples, vocab=vocab)
    if not isinstance(spec, CachedTeacherSpec):
        return live, live
    reader = CachedTeacher(spec.cache, train_data, cache_key(spec.path, tokenizer, train_data))
    check_cache_objectives(objectives, reader.temperature, spec.cache)
    return reader, live
