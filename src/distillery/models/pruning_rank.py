"""Importance of a decoder's parts, measured with forward hooks on calibration batches (no model
is rewritten):

- width, as in Minitron (Muralidharan et al. 2024): the mean absolute activation of each MLP
  neuron (the input of the MLP's output projection), of each attention head (the head's slice
  of the input of the attention's output projection) and of each embedding channel (summed
  over the outputs of every normalisation layer of the residual stream);
- depth, as in Gromov et al. 2024: the mean angular distance ``arccos(cos(x_in, x_out)) / π``
  between a block's input and output hidden states; a block that barely turns the residual
  stream matters least.

The block layouts the pruner knows (Llama / Qwen2 / Gemma 3 / Mistral-style split projections,
Phi-3's fused ``qkv_proj`` and ``gate_up_proj``, GPT-2's Conv1D) are found structurally, from
the module paths inside a block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from distillery.errors import DistilleryError
from distillery.models.surgery import decoder_layers

# Inside a block: module path -> (role of its output features, role of its input features).
# Roles: "hidden" (embedding channels), "q"/"kv" (query / key-value head rows), "qkv" (fused
# q, k, v rows), "mlp" (neurons), "gate_up" (fused gate and up rows).
LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "split": {
        "self_attn.q_proj": ("q", "hidden"),
        "self_attn.k_proj": ("kv", "hidden"),
        "self_attn.v_proj": ("kv", "hidden"),
        "self_attn.o_proj": ("hidden", "q"),
        "mlp.gate_proj": ("mlp", "hidden"),
        "mlp.up_proj": ("mlp", "hidden"),
        "mlp.down_proj": ("hidden", "mlp"),
    },
    "fused": {
        "self_attn.qkv_proj": ("qkv", "hidden"),
        "self_attn.o_proj": ("hidden", "q"),
        "mlp.gate_up_proj": ("gate_up", "hidden"),
        "mlp.down_proj": ("hidden", "mlp"),
    },
    "conv1d": {
        "attn.c_attn": ("qkv", "hidden"),
        "attn.c_proj": ("hidden", "q"),
        "mlp.c_fc": ("mlp", "hidden"),
        "mlp.c_proj": ("hidden", "mlp"),
    },
}


@dataclass
class Layout:
    """Where a decoder's parts are: its blocks, the modules of one block, their roles."""

    layers_path: str  # e.g. "model.layers"
    layers: nn.ModuleList
    roles: dict[str, tuple[str, str]]  # module path in a block -> (out role, in role)
    attn_out: str  # the module whose input is the heads' outputs, concatenated
    mlp_out: str  # the module whose input is the MLP's neurons
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    neurons: int


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def find_layout(model: nn.Module) -> Layout:
    """The layout of a decoder ``model``; one clear error for a family the pruner cannot cut."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    try:
        path, layers = decoder_layers(model)
    except DistilleryError:
        layers, path = None, ""
    names = set(dict(layers[0].named_modules())) if layers is not None and len(layers) else set()
    kinds = [kind for kind, roles in LAYOUTS.items() if set(roles) <= names]
    if not kinds or getattr(config, "is_encoder_decoder", False):
        raise DistilleryError(
            f"cannot prune a {family!r} model: only decoders with Llama/Qwen2/Gemma3/Mistral-style "
            "q/k/v/o and gate/up/down projections, Phi-3's fused qkv/gate_up or GPT-2's Conv1D "
            "blocks are supported"
        )
    roles = LAYOUTS[kinds[0]]
    block = dict(layers[0].named_modules())
    attn_out = next(p for p, (out, inp) in roles.items() if inp == "q")
    mlp_out = next(p for p, (out, inp) in roles.items() if inp == "mlp")
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = _in_features(block[attn_out]) // heads
    return Layout(
        path, layers, roles, attn_out, mlp_out, hidden, heads, kv_heads, head_dim,
        _in_features(block[mlp_out]),
    )  # fmt: skip


@dataclass
class Importance:
    """Mean activations over ``tokens`` calibration tokens."""

    heads: torch.Tensor  # (L, heads): mean |output| of each attention head
    neurons: torch.Tensor  # (L, neurons): mean |activation| of each MLP neuron
    channels: torch.Tensor  # (hidden,): mean |normalised activation|, summed over the norms
    layers: torch.Tensor  # (L,): mean angular distance between a block's input and output
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "layers": [round(float(x), 6) for x in self.layers],
            "heads": [[round(float(x), 6) for x in row] for row in self.heads],
        }


def _norms(model: nn.Module, layout: Layout) -> list[nn.Module]:
    """Normalisation layers of the residual stream: leaf modules with a ``(hidden,)`` weight
    outside attention (Gemma 3's per-head q/k norms are inside it)."""
    attn = layout.attn_out.rsplit(".", 1)[0]
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        inside_attn = f".{attn}." in f".{name}."
        if (
            not list(module.children())
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 1
            and weight.shape[0] == layout.hidden
            and not inside_attn
        ):
            found.append(module)
    return found


def _first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def measure_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> Importance:
    """Run ``model`` on each batch of token ids ``(B, T)`` with hooks that sum the activations
    above; return their means."""
    layout = find_layout(model)
    n = len(layout.layers)
    heads = torch.zeros(n, layout.heads, dtype=torch.float64)
    neurons = torch.zeros(n, layout.neurons, dtype=torch.float64)
    channels = torch.zeros(layout.hidden, dtype=torch.float64)
    angles = torch.zeros(n, dtype=torch.float64)
    handles = []

    def on_block(i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x_in, x_out = _first(args, kwargs).double(), _output(out).double()
            cos = nn.functional.cosine_similarity(x_in, x_out, dim=-1).clamp(-1.0, 1.0)
            angles[i] += (torch.arccos(cos) / math.pi).sum()

        return hook

    def on_heads(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].double()  # (B, T, heads * head_dim)
            per_head = x.reshape(*x.shape[:-1], layout.heads, layout.head_dim).abs().mean(-1)
            heads[i] += per_head.reshape(-1, layout.heads).sum(0)

        return hook

    def on_neurons(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            neurons[i] += args[0].double().abs().reshape(-1, layout.neurons).sum(0)

        return hook

    def on_norm(_m: nn.Module, _args: tuple, out: Any) -> None:
        channels.add_(_output(out).double().abs().reshape(-1, layout.hidden).sum(0))

    for i, block in enumerate(layout.layers):
        modules = dict(block.named_modules())
        handles.append(block.register_forward_hook(on_block(i), with_kwargs=True))
        handles.append(modules[layout.attn_out].register_forward_pre_hook(on_heads(i)))
        handles.append(modules[layout.mlp_out].register_forward_pre_hook(on_neurons(i)))
    handles += [norm.register_forward_hook(on_norm) for norm in _norms(model, layout)]
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not tokens:
        raise DistilleryError("no calibration tokens: give calibration text")
    return Importance(heads / tokens, neurons / tokens, channels / tokens, angles / tokens, tokens)
