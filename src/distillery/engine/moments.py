"""AdamW's moments carried from one run to the next, through a change of shape.

A phase that shrinks, grows or continues another run's model can start from that run's
optimizer state instead of zero moments (``train.save_moments`` writes them; the next run's
``train.moments_from`` reads them). Each parameter of the new model takes the first and second
moments and the step count of the parameter it was made from — the same name, the teacher layer
``init_from_teacher`` copied (``layer_map``), the block a stacked copy duplicates — and a block
created from nothing (grown layers) starts with none, as AdamW starts every parameter.

The file is ``optimizer-moments.safetensors`` in the run folder: ``exp_avg/NAME``,
``exp_avg_sq/NAME`` and ``step/NAME`` per parameter, and the model's block path and count as
metadata. Not for sharded (FSDP) runs: their state lives in slices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from distillery.config import RunConfig
from distillery.errors import DistilleryError
from distillery.models.growth import layer_sources
from distillery.models.surgery import decoder_layers, every_other, source_name

MOMENTS_FILE = "optimizer-moments.safetensors"
_KEYS = ("exp_avg", "exp_avg_sq", "step")


def save_moments(optimizer: torch.optim.Optimizer, model: nn.Module, folder: Path) -> Path:
    """Write the moments of ``model``'s parameters to ``folder/optimizer-moments.safetensors``
    (atomically: a temporary file renamed into place)."""
    path, layers = decoder_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        if all(key in state for key in _KEYS):
            for key in _KEYS:
                value = torch.as_tensor(state[key]).detach().to("cpu", torch.float32)
                tensors[f"{key}/{name}"] = value.contiguous().clone()
    target = Path(folder) / MOMENTS_FILE
    tmp = target.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"layer_path": path, "layers": str(len(layers))})
    os.replace(tmp, target)
    return target


def layer_origins(
    before: int, *, layer_map: Sequence[int] | None = None, grown: Sequence[int | None] = ()
) -> list[int | None]:
    """For each block of the new model, the source block its moments come from (None: new).

    ``before``: the source model's blocks; ``layer_map``: the blocks ``init_from_teacher`` copied
    (block i ← ``layer_map[i]``); ``grown``: the blocks after growing, each the index (in the
    model before growing) it copies, None for a fresh one (``models.growth.layer_sources``).
    """
    origins: list[int | None] = list(layer_map) if layer_map is not None else list(range(before))
    if grown:
        origins = [origins[i] if i is not None else None for i in grown]
    return origins


def carry_moments(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    source: Path,
    *,
    init: str | Sequence[int] | None = None,
    grow: tuple[str, int] | None = None,
) -> tuple[int, int]:
    """``load_moments`` with the origins a run's model spec implies: ``init`` as
    ``model.init_from_teacher`` (``every_other`` or a list; the source is then the teacher's
    run), ``grow`` as (``grow.kind``, ``grow.layers``) applied after it."""
    file = moments_file(source)
    with safe_open(str(file), framework="pt") as f:
        source_layers = int((f.metadata() or {}).get("layers", "0"))
    now = len(decoder_layers(model)[1])
    kind, added = grow if grow is not None else ("top", 0)
    before = now // 2 if kind == "stack" else now - added
    if init is None and before != source_layers:
        raise DistilleryError(
            f"train.moments_from: {file} holds the moments of {source_layers} blocks, but the "
            f"model had {before} before growing; give the model's own earlier run"
        )
    layer_map = every_other(source_layers, before) if init == "every_other" else init
    grown = layer_sources(before, added, kind) if grow is not None else ()  # type: ignore[arg-type]
    origins = layer_origins(
        source_layers, layer_map=None if layer_map is None else list(layer_map), grown=grown
    )
    return load_moments(optimizer, model, file, origins)


def carry_run_moments(cfg: RunConfig, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """A run's ``train.moments_from``, with the origins its model spec implies."""
    assert cfg.train.moments_from is not None
    grow = cfg.model.grow
    carry_moments(
        optimizer,
        model,
        cfg.train.moments_from,
        init=cfg.model.init_from_teacher if cfg.teacher_paths else None,
        grow=(grow.kind, grow.layers or 0) if grow is not None else None,
    )


def moments_file(source: Path) -> Path:
    """The moments file of a run folder (or the file itself); one clear error if missing."""
    file = Path(source) / MOMENTS_FILE if Path(source).is_dir() else Path(source)
    if not file.is_file():
        raise DistilleryError(
            f"train.moments_from: {file} does not exist; train the source run with "
            "train.save_moments: true"
        )
    return file


def load_moments(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    source: Path,
    origins: Sequence[int | None] | None = None,
) -> tuple[int, int]:
    """Set the AdamW state of ``model``'s parameters from ``source`` (a run folder or the file),
    block i from source block ``origins[i]`` (default: the same block); returns (parameters
    carried, parameters starting afresh). Raises one clear error for a missing file or a
    source of another shape."""
    file = moments_file(source)
    path, layers = decoder_layers(model)
    origins = list(origins) if origins is not None else list(range(len(layers)))
    if len(origins) != len(layers):
        raise DistilleryError(
            f"moments: {len(origins)} layer origins for a model of {len(layers)} blocks"
        )
    carried = fresh = 0
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        src_path, names = meta.get("layer_path", path), set(f.keys())
        for name, p in model.named_parameters():
            src = source_name(name, path, src_path, origins)
            if src is None or f"exp_avg/{src}" not in names:
                fresh += 1
                continue
            avg, avg_sq = f.get_tensor(f"exp_avg/{src}"), f.get_tensor(f"exp_avg_sq/{src}")
            if avg.shape != p.shape:
                raise DistilleryError(
                    f"train.moments_from: {src} has shape {tuple(avg.shape)} in {file}, "
                    f"but {name} is {tuple(p.shape)}: the source run must be the model's own "
                    "(or its teacher's, with the same widths)"
                )
            optimizer.state[p] = {
                "step": f.get_tensor(f"step/{src}").reshape(()).clone(),
                "exp_avg": avg.to(p.device, p.dtype),
                "exp_avg_sq": avg_sq.to(p.device, p.dtype),
            }
            carried += 1
    return carried, fresh
