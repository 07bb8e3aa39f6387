"""The one place that owns big-vocabulary memory: logits made and consumed chunk by chunk.

Instead of the model's ``(B, T, V)`` logits, the final hidden states (the output projection's
input, fetched by ``models.heads.head_inputs``, so no model is rewritten) are projected a chunk of
positions at a time, and each chunk's gradient is taken at once, so no pass holds more than one
chunk of full-vocabulary logits. Objectives are unchanged: they are called on each chunk and
their sums add up exactly (the loss contract).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillery.data.packed import IGNORE_INDEX

Signals = dict[str, torch.Tensor | None]
ChunkGrad = Callable[[Signals, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_COMPILED: dict[Any, ChunkGrad] = {}  # term_fn → its compiled chunk gradient


class _FusedChunks(torch.autograd.Function):
    """Returns a loss whose gradients were already computed, chunk by chunk, in the forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: Any, run: Any):  # type: ignore[override]
        total, sums, grads = run()
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_sums: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # In place: these buffers are ours and used once (no second weight-sized copy).
        grad_weight.mul_(grad_total)
        bias = None if grad_bias.numel() == 0 else grad_bias.mul_(grad_total)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, bias, None


def eager_chunk_grad(term_fn: Any) -> ChunkGrad:
    """``(signals, weights) -> (sums (K,), ∂(weights · sums)/∂student_logits)`` by autograd."""

    def grad(signals: Signals, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student_logits = signals["student_logits"]
        assert student_logits is not None
        with torch.enable_grad():
            student_logits.requires_grad_(True)
            sums = term_fn(signals)  # (K,)
            (grad_logits,) = torch.autograd.grad((weights * sums).sum(), student_logits)
        return sums.detach(), grad_logits

    return grad


def compiled_chunk_grad(term_fn: Any) -> ChunkGrad:
    """The same as ``eager_chunk_grad``, the objectives' elementwise passes fused by
    ``torch.compile`` (compiled once per ``term_fn`` and chunk shape)."""
    if term_fn not in _COMPILED:

        def total(student_logits: torch.Tensor, rest: Signals, weights: torch.Tensor) -> Any:
            sums = term_fn({**rest, "student_logits": student_logits})
            return (weights * sums).sum(), sums

        fused = torch.compile(torch.func.grad_and_value(total, has_aux=True))

        def grad(signals: Signals, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rest = {k: v for k, v in signals.items() if k != "student_logits"}
            grad_logits, (_, sums) = fused(signals["student_logits"], rest, weights)
            return sums, grad_logits

        _COMPILED[term_fn] = grad
    return _COMPILED[term_fn]


def _padded(x: torch.Tensor | None, rows: int, fill: float | int | bool = 0) -> Any:
    """``x`` with rows appended up to ``rows`` (a compiled chunk keeps one shape)."""
    if x is None or x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), fill)
    return torch.cat([x, pad])


def _part(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if x is None else x[part]


def chunked_loss(
    term_fn: Any,
    weights: torch.Tensor,
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int,
    teacher_logits: Callable[[slice, torch.Tensor | None], torch.Tensor] | None = None,
    vocab: int | None = None,
    teacher_mask: torch.Tensor | None = None,
    cut_teacher: bool = True,
    matmul_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_k weights_k · term_k, terms (K,))`` with logits projected a chunk at a time.

    ``term_fn(signals) -> (K,)`` sums; ``student_hidden`` ``(N, H)``, ``labels``/``mask``
    ``(N,)``; ``teacher_logits(part, student_logits)``: the teacher's logits ``(C, V_t)`` of
    the flattened positions ``part`` (``TeacherOutput.chunk_logits``). The gradients of the
    total for the hidden states and the head are computed in the forward pass, a chunk at a
    time (as Liger's fused losses do). Logits are cut to the first ``vocab`` columns (padding
    rows are no tokens), the teacher's too unless ``cut_teacher`` is off (its own vocabulary;
    ``teacher_mask`` ``(N,)``: the positions it predicts). ``matmul_dtype``: the projections'
    dtype (default: the hidden states'), e.g. ``torch.bfloat16`` (fp32 accumulation, objectives
    and head gradient in float32); ``compile``: each chunk's passes fused by ``torch.compile``.
    """
    weight = student_head.weight
    bias = getattr(student_head, "bias", None)
    chunk_grad = (compiled_chunk_grad if compile else eager_chunk_grad)(term_fn)

    def run() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        hidden = student_hidden.detach()
        rows = weight.shape[0] if vocab is None else vocab
        # (V, H) in the matmul dtype (the hidden states' by default: bf16 under autocast), cast
        # once, not per chunk; padding rows beyond the tokenizer's tokens take no part and get
        # no gradient.
        dtype = matmul_dtype or hidden.dtype
        w = weight.detach()[:rows].to(dtype)
        b = bias.detach()[:rows].to(dtype) if bias is not None else None
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        sums = torch.zeros(len(weights), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden[part]  # (C, H)
            n = h.shape[0]
            size = chunk_size if compile else n
            with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
                student_logits = F.linear(_padded(h, size).to(dtype), w, b)  # (C, V)
                teacher_chunk = None
                if teacher_logits is not None:
                    cut = rows if cut_teacher else None  # None: the teacher's own vocabulary
                    teacher_chunk = teacher_logits(part, student_logits[:n])[..., :cut]
            signals = {
                "student_logits": student_logits,
                "teacher_logits": _padded(teacher_chunk, size),
                "labels": _padded(labels[part], size, IGNORE_INDEX),
                "mask": _padded(mask[part], size, False),
                "teacher_mask": _padded(_part(teacher_mask, part), size, False),
            }
            chunk_sums, grad_logits = chunk_grad(signals, weights)  # (K,), (C, V)
            grad_logits = grad_logits[:n]
            # Through the projection by hand, accumulating in place: no (V, H) temporaries.
            grad_hidden[part] = (grad_logits.to(w.dtype) @ w).to(hidden.dtype)
            grad_weight[:rows].addmm_(grad_logits.t().float(), h.float())
            if grad_bias is not None:
                grad_bias[:rows] += grad_logits.float().sum(0)
            sums += chunk_sums.detach().float()
        empty = torch.zeros(0, device=hidden.device)
        saved = (
            grad_hidden,
            grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype) if grad_bias is not None and bias is not None else empty,
        )
        return (weights * sums).sum(), sums, saved

    return _FusedChunks.apply(student_hidden, weight, bias, run)
