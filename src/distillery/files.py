"""Writing files so that a reader never sees half of one: temporary name, then a rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def temp_folder_next_to(final: Path) -> Path:
    """A fresh hidden temporary folder in final's parent, to be published with publish_folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def publish_folder(tmp: Path, final: Path, replace: bool) -> None:
    """Rename a fully written tmp folder to final, so final existing means it is complete.

    If final already exists it is replaced when `replace`, else kept (tmp is discarded).
    """
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():  # a concurrent writer losing the race is fine; anything else isn't
            raise
        shutil.rmtree(tmp, ignore_errors=True)
