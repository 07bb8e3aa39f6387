"""One factory for the teacher signal of a run, from its ``TeacherSpec``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from distillery.config import CachedTeacherSpec, LiveTeacherSpec, MCDropoutTeacherSpec
from distillery.data import PackedTokens
from distillery.parallel import sharded_copy
from distillery.teachers.cache import CachedTeacher, cache_key, check_cache_objectives
from distillery.teachers.signals import (
    EnsembleTeacher,
    LiveTeacher,
    MCDropoutTeacher,
    TeacherOutput,
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
    shard: bool = False,
) -> tuple[TeacherSignal, TeacherSignal]:
    """(the signal the step reads while training, the live signal the final evaluation asks).

    ``models`` are the loaded folders of ``spec.paths``; ``vocab`` the tokens logits are cut
    to. With a cache the live teacher waits on the CPU until the final evaluation.
    ``shard`` (``train.parallel: fsdp``, under torchrun): training reads FSDP-sharded copies
    (every rank runs each forward); the final evaluation, on rank 0 alone, gets the whole
    models, kept on the CPU until it first runs them.
    """
    cached = isinstance(spec, CachedTeacherSpec)
    if shard and not cached and dist.is_initialized() and dist.get_world_size() > 1:
        sharded = [sharded_copy(m, device, frozen=True) for m in models]
        whole = [_MovesOnFirstUse(m.eval().requires_grad_(False)) for m in models]
        return _combined(spec, sharded, vocab), _combined(spec, whole, vocab)
    live = _combined(spec, [m if cached else m.to(device) for m in models], vocab)
    if not isinstance(spec, CachedTeacherSpec):
        return live, live
    reader = CachedTeacher(spec.cache, train_data, cache_key(spec.path, tokenizer, train_data))
    check_cache_objectives(objectives, reader.temperature, spec.cache)
    return reader, live


def _combined(spec: Any, models: Sequence[PreTrainedModel], vocab: int) -> TeacherSignal:
    """One signal from the loaded models, as ``spec`` combines them."""
    members = [m if isinstance(m, LiveTeacher) else LiveTeacher(m) for m in models]
    if isinstance(spec, LiveTeacherSpec) and len(members) > 1:
        return EnsembleTeacher(members, vocab=vocab, weights=spec.weights, combine=spec.combine)
    if isinstance(spec, MCDropoutTeacherSpec):
        return MCDropoutTeacher(members[0], spec.samples, vocab=vocab)
    return members[0]


class _MovesOnFirstUse(LiveTeacher):
    """A live teacher left on the CPU until a batch arrives, then moved to the batch's device
    (the whole teacher of a sharded run, for the final evaluation on rank 0)."""

    def run(self, input_ids: torch.Tensor, **kwargs: bool) -> TeacherOutput:
        self.model.to(input_ids.device)
        return super().run(input_ids, **kwargs)
