"""Layer surgery without rewriting models: copy tensors by name between state dicts."""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def source_name(
    name: str, path: str, source_path: str, origins: Sequence[int | None]
) -> str | None:
    """The name in the source model of parameter ``name``: in block ``i`` (under ``path``) that
    of source block ``origins[i]`` (under ``source_path``; None: a new block, no source), the
    rest (embeddings, norms, head) the same name under ``source_path``."""
    match = re.match(rf"^{re.escape(path)}\.(\d+)\.(.*)$", name)
    if not match:
        return name.replace(path, source_path, 1)
    origin = origins[int(match.group(1))]
    return None if origin is None else f"{source_path}.{origin}.{match.group(2)}"


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
    for name, tensor in student.state_dict().items():
        source = str(source_name(name, s_path, t_path, layer_map))  # every block has a source
        if source not in teacher_state or teacher_state[source].shape != tensor.shape:
            shape = tuple(teacher_state[source].shape) if source in teacher_state else "missing"
            raise DistilleryError(
                f"cannot initialise the student from the teacher: {name} {tuple(tensor.shape)} "
                f"vs teacher {source} {shape}; student and teacher widths must match"
            )
        tensor.copy_(teacher_state[source])
