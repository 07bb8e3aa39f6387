"""Held-out metrics of a causal LM, alone or against a teacher; size and generation speed."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.data import PackedTokens, sequential_batches
from distillery.objectives.chunked import head_inputs, is_plain_head
from distillery.objectives.logits import IGNORE_INDEX, cross_entropy, forward_kl
from distillery.objectives.mix import shift_labels
from distillery.teachers import TeacherSignal

EVAL_CHUNK_LOGITS = 2**22  # logits (positions × vocabulary) made at once when evaluating


def _logits_by_chunk(
    model: nn.Module, ids: torch.Tensor, teacher: TeacherSignal | None, vocab: int | None
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
    """(positions, student logits, teacher logits) a chunk of flattened positions at a time,
    float32, cut to ``vocab`` — never a whole batch of full-vocabulary logits when the output
    projections are plain linear layers (else one chunk: the model's own logits)."""
    n = ids.numel()
    head = model.get_output_embeddings()
    plain = is_plain_head(head, model.config)
    if not plain:
        logits = model(input_ids=ids).logits[..., :vocab].float().reshape(n, -1)
        t_logits = None
        if teacher is not None:
            t_logits = teacher.logits(ids)[..., :vocab].float().reshape(n, -1)
        yield slice(0, n), logits, t_logits
        return
    with head_inputs(model) as captured:
        model(input_ids=ids)
    hidden = captured["hidden"].reshape(n, -1)  # (N, H)
    teacher_logits = teacher.run(ids, logits=False).chunk_logits if teacher is not None else None
    rows = vocab or head.weight.shape[0]
    chunk = max(1, EVAL_CHUNK_LOGITS // rows)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        logits = head(hidden[part])[..., :vocab].float()  # (C, V)
        t_logits = None
        if teacher_logits is not None:
            t_logits = teacher_logits(part, logits)[..., :vocab].float()
        yield part, logits, t_logits


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    data: PackedTokens,
    *,
    device: torch.device,
    batch_size: int = 16,
    max_batches: int | None = None,
    teacher: TeacherSignal | None = None,
    vocab: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss, perplexity and top-1 accuracy over ``data`` (in order).

    With a teacher also: agreement (student top-1 == teacher top-1) and KL(teacher ‖ student)
    at temperature 1, both averaged over the same positions. Logits are cut to the first
    ``vocab`` columns (the tokenizer's real tokens; embedding tables may be padded) and made a
    chunk of positions at a time, so big vocabularies fit in memory.
    """
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "correct": 0.0, "agree": 0.0, "kl": 0.0}
    count = 0
    for ids in sequential_batches(data, batch_size, max_batches):
        ids = ids.to(device)
        all_labels = shift_labels(ids).reshape(-1)  # (N,)
        for part, student_logits, teacher_logits in _logits_by_chunk(model, ids, teacher, vocab):
            labels = all_labels[part]
            mask = labels != IGNORE_INDEX
            totals["loss"] += float(cross_entropy(student_logits, labels, mask))
            top1 = student_logits.argmax(-1)
            totals["correct"] += float(((top1 == labels) & mask).sum())
            if teacher_logits is not None:
                totals["agree"] += float(((top1 == teacher_logits.argmax(-1)) & mask).sum())
                totals["kl"] += float(
                    forward_kl(student_logits, teacher_logits, mask, temperature=1.0)
                )
            count += int(mask.sum())
    model.train(was_training)
    n = max(count, 1)
    out = {
        "val_loss": totals["loss"] / n,
        "val_ppl": math.exp(min(totals["loss"] / n, 50.0)),
        "accuracy": totals["correct"] / n,
        "eval_tokens": float(count),
    }
    if teacher is not None:
        out["agreement"] = totals["agree"] / n
        out["kl_teacher_student"] = totals["kl"] / n
    return out


@torch.no_grad()
def generation_speed(
    model: nn.Module,
    tokenizer: Any,
    *,
    device: torch.device,
    prompt: str = "The government said",
    new_tokens: int = 64,
    repeats: int = 2,
) -> float:
    """Greedy generation throughput in new tokens per second (batch 1, KV cache on)."""
    was_training = model.training
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    model.generate(ids, **kwargs, max_length=None)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.generate(ids, **kwargs, max_length=None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.train(was_training)
    return repeats * new_tokens / (time.perf_counter() - start)


def folder_size(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
