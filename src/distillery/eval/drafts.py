"""A student as its teacher's draft model for speculative decoding (DistillSpec, Zhou et al.
2024): how many of its greedy draft tokens the teacher accepts, and how much faster the
teacher's own ``generate`` runs with the student as ``assistant_model``.

Acceptance, written plainly: from a prompt, the student drafts ``k`` tokens greedily and the
teacher, verifying, keeps the longest prefix that equals its own greedy tokens. Both
continuations are made once, ``k_max`` tokens long, and ``accepted(k) = min(k, L)`` where ``L``
is the length of their common prefix; the mean over prompts is reported for k = 1 … k_max
(k for a student that is the teacher).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from distillery.models.heads import cut_vocab


@torch.no_grad()
def greedy_tokens(
    model: nn.Module, prompts: torch.Tensor, steps: int, vocab: int | None = None
) -> torch.Tensor:
    """``steps`` greedy next tokens ``(B, steps)`` after each prompt ``(B, P)`` (same lengths,
    no padding), logits cut to the ``vocab`` real tokens; each step runs the whole sequence
    again (no cache: plain, and the same in every transformers version)."""
    ids = prompts
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]  # (B, V)
        ids = torch.cat([ids, cut_vocab(logits, vocab).argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1] :]


@torch.no_grad()
def acceptance_lengths(
    student: nn.Module,
    teacher: nn.Module,
    prompts: torch.Tensor,
    *,
    k_max: int = 8,
    vocab: int | None = None,
) -> dict[str, Any]:
    """Mean accepted length of the student's greedy drafts of k = 1 … ``k_max`` tokens after
    each prompt ``(B, P)``, verified against the teacher's greedy tokens."""
    models = (student, teacher)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        draft = greedy_tokens(student, prompts, k_max, vocab)  # (B, k_max)
        target = greedy_tokens(teacher, prompts, k_max, vocab)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    agree = (draft == target).long().cumprod(dim=1)  # 1 while the prefix still matches
    common = agree.sum(dim=1)  # (B,): L, the common prefix length
    return {
        "acceptance_length": {
            str(k): float(torch.clamp(common, max=k).float().mean()) for k in range(1, k_max + 1)
        },
        "draft_prompts": int(prompts.shape[0]),
        "draft_prompt_tokens": int(prompts.shape[1]),
    }


def _timed_generate(
    model: nn.Module, prompt: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    return out, time.perf_counter() - start


@torch.no_grad()
def assisted_speedup(
    teacher: nn.Module,
    student: nn.Module,
    prompts: torch.Tensor,
    *,
    new_tokens: int = 32,
    pad_token_id: int = 0,
) -> dict[str, Any]:
    """The teacher's greedy ``generate`` alone and with ``student`` as ``assistant_model``,
    side by side on the same prompts ``(B, P)`` (one at a time, as assisted generation
    needs): tokens per second of each, their ratio, and whether the outputs are identical
    (greedy assisted generation must give the teacher's own tokens)."""
    models = (student, teacher)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=pad_token_id, max_length=None,
    )  # fmt: skip
    alone_s = assisted_s = 0.0
    same = True
    try:
        _timed_generate(teacher, prompts[:1], **kwargs)  # warm-up of both paths
        _timed_generate(teacher, prompts[:1], assistant_model=student, **kwargs)
        for row in range(prompts.shape[0]):
            prompt = prompts[row : row + 1]
            alone, seconds = _timed_generate(teacher, prompt, **kwargs)
            alone_s += seconds
            assisted, seconds = _timed_generate(teacher, prompt, assistant_model=student, **kwargs)
            assisted_s += seconds
            same = same and torch.equal(alone, assisted)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    tokens = prompts.shape[0] * new_tokens
    return {
        "teacher_tokens_per_s": tokens / alone_s,
        "assisted_tokens_per_s": tokens / assisted_s,
        "assisted_speedup": alone_s / assisted_s,
        "assisted_same_tokens": same,
        "assisted_prompts": int(prompts.shape[0]),
        "assisted_new_tokens": new_tokens,
    }


def draft_metrics(
    student: nn.Module,
    teacher: nn.Module,
    val: Any,
    *,
    vocab: int | None,
    device: torch.device,
    prompts: int = 16,
    prompt_tokens: int = 16,
    assisted: bool = False,
    pad_token_id: int = 0,
) -> dict[str, Any]:
    """The student as its teacher's draft on the first ``prompts`` validation blocks (their
    first ``prompt_tokens`` tokens): acceptance lengths, and with ``assisted`` the teacher's
    assisted-generation speed-up on four of them."""
    rows = min(prompts, val.num_blocks)
    ids = val.blocks(range(rows))[:, : min(prompt_tokens, val.seq_len - 1)].to(device)
    out = acceptance_lengths(student, teacher, ids, vocab=vocab)
    if assisted:
        out |= assisted_speedup(teacher, student, ids[:4], pad_token_id=pad_token_id)
    return out
