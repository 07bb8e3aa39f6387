"""One factory for the teacher signal of a run, from its ``TeacherSpec``."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from distillery.config import CachedTeacherSpec, LiveTeacherSpec, MCDropoutTeacherSpec
from distillery.data import PackedTokens, load_tokenizer
from distillery.errors import DistilleryError
from distillery.parallel import sharded_copy
from distillery.teachers.cache import CachedTeacher, cache_key, check_cache_objectives
from distillery.teachers.cross_tokenizer import CrossTokenizerTeacher
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
) -> tuple[TeacherSignal, TeacherSignal | None]:
    """(the signal the step reads while training, the live signal the final evaluation asks).

    ``models`` are the loaded folders of ``spec.paths``; ``vocab`` the tokens logits are cut
    to. With a cache the live teacher waits on the CPU until the final evaluation.
    ``shard`` (``train.parallel: fsdp``, under torchrun): training reads FSDP-sharded copies
    (every rank runs each forward); the final evaluation, on rank 0 alone, gets the whole
    models, kept on the CPU until it first runs them. A teacher with its own tokenizer
    (``tokenizer: own``) gives no live signal: the final evaluation's comparisons with the
    teacher are token by token.
    """
    if isinstance(spec, LiveTeacherSpec) and spec.tokenizer == "own":
        model = lean_teacher(models[0], spec.precision, device).to(device)
        return cross_tokenizer_teacher(spec.paths[0], model, tokenizer, train_data), None
    cached = isinstance(spec, CachedTeacherSpec)
    models = [lean_teacher(m, spec.precision, device) for m in models]
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


def cross_tokenizer_teacher(
    folder: Path, model: PreTrainedModel, student_tokenizer: Any, train_data: PackedTokens
) -> CrossTokenizerTeacher:
    """The teacher in ``folder`` with its own tokenizer, profiled on the first training blocks:
    the FLOPs it is charged per student token scaled by how many tokens its tokenizer makes of
    them (``ratio``); refused in one line when no position aligns (``aligned``)."""
    teacher = CrossTokenizerTeacher(model, load_tokenizer(folder), student_tokenizer)
    sample = train_data.blocks(range(min(8, train_data.num_blocks)))
    teacher.ratio, teacher.aligned = teacher.profile(sample)
    if teacher.aligned == 0.0:
        raise DistilleryError(
            f"no token boundary of the teacher's tokenizer ({folder}) meets one of the "
            "student's on the first training blocks: the two cannot be aligned (do they decode "
            "to the same text?)"
        )
    teacher.compute_params = round(teacher.compute_params * teacher.ratio)
    return teacher


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


@cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX), where bf16 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def teacher_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a frozen teacher runs in for ``precision`` (None: int8 quantisation)."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "int8":
        if device.type != "cpu":
            raise DistilleryError("teacher.precision=int8 is for a CPU teacher; use bf16 or fp16")
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def lean_teacher(model: PreTrainedModel, precision: str, device: torch.device) -> PreTrainedModel:
    """``model`` (frozen, eval mode) cast to its inference precision, in place; int8: its linear
    layers replaced by dynamically quantised ones (weights int8, activations quantised per
    batch)."""
    model.eval().requires_grad_(False)
    dtype = teacher_dtype(precision, device)
    if dtype is not None:
        return model.to(dtype)
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
