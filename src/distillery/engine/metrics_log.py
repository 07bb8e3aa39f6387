"""A run's metrics: one JSON line per record in ``metrics.jsonl`` (rank 0), mirrored to
TensorBoard; on resume, what the interrupted run wrote after its checkpoint is dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery.files import atomic_write_text


class MetricsLog:
    """Appends records for run ``name`` under ``out_dir`` (only where ``enabled``: rank 0)."""

    def __init__(self, out_dir: Path, name: str, *, enabled: bool, tensorboard: bool) -> None:
        self.path, self.name = Path(out_dir) / "metrics.jsonl", name
        self.enabled, self.tensorboard = enabled, tensorboard
        self.resumed_at: int | None = None  # TensorBoard purges events from this step on
        self._tb: Any = None

    def truncate(self, step: int) -> None:
        """Drop metric lines written after checkpoint ``step`` by the run that was interrupted.

        The end-of-run evaluation (``"final": true``) is logged after the last checkpoint.
        """
        self.resumed_at = step + 1
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["step"] < step or (record["step"] == step and not record.get("final")):
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
        atomic_write_text(self.path, "".join(f"{x}\n" for x in kept))

    def clear(self) -> None:
        """A fresh start: no lines of an earlier attempt."""
        if self.enabled and self.path.exists():
            self.path.unlink()

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line and mirror its scalars to TensorBoard."""
        if not self.enabled:
            return
        record = {"run": self.name, **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    log_dir=str(self.path.parent / "tensorboard"), purge_step=self.resumed_at
                )
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(f"{self.name}/{key}", value, record["step"])

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
