"""Checkpoint folders on disk: ``checkpoints/step-NNNNNNN`` written atomically (a temporary
folder renamed into place, so an interrupted write never has the final name), read back with
safetensors and ``torch.load(weights_only=True)``, and a corrupt one refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from distillery.errors import DistilleryError

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt", "state.json")


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint folder (``step-NNNNNNN``) was written at."""
    return int(ckpt.name.removeprefix("step-"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones never get their final name)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def shapes_digest(module: nn.Module) -> str:
    """A short hash of a module's parameter names and shapes."""
    shapes = {k: list(v.shape) for k, v in module.state_dict().items()}
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def write_checkpoint(
    run_dir: Path,
    step: int,
    weights: Mapping[str, nn.Module],
    trainer_state: dict[str, Any],
    state: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write ``weights`` (file stem → module), the trainer state and ``state.json`` as the
    checkpoint of ``step``, atomically; keep the newest ``keep`` checkpoints."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, module in weights.items():
        save_model(module, str(tmp / f"{stem}.safetensors"))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def corrupt(ckpt: Path, what: str) -> DistilleryError:
    """The one line for a checkpoint that cannot be read."""
    return DistilleryError(
        f"checkpoint {ckpt} is corrupt ({what[:160]}); delete it to resume from an earlier one, "
        "or start again without --resume"
    )


def read_state(ckpt: Path, stems: list[str]) -> dict[str, Any]:
    """``state.json`` of a complete checkpoint holding the weight files ``stems``."""
    files = [*CHECKPOINT_FILES, *(f"{s}.safetensors" for s in stems if s != "model")]
    missing = [f for f in files if not (ckpt / f).is_file()]
    if missing:
        raise DistilleryError(f"checkpoint {ckpt} is incomplete (no {', '.join(missing)})")
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise corrupt(ckpt, f"state.json: {exc}") from None


def read_weights(
    ckpt: Path, weights: Mapping[str, nn.Module], device: torch.device
) -> dict[str, Any]:
    """Load each module's weights (strict) and return the trainer state."""
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    for stem, module in weights.items():
        load_model(module, str(ckpt / f"{stem}.safetensors"), strict=True, device=str(device))
    return trainer_state
