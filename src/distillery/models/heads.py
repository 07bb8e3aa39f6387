"""A model's output projection seen from outside: its input captured with a hook, logits made a
chunk of positions at a time, and the vocabulary cut to the tokenizer's real tokens.

Used by the distillation step (student and live teacher), the evaluation and the teacher cache,
so the memory budget and the cut are written once. No model is rewritten: a forward pre-hook
records the head's input and makes the head project nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from distillery.errors import DistilleryError

# Full-vocabulary logits (positions × vocabulary) made at once: 32 MiB of float32, e.g. 32
# positions at 262,144 words. Smaller chunks save little (the head's V×H gradient and weights
# are the floor) and cost time: every chunk reads the head and updates its whole gradient.
CHUNK_LOGITS = 2**23


def cut_vocab(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """``logits`` ``(..., V_table)`` cut to the first ``vocab`` columns: rows of a padded
    embedding table past the tokenizer's tokens are no tokens (None: unchanged)."""
    return logits if vocab is None else logits[..., :vocab]


def chunk_rows(vocab: int, budget: int | None = None) -> int:
    """How many positions' logits over ``vocab`` tokens fit in ``budget`` numbers (default
    ``CHUNK_LOGITS``), at least one."""
    return max(1, (budget or CHUNK_LOGITS) // max(vocab, 1))


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` positions covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


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


def is_plain_head(head: nn.Module, config: Any) -> bool:
    """Whether logits are exactly ``head(hidden)``: a linear head, no softcapping or scaling
    (``logit_scale``: Cohere; ``logits_scaling``: Granite)."""
    scales = (getattr(config, name, None) for name in ("logit_scale", "logits_scaling"))
    return (
        isinstance(head, nn.Linear)
        and not getattr(config, "final_logit_softcapping", None)
        and all(scale is None or scale == 1.0 for scale in scales)
    )


def has_plain_head(model: nn.Module) -> bool:
    """``is_plain_head`` of a model's own output projection."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return head is not None and is_plain_head(head, getattr(model, "config", None))


def check_plain_head(model: nn.Module, role: str) -> None:
    """Chunking recomputes logits as ``head(hidden)``; refuse models that post-process them."""
    if not has_plain_head(model):
        raise DistilleryError(
            f"the {role}'s logits are not a plain linear projection of its last hidden states "
            "(a non-linear head, softcapping or logit_scale), which chunked losses do not "
            "reproduce; set train.logit_chunk_size=0"
        )


def hidden_and_head(
    model: nn.Module, input_ids: torch.Tensor, **kwargs: Any
) -> tuple[Any, torch.Tensor]:
    """(the model's outputs without logits, its final hidden states ``(N, H)``) for a batch."""
    with head_inputs(model) as captured:
        out = model(input_ids=input_ids, **kwargs)
    return out, captured["hidden"].reshape(input_ids.numel(), -1)
