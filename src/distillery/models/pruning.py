"""A student cut out of its teacher (Minitron, Muralidharan et al. 2024; Gromov et al. 2024):
keep the most important layers, attention heads, MLP neurons and embedding channels
(``pruning_rank.measure_importance``) and slice the weights to them.

Each kept block keeps its *own* most important heads and neurons (the same number in every
block, as one config says). Under grouped-query attention each key/value group keeps the same
number of its query heads and every key/value head stays. Embedding channels are one set for
the whole residual stream. Removing a head or a neuron is exact: the pruned model computes
what the teacher computes with that head's output or that neuron's activation set to zero.
Removing a channel also changes what each normalisation layer divides by (the root mean
square over fewer channels); no correction is applied, as in Minitron.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from distillery.errors import DistilleryError
from distillery.models.pruning_rank import Importance, Layout, find_layout


@dataclass
class Shape:
    """A target shape; None keeps the teacher's."""

    layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None


@dataclass
class Plan:
    """What is kept, in the teacher's indices (sorted)."""

    layers: list[int]
    channels: torch.Tensor  # (hidden',)
    heads: list[list[int]]  # per kept layer: its query heads
    kv_heads: list[list[int]]  # per kept layer: its key/value heads
    neurons: list[torch.Tensor]  # per kept layer: (neurons',)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing index order (ties: lower index)."""
    order = torch.sort(-scores, stable=True).indices
    return torch.sort(order[:k]).values


def _check(shape: Shape, layout: Layout) -> None:
    have = {
        "layers": len(layout.layers),
        "hidden_size": layout.hidden,
        "num_attention_heads": layout.heads,
        "intermediate_size": layout.neurons,
    }
    for field, full in have.items():
        want = getattr(shape, field)
        if want is not None and not 1 <= want <= full:
            raise DistilleryError(
                f"target.{field}={want}: must be between 1 and the teacher's {full}"
            )
    heads = shape.num_attention_heads
    if heads is not None and layout.kv_heads != layout.heads and heads % layout.kv_heads:
        raise DistilleryError(
            f"target.num_attention_heads={heads}: the teacher has {layout.kv_heads} key/value "
            f"groups (grouped-query attention), so the heads must be a multiple of "
            f"{layout.kv_heads}"
        )


def plan_pruning(importance: Importance, layout: Layout, shape: Shape) -> Plan:
    """Keep the most important of each part, down to ``shape``."""
    _check(shape, layout)
    n_layers = len(layout.layers)
    layers = _top(importance.layers, shape.layers or n_layers).tolist()
    channels = _top(importance.channels, shape.hidden_size or layout.hidden)
    n_heads = shape.num_attention_heads or layout.heads
    n_neurons = shape.intermediate_size or layout.neurons
    heads, kv_heads, neurons = [], [], []
    for i in layers:
        scores = importance.heads[i]
        if layout.kv_heads == layout.heads:  # multi-head attention: a head goes with its k, v
            keep = _top(scores, n_heads).tolist()
            heads.append(keep)
            kv_heads.append(keep)
        else:  # each group keeps its best n_heads / groups query heads
            size, per = layout.heads // layout.kv_heads, n_heads // layout.kv_heads
            keep = [
                g * size + int(h) for g in range(layout.kv_heads)
                for h in _top(scores[g * size : (g + 1) * size], per)
            ]  # fmt: skip
            heads.append(keep)
            kv_heads.append(list(range(layout.kv_heads)))
        neurons.append(_top(importance.neurons[i], n_neurons))
    return Plan(layers, channels, heads, kv_heads, neurons)


def _rows(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    """Feature indices of ``heads`` in a projection whose heads are ``head_dim`` wide."""
    return torch.tensor(
        [offset + h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long
    )


def _role_index(role: str, plan: Plan, layer: int, layout: Layout) -> torch.Tensor:
    """The kept feature indices of one role in kept layer ``layer``."""
    hd = layout.head_dim
    if role == "hidden":
        return plan.channels
    if role == "q":
        return _rows(plan.heads[layer], hd)
    if role == "kv":
        return _rows(plan.kv_heads[layer], hd)
    if role == "qkv":
        q_size, kv_size = layout.heads * hd, layout.kv_heads * hd
        kv = plan.kv_heads[layer]
        parts = [
            _rows(plan.heads[layer], hd),
            _rows(kv, hd, q_size),
            _rows(kv, hd, q_size + kv_size),
        ]
        return torch.cat(parts)
    if role == "mlp":
        return plan.neurons[layer]
    if role == "gate_up":
        return torch.cat([plan.neurons[layer], layout.neurons + plan.neurons[layer]])
    raise ValueError(role)


def _pruned_config(model: PreTrainedModel, layout: Layout, plan: Plan) -> object:
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(plan.layers)
    config.hidden_size = len(plan.channels)
    config.num_attention_heads = len(plan.heads[0]) if plan.heads else layout.heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = len(plan.kv_heads[0]) if plan.kv_heads else layout.kv_heads
    width = len(plan.neurons[0]) if plan.neurons else layout.neurons
    setattr(
        config, "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner", width
    )
    config.head_dim = layout.head_dim  # read by the split/fused families; GPT-2 derives its own
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layout.layers):
        config.layer_types = [types[i] for i in plan.layers]
    return config


def _cut(
    tensor: torch.Tensor, roles: tuple[str, ...], index: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``tensor`` with dim ``d`` cut to ``index[roles[d]]``."""
    for dim, role in enumerate(roles):
        tensor = tensor.index_select(dim, index[role])
    return tensor


def _source(name: str, layout: Layout, plan: Plan) -> tuple[str, int | None, str]:
    """(the teacher's tensor name, the kept layer index or None, the path inside the block)."""
    match = re.match(rf"^{re.escape(layout.layers_path)}\.(\d+)\.(.*)$", name)
    if match is None:
        return name, None, name
    layer = int(match.group(1))
    return f"{layout.layers_path}.{plan.layers[layer]}.{match.group(2)}", layer, match.group(2)


@torch.no_grad()
def prune_model(
    model: PreTrainedModel, importance: Importance, shape: Shape
) -> tuple[PreTrainedModel, Plan]:
    """A new model of ``model``'s class cut to ``shape`` by ``importance``, and what it kept."""
    layout = find_layout(model)
    plan = plan_pruning(importance, layout, shape)
    pruned = type(model)(_pruned_config(model, layout, plan)).to(torch.float32)
    teacher = model.state_dict()
    new_state = {}
    modules = dict(model.named_modules())
    for name, target in pruned.state_dict().items():
        source, layer, inner = _source(name, layout, plan)
        tensor = teacher[source]
        module_path, kind = inner.rsplit(".", 1) if "." in inner else ("", inner)
        roles_of = layout.roles.get(module_path) if layer is not None else None
        if roles_of is not None:
            out_role, in_role = roles_of
            conv = isinstance(modules[source.rsplit(".", 1)[0]], Conv1D)
            roles = (
                (out_role,)
                if kind == "bias"
                else ((in_role, out_role) if conv else (out_role, in_role))
            )
            index = {r: _role_index(r, plan, layer, layout) for r in set(roles)}
            tensor = _cut(tensor, roles, index)
        elif tensor.shape != target.shape:  # embeddings, norms, head: channels on the last dim
            if tensor.shape[-1] != layout.hidden:
                raise _mismatch(model, name, tensor, target)
            tensor = tensor.index_select(tensor.dim() - 1, plan.channels)
        if tensor.shape != target.shape:
            raise _mismatch(model, name, tensor, target)
        new_state[name] = tensor.clone()
    pruned.load_state_dict(new_state, strict=True)
    pruned.tie_weights()
    return pruned, plan


def _mismatch(
    model: nn.Module, name: str, got: torch.Tensor, want: torch.Tensor
) -> DistilleryError:
    family = getattr(model.config, "model_type", type(model).__name__)
    return DistilleryError(
        f"cannot prune this {family!r} model to the target: its {name} would be "
        f"{tuple(got.shape)} but the smaller model needs {tuple(want.shape)} (a family that "
        "fixes head_dim = hidden_size / heads, such as GPT-2, must keep that ratio)"
    )
