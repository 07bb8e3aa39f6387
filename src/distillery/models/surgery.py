"""Layer surgery without rewriting models: copy tensors by name between state dicts."""

from __future__ import annotations

import re

import torch
from torch import nn

from distillery.errors import DistilleryError


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ``ModuleList`` of a model's transformer blocks (e.g. ``model.layers``).

    Found structurally: the longest ``ModuleList`` whose length is the config's layer count.
    """
    n_layers = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers
    ]
    if not found:
        raise DistilleryError(
            f"cannot find the transformer layers of a {type(model).__name__} "
            "(no ModuleList of num_hidden_layers blocks)"
        )
    return min(found, key=lambda item: len(item[0]))


def every_other(n_teacher_layers: int, n_student_layers: int) -> list[int]:
    """DistilBERT's map: student layer i ← teacher layer 2i."""
    layers = [2 * i for i in range(n_student_layers)]
    if layers and layers[-1] >= n_teacher_layers:
        raise DistilleryError(
            f"every_other needs a teacher with ≥{layers[-1] + 1} layers for a "
            f"{n_student_layers}-layer student; the teacher has {n_teacher_layers}: "
            "give model.init_from_teacher as an explicit list"
        )
    return layers


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module, layer_map: list[int]) -> None:
    """Copy embeddings, norms, head and teacher layer ``layer_map[i]`` into student layer ``i``.

    Needs the same architecture family and widths; raises one clear error otherwise.
    """
    s_path, s_layers = decoder_layers(student)
    t_path, t_layers = decoder_layers(teacher)
    if len(layer_map) != len(s_layers):
        raise DistilleryError(
            f"init_from_teacher lists {len(layer_map)} layers but the student has {len(s_layers)}"
        )
    bad = [i for i in layer_map if not 0 <= i < len(t_layers)]
    if bad:
        raise DistilleryError(
            f"init_from_teacher: teacher has layers 0..{len(t_layers) - 1}, not {bad}"
        )
    teacher_state = teacher.state_dict()
    pattern = re.compile(rf"^{re.escape(s_path)}\.(\d+)\.(.*)$")
    for name, tensor in student.state_dict().items():
        match = pattern.match(name)
        source = (
            f"{t_path}.{layer_map[int(match.group(1))]}.{match.group(2)}"
            if match
            else name.replace(s_path, t_path, 1)
        )
        if source not in teacher_state or teacher_state[source].shape != tensor.shape:
            shape = tuple(teacher_state[source].shape) if source in teacher_state else "missing"
            raise DistilleryError(
                f"cannot initialise the student from the teacher: {name} {tuple(tensor.shape)} "
                f"vs teacher {source} {shape}; student and teacher widths must match"
            )
        tensor.copy_(teacher_state[source])
