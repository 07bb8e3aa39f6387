"""Seeded, batched, KV-cached sampling from a causal LM (temperature, top-p, max new tokens).

Written as a small loop over ``model(input_ids, past_key_values=..., use_cache=True)`` rather
than ``generate``, so that each row samples with its own ``torch.Generator`` (``row_generator``:
seeded from (seed, step, row)): a row's tokens then depend on its prompt, its seed and the
model, not on the global RNG, the other rows or the batch size (up to floating-point
differences between batch shapes). Prompts are left-padded; the attention mask hides the
padding and position ids count real tokens only, so a batched greedy run equals row-by-row
runs (a test checks it).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.models.heads import cut_vocab


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: ``temperature`` 0 is greedy (argmax); ``top_p`` < 1 keeps the
    smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 0:
            raise DistilleryError(
                f"sampling needs temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 0 "
                f"(got {self.temperature}, {self.top_p}, {self.max_new_tokens})"
            )


def row_seed(seed: int, step: int, row: int) -> int:
    """A 63-bit seed from (seed, step, row), well mixed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, step, row]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def row_generator(seed: int, step: int, row: int, device: torch.device | str = "cpu"):
    """A ``torch.Generator`` on ``device`` seeded by ``row_seed``."""
    return torch.Generator(device=device).manual_seed(row_seed(seed, step, row))


def next_tokens(
    logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row ``(B,)`` from last-position logits ``(B, V)`` (float32)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (B, V)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        sorted_p = torch.where(before < sampling.top_p, sorted_p, 0.0)  # the top one always kept
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    out = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(out)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids ``(B, P)``, attention mask ``(B, P)``) of prompts left-padded to the longest."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DistilleryError("generation needs at least one prompt, each of at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache (``cache`` in newer transformers)."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    generators: Sequence[torch.Generator],
    *,
    pad_token_id: int,
    stop_ids: Sequence[int] = (),
    vocab: int | None = None,
    max_new: Sequence[int] | None = None,
) -> list[list[int]]:
    """The new tokens of each row (a stop token, when drawn, is the last), sampled with its own
    generator. ``max_new``: a per-row cap below ``sampling.max_new_tokens``; ``vocab`` cuts
    padded embedding rows. The model runs in eval mode and is put back as it was."""
    if len(generators) != len(prompts):
        raise ValueError("one generator per prompt")
    device = next(model.parameters()).device
    caps = [sampling.max_new_tokens] * len(prompts) if max_new is None else list(max_new)
    caps = [min(c, sampling.max_new_tokens) for c in caps]
    ids, mask = left_pad(prompts, pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): real tokens count from 0
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    new: list[list[int]] = [[] for _ in prompts]
    done = [c <= 0 for c in caps]
    was_training = model.training
    model.eval()
    try:
        cache_arg = _cache_argument(model)
        params = inspect.signature(model.forward).parameters
        keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep
        )
        while not all(done):
            logits = cut_vocab(out.logits[:, -1], vocab)  # (B, V)
            token = next_tokens(logits, sampling, generators)  # (B,)
            stopped = torch.isin(token, stops).tolist() if stops.numel() else [False] * len(new)
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    new[i].append(t)
                    done[i] = stopped[i] or len(new[i]) >= caps[i]
            if all(done):
                break
            token = torch.where(torch.tensor(done, device=device), pad_token_id, token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_arg: _cache_of(out)},
            )
    finally:
        model.train(was_training)
    return new
