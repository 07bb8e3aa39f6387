"""Interventions on HF models through forward hooks: read or overwrite a block's hidden states.

One mechanism for any model whose blocks sit in a ``ModuleList`` (found by
``surgery.decoder_layers``); no model code is rewritten. Layers use the HF ``hidden_states``
numbering: 0 is the input of block 0 (the embedding output, after any position embeddings the
model adds) and i ≥ 1 the output of block i − 1. Unlike HF's ``output_hidden_states``, whose last
entry is taken after the final norm, layer L here is the raw output of the last block.

Hooks are registered first in line (``prepend=True``), so HF's own output-capturing hooks (installed
lazily the first time ``output_hidden_states`` is asked for) see the intervened states, and they
are always removed when the context exits, also on an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from distillery.errors import DistilleryError
from distillery.models.surgery import decoder_layers

PositionSampling = Literal["all", "span", "fraction"]

# (the block's hidden states) -> replacement, or None to leave them as they are.
_StateFn = Callable[[torch.Tensor], torch.Tensor | None]


def num_layers(model: nn.Module) -> int:
    """The number of blocks L; valid layer indices are ``0..L``."""
    return len(decoder_layers(model)[1])


def check_layer(model: nn.Module, layer: int) -> int:
    """``layer`` if it names a hidden state of ``model`` (``0..L``), else one clear error."""
    n = num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise DistilleryError(
            f"layer {layer!r} is out of range for a {type(model).__name__} with {n} blocks: "
            f"choose 0..{n} (0 = embeddings, i = output of block i)"
        )
    return layer


def _hook_state(model: nn.Module, layer: int, fn: _StateFn) -> RemovableHandle:
    """Hook ``fn`` onto the hidden states of ``layer``: block 0's input for 0, else the output
    (first element if a tuple) of block ``layer − 1``. Returns the hook's handle."""
    blocks = decoder_layers(model)[1]
    check_layer(model, layer)

    if layer == 0:

        def pre_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            if "hidden_states" in kwargs:
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})
            raise DistilleryError(
                f"{type(module).__name__} was called without hidden states as its first "
                "argument or as hidden_states=; layer 0 cannot be hooked"
            )

        return blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        raise DistilleryError(
            f"{type(module).__name__} returned {type(output).__name__}, not a tensor or a tuple "
            "starting with one; its hidden states cannot be hooked"
        )

    return blocks[layer - 1].register_forward_hook(hook, prepend=True)


@contextmanager
def _hooked(model: nn.Module, hooks: Sequence[tuple[int, _StateFn]]) -> Iterator[None]:
    """Register ``(layer, fn)`` hooks for the body of the ``with``; always removes them."""
    handles: list[RemovableHandle] = []
    try:
        for layer, fn in hooks:
            handles.append(_hook_state(model, layer, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_states(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden states ``(B, T, H)`` of ``layers`` during forwards run in the ``with``.

    Yields a dict ``layer -> tensor``, filled by the forward (a later forward overwrites it).
    The tensors are the graph's own (not detached): under grad they carry gradients.
    """
    layers = [check_layer(model, layer) for layer in layers]
    states: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> _StateFn:
        def record(hidden: torch.Tensor) -> None:
            states[layer] = hidden

        return record

    with _hooked(model, [(layer, recorder(layer)) for layer in dict.fromkeys(layers)]):
        yield states


@contextmanager
def interchange(
    model: nn.Module, layer: int, positions: torch.Tensor, source_states: torch.Tensor
) -> Iterator[None]:
    """During forwards in the ``with``, set ``layer``'s states at ``positions`` to the source's.

    ``positions`` is a bool mask ``(B, T)``, ``source_states`` ``(B, T, H)`` (e.g. recorded by
    ``capture_states`` on another input). The swap is a ``torch.where``: gradients flow through
    the kept positions and, if ``source_states`` requires grad, into it at the swapped ones.
    """
    check_layer(model, layer)
    if positions.dtype != torch.bool or positions.ndim != 2:
        raise DistilleryError(
            f"interchange positions must be a bool mask (B, T), not {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    if source_states.ndim != 3 or source_states.shape[:2] != positions.shape:
        raise DistilleryError(
            f"interchange source states {tuple(source_states.shape)} do not match positions "
            f"{tuple(positions.shape)}: expected (B, T, H) with the mask's B and T"
        )

    def swap(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape != source_states.shape:
            raise DistilleryError(
                f"interchange at layer {layer}: the model's states are {tuple(hidden.shape)} but "
                f"the source states are {tuple(source_states.shape)}"
            )
        at = positions.to(hidden.device)[..., None]
        return torch.where(at, source_states.to(device=hidden.device, dtype=hidden.dtype), hidden)

    with _hooked(model, [(layer, swap)]):
        yield


def sample_positions(
    shape: tuple[int, int] | torch.Size,
    how: PositionSampling = "fraction",
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A bool mask ``(B, T)`` of positions to intervene on.

    ``all``: every position; ``fraction``: each position independently with probability
    ``fraction``; ``span``: per row one contiguous run of ``max(1, round(fraction·T))`` positions
    at a uniformly random start.
    """
    if len(shape) != 2:
        raise DistilleryError(f"sample_positions needs a shape (B, T), not {tuple(shape)}")
    b, t = int(shape[0]), int(shape[1])
    draw_on = generator.device if generator is not None else torch.device("cpu")
    if how == "all":
        return torch.ones(b, t, dtype=torch.bool, device=device)
    if how not in ("span", "fraction"):
        raise DistilleryError(
            f"unknown position sampling {how!r}; choose one of: all, span, fraction"
        )
    if not 0.0 < fraction <= 1.0:
        raise DistilleryError(f"sample_positions fraction must be in (0, 1], not {fraction}")
    if how == "fraction":
        draws = torch.rand(b, t, generator=generator, device=draw_on)
        return (draws < fraction).to(device)
    length = min(t, max(1, round(fraction * t)))
    starts = torch.randint(0, t - length + 1, (b, 1), generator=generator, device=draw_on)
    index = torch.arange(t, device=draw_on)[None, :]
    return ((index >= starts) & (index < starts + length)).to(device)
