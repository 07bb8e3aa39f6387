"""Checkpoint folders on disk: ``checkpoints/step-NNNNNNN`` written atomically (a temporary
folder renamed into place, so an interrupted write never has the final name), read back with
safetensors and ``torch.load(weights_only=True)``, and a corrupt one refused in one line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
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


MANIFEST = "manifest.json"  # sha256 of every other file, written last


class CorruptCheckpoint(DistilleryError):
    """A checkpoint whose files are damaged (an earlier one may still be good)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    checkpoint of ``step``, atomically (a temporary folder, fsynced, checksummed in
    ``manifest.json``, then renamed); keep the newest ``keep``. A failed write (a full disk)
    removes its temporary folder and leaves every earlier checkpoint as it was."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for stem, module in weights.items():
            save_model(module, str(tmp / f"{stem}.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(sums, indent=2), encoding="utf-8")
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistilleryError(
            f"cannot write checkpoint {final} ({exc.strerror or exc}); the earlier checkpoints "
            "are intact: free space (or fix permissions), then --resume"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def corrupt(ckpt: Path, what: str) -> CorruptCheckpoint:
    """The one line for a checkpoint that cannot be read."""
    return CorruptCheckpoint(
        f"checkpoint {ckpt} is corrupt ({what[:160]}); delete it to resume from an earlier one, "
        "or start again without --resume"
    )


STATE_TYPES = {"step": int, "tokens": int, "flops": float, "seconds": float}


def read_state(ckpt: Path, stems: list[str]) -> dict[str, Any]:
    """``state.json`` of a complete, intact checkpoint holding the weight files ``stems``:
    every file matches its checksum (checkpoints older than checksums have no manifest), and
    the progress fields have their types."""
    files = [*CHECKPOINT_FILES, *(f"{s}.safetensors" for s in stems if s != "model")]
    missing = [f for f in files if not (ckpt / f).is_file()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {ckpt} is incomplete (no {', '.join(missing)})")
    try:
        if (ckpt / MANIFEST).is_file():
            sums = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
            bad = [name for name, sha in sums.items() if _sha256(ckpt / name) != sha]
            if bad:
                raise corrupt(ckpt, f"{', '.join(bad)} do not match their checksums")
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise corrupt(ckpt, f"state.json: {exc}") from None
    for key, kind in STATE_TYPES.items():
        value = state.get(key) if isinstance(state, dict) else None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            not ok
            or (kind is int and not isinstance(value, int))
            or not math.isfinite(value)
            or value < 0
        ):
            raise corrupt(ckpt, f"state.json: {key} = {value!r}")
    return state


def read_weights(
    ckpt: Path, weights: Mapping[str, nn.Module], device: torch.device
) -> dict[str, Any]:
    """Load each module's weights (strict) and return the trainer state."""
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    for stem, module in weights.items():
        load_model(module, str(ckpt / f"{stem}.safetensors"), strict=True, device=str(device))
    return trainer_state


def load_newest(
    found: list[Path], load: Callable[[Path], None], say: Callable[[str], None]
) -> Path:
    """``load`` the newest of ``found`` (oldest first) that is intact; a damaged one is said
    (``say``) and the one before it tried. Raises if none is intact."""
    for i in range(len(found) - 1, -1, -1):
        try:
            load(found[i])
            return found[i]
        except CorruptCheckpoint as exc:
            if i == 0:
                raise
            say(f"{exc}: resuming from the one before it, {found[i - 1].name}")
    raise AssertionError("unreachable")
