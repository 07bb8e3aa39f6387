"""Growth operators: make a deeper model from a trained one, without rewriting model code.

- ``grow_layers(model, n, where="top")``: n new layers on top; ``where="interleave"`` puts one
  new layer after each of the first n existing ones;
- ``stack_layers(model)``: StackBERT — the layers copied on top of themselves (n → 2n).

New layers are built like the model's own (a copy of a block, re-initialised with the model's
``_init_weights``). With ``identity=True`` the output projections of their residual branches
start at zero, so each new block adds nothing and the grown model computes exactly what the
model computed before (pre-norm blocks, the usual decoder layout).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from distillery.errors import DistilleryError
from distillery.models.surgery import decoder_layers

# Names of the last projection of a residual branch (attention output, MLP down projection) in
# common HF decoders: Llama/Mistral/Qwen/Gemma, GPT-2, OPT/Phi, GPT-NeoX, T5-style.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj", "c_proj", "out_proj", "fc2", "dense_4h_to_h", "wo")


def _fresh_layer(model: PreTrainedModel, template: nn.Module, identity: bool) -> nn.Module:
    layer = copy.deepcopy(template)
    for module in layer.modules():
        model._init_weights(module)
    if identity:
        outputs = [
            m
            for name, m in layer.named_modules()
            if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS and isinstance(m, nn.Linear)
        ]
        if not outputs:
            raise DistilleryError(
                f"identity growth: no residual output projection ({', '.join(RESIDUAL_OUTPUTS)}) "
                f"in a {type(template).__name__}; grow with identity=False"
            )
        with torch.no_grad():
            for m in outputs:
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
    return layer


def _set_layers(model: PreTrainedModel, layers: list[nn.Module], order: list[int]) -> None:
    """Install ``layers`` as the model's blocks; ``order[i]`` is the old index block i came
    from (for per-layer config lists such as ``layer_types``)."""
    path, old = decoder_layers(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.ModuleList(layers))
    for i, layer in enumerate(layers):  # caches are indexed by the block's position
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    config = model.config
    per_layer = getattr(config, "layer_types", None)
    if isinstance(per_layer, list) and len(per_layer) == len(old):
        config.layer_types = [per_layer[j] for j in order]
    config.num_hidden_layers = len(layers)


def grow_layers(
    model: PreTrainedModel,
    n: int,
    *,
    where: Literal["top", "interleave"] = "top",
    identity: bool = True,
) -> PreTrainedModel:
    """Add ``n`` new blocks (in place; returns ``model``): on top, or one after each of the
    first ``n`` blocks."""
    _, layers = decoder_layers(model)
    old = list(layers)
    if n < 1 or (where == "interleave" and n > len(old)):
        raise DistilleryError(
            f"grow_layers: n={n} must be ≥1 (and ≤{len(old)} to interleave with {len(old)} blocks)"
        )
    sources = layer_sources(len(old), n, where)
    fresh = iter([_fresh_layer(model, old[-1], identity) for _ in range(n)])
    merged = [old[i] if i is not None else next(fresh) for i in sources]
    order, below = [], 0  # a fresh block takes the per-layer config of the old block below it
    for i in sources:
        below = i if i is not None else below
        order.append(below)
    _set_layers(model, merged, order)
    return model


def layer_sources(
    before: int, n: int, where: Literal["top", "interleave", "stack"]
) -> list[int | None]:
    """The blocks after growing ``before`` blocks by ``n`` (``stack``: by ``before``): each the
    index of the old block it is (or copies), None for a fresh one."""
    if where == "stack":
        return [*range(before)] * 2
    if where == "top":
        return [*range(before), *[None] * n]
    out: list[int | None] = []
    for i in range(before):
        out += [i, None] if i < n else [i]
    return out


def stack_layers(model: PreTrainedModel) -> PreTrainedModel:
    """StackBERT: blocks [0..n) followed by copies of themselves, n → 2n (in place)."""
    _, layers = decoder_layers(model)
    old = list(layers)
    _set_layers(model, old + [copy.deepcopy(layer) for layer in old], [*range(len(old))] * 2)
    return model
