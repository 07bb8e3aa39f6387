"""Reports: ``summary.json``, a Markdown report and PNG loss curves from run folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery.files import atomic_write_text, write_json


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``run_dir/metrics.jsonl`` (empty if there are none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption
    return records


def plot_loss_curves(curves: dict[str, list[dict[str, Any]]], dest: Path) -> Path:
    """Training loss against step and against FLOPs, one line per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in curves.items():
        train = [r for r in records if "ce" in r]  # the task loss, whatever else was mixed in
        if not train:
            continue
        by_step.plot([r["step"] for r in train], [r["ce"] for r in train], label=name)
        by_flops.plot([r["flops"] for r in train], [r["ce"] for r in train], label=name)
    by_step.set(xlabel="step", ylabel="training cross-entropy", title="task loss vs steps")
    by_flops.set(xlabel="FLOPs (this run)", ylabel="training cross-entropy", title="vs compute")
    by_flops.set_xscale("log")
    for ax in (by_step, by_flops):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


COLUMNS = (  # (key in the summary, column header, format)
    ("params", "params", "{:,}"),
    ("layers", "layers", "{}"),
    ("val_ppl", "val ppl", "{:.1f}"),
    ("accuracy", "val top-1 acc", "{:.3f}"),
    ("agreement", "agreement w/ teacher", "{:.3f}"),
    ("kl_teacher_student", "KL(teacher‖model) T=1", "{:.3f}"),
    ("tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("generation_tokens_per_s", "generate tokens/s", "{:,.0f}"),
    ("flops", "FLOPs (run)", "{:.2e}"),
    ("flops_with_teacher", "FLOPs incl. teacher training", "{:.2e}"),
)


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """One row per model, the columns above (blank where a model lacks a value)."""
    lines = [
        "| model | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, row in rows.items():
        cells = [fmt.format(row[k]) if row.get(k) is not None else "" for k, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out: Path, models: dict[str, dict[str, Any]], *, title: str, notes: list[str]
) -> None:
    """``summary.json`` (one entry per model), ``report.md`` and ``loss_curves.png`` in ``out``."""
    curves = {name: read_metrics(Path(row["run_dir"])) for name, row in models.items()}
    plot_loss_curves(curves, out / "loss_curves.png")
    write_json(out / "summary.json", {"models": models})
    paragraphs = [f"# {title}", markdown_table(models), *notes, "![loss curves](loss_curves.png)"]
    atomic_write_text(out / "report.md", "\n\n".join(paragraphs) + "\n")
