"""The one place that owns big-vocabulary memory: logits made and consumed chunk by chunk.

Instead of the model's ``(B, T, V)`` logits, the final hidden states (the output projection's
input, fetched with a forward pre-hook, so no model is rewritten) are projected a chunk of
positions at a time. Each chunk runs under activation checkpointing, so neither the forward nor
the backward pass holds more than one chunk of full-vocabulary logits. Objectives are unchanged:
they are called on each chunk and their sums add up exactly (the loss contract).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distillery.errors import DistilleryError


@contextmanager
def head_inputs(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the model's output projection records its input under ``"hidden"``
    (``(B, T, H)``) and projects nothing, so a forward pass returns empty logits."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured["hidden"] = args[0]
        return (args[0][..., :0, :], *args[1:])  # (B, 0, H): no full-vocabulary logits

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()


def check_plain_head(model: nn.Module, role: str) -> None:
    """Chunking recomputes logits as ``head(hidden)``; refuse models that post-process them."""
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap or (scale is not None and scale != 1.0):
        raise DistilleryError(
            f"the {role} rescales its logits (softcapping/logit_scale), which chunked losses do "
            "not reproduce; set train.logit_chunk_size=0"
        )


def chunked_sums(
    term_fn: Any,
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: nn.Module | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """Σ over chunks of ``term_fn(signals) -> (K,)`` with logits projected per chunk.

    ``student_hidden`` ``(N, H)``, ``teacher_hidden`` ``(N, H_t)``, ``labels``/``mask`` ``(N,)``.
    Logits are cut to the first ``vocab`` columns (padding rows of an embedding are no tokens).
    """

    def one_chunk(
        s_hidden: torch.Tensor, t_hidden: torch.Tensor | None, y: torch.Tensor, m: torch.Tensor
    ) -> torch.Tensor:
        student_logits = student_head(s_hidden)[..., :vocab]  # (C, V)
        teacher_logits = None
        if t_hidden is not None and teacher_head is not None:
            with torch.no_grad():
                teacher_logits = teacher_head(t_hidden)[..., :vocab]  # (C, V)
        signals = {
            "student_logits": student_logits,
            "teacher_logits": teacher_logits,
            "labels": y,
            "mask": m,
        }
        return term_fn(signals)

    total: torch.Tensor | None = None
    for start in range(0, student_hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        t_part = teacher_hidden[part] if teacher_hidden is not None else None
        sums = checkpoint(
            one_chunk, student_hidden[part], t_part, labels[part], mask[part], use_reentrant=False
        )
        total = sums if total is None else total + sums
    assert total is not None, "no positions"
    return total
