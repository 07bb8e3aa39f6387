"""Reports: ``summary.json``, a Markdown report and PNG loss curves from run folders."""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel

from distillery.files import atomic_write_text, write_json
from distillery.report.card import as_dict, cost_rows, metric_rows, rows_markdown
from distillery.report.html import write_html

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LOSS_UNIT = "nats/token"  # every loss the plots show is a mean natural-log loss per token


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


def plot_seed_band(
    ax: Axes, curves: Sequence[Sequence[tuple[float, float]]], **style: Any
) -> tuple[list[float], list[float]]:
    """Draw the mean over seeds of ``curves`` (one list of ``(x, y)`` points per seed) as a
    line, with a ±1 sample-std band of y where there are two seeds or more; ``style`` goes to
    the line. Points are matched by index up to the shortest curve, x averaged too (wall-clock
    x differs by seed). Returns the mean ``(xs, ys)``."""
    length = min(len(c) for c in curves)
    points = [[c[k] for c in curves] for k in range(length)]  # (seeds,) per evaluation
    xs = [statistics.fmean(x for x, _ in at) for at in points]
    ys = [statistics.fmean(y for _, y in at) for at in points]
    (line,) = ax.plot(xs, ys, **style)
    if len(curves) > 1:
        std = [statistics.stdev(y for _, y in at) for at in points]
        low = [m - s for m, s in zip(ys, std, strict=True)]
        high = [m + s for m, s in zip(ys, std, strict=True)]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return xs, ys


def plot_loss_curves(
    curves: dict[str, list[dict[str, Any]]],
    dest: Path | BinaryIO,
    *,
    keys: Sequence[str] = ("ce",),
    ylabel: str = f"training cross-entropy ({LOSS_UNIT})",
    charged: dict[str, float] | None = None,
) -> Path | BinaryIO:
    """Training loss against step and against FLOPs (as the meter counts them: training plus
    the teacher's forwards; ``charged[name]``, e.g. the teacher's own training, added to a
    run's), one line per run and key, as a PNG; validation losses logged during or at the end
    of a run are drawn as points."""
    charged = {k: v for k, v in (charged or {}).items() if v}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in curves.items():
        before = charged.get(name, 0.0)
        flops_at = {r["step"]: before + r["flops"] for r in records if "flops" in r and "step" in r}
        for key in keys:
            train = [r for r in records if key in r and "flops" in r]  # whatever else was mixed
            if not train:
                continue
            label = name if len(keys) == 1 else (key if len(curves) == 1 else f"{name} {key}")
            by_step.plot([r["step"] for r in train], [r[key] for r in train], label=label)
            spent = [before + r["flops"] for r in train]
            by_flops.plot(spent, [r[key] for r in train], label=label)
        val = [r for r in records if "val_loss" in r and r.get("step") in flops_at]
        if val and len(curves) == 1:
            steps = [r["step"] for r in val]
            by_step.plot(steps, [r["val_loss"] for r in val], "o", label="validation loss")
            by_flops.plot([flops_at[s] for s in steps], [r["val_loss"] for r in val], "o",
                          label="validation loss")  # fmt: skip
    by_step.set(xlabel="step", ylabel=ylabel, title="loss vs steps")
    spent = "teacher forwards" + (" and the teacher's training" if charged else "")
    by_flops.set(xlabel=f"FLOPs (this run, {spent} included)", ylabel=ylabel,
                 title="loss vs compute")  # fmt: skip
    by_flops.set_xscale("log")
    for ax in (by_step, by_flops):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=100, format="png")
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
    out: Path,
    models: dict[str, dict[str, Any]],
    *,
    title: str,
    notes: list[str],
    config: BaseModel | dict[str, Any] | None = None,
) -> None:
    """``summary.json`` (one entry per model), ``report.md``, ``loss_curves.png`` and the same
    as one self-contained ``report.html`` in ``out``."""
    curves = {name: read_metrics(Path(row["run_dir"])) for name, row in models.items()}
    charged = {  # a distilled student's compute includes its teacher's training
        name: row["flops_with_teacher"] - row["flops"]
        for name, row in models.items()
        if row.get("flops_with_teacher") is not None and row.get("flops") is not None
    }
    plot_loss_curves(curves, out / "loss_curves.png", charged=charged)
    write_json(out / "summary.json", {"models": models})
    paragraphs = [f"# {title}", markdown_table(models), *notes, "![loss curves](loss_curves.png)"]
    markdown = "\n\n".join(paragraphs) + "\n"
    atomic_write_text(out / "report.md", markdown)
    cfg = as_dict(config) if config is not None else None
    write_html(out / "report.html", title, markdown, base=out, config=cfg)


def write_run_report(
    out: Path,
    *,
    config: BaseModel | dict[str, Any],
    summary: dict[str, Any],
    command: str | None = None,
) -> Path:
    """``out/report.html`` for one finished run: its final metrics and costs (the rows its
    model card has), its loss curves from ``metrics.jsonl``, its config and how it was run."""
    cfg = as_dict(config)
    records = read_metrics(out)
    terms = [o["kind"] for o in cfg.get("objectives", []) if o.get("kind")]
    keys = ["loss", *dict.fromkeys(k for k in terms if any(k in r for r in records))]
    png = io.BytesIO()
    plot_loss_curves({summary.get("name", "run"): records}, png, keys=keys, ylabel="training loss")
    title = f"distillery run: {summary.get('name', out.name)}"
    distilled = bool(cfg.get("teacher"))
    extra = "the teacher's forwards" if distilled else None
    markdown = "\n\n".join(
        [
            f"# {title}",
            f"Folder `{out}`; the model is in `{out / 'model'}`, its card in `model/README.md`.",
            "## Final evaluation",
            rows_markdown(metric_rows(summary), ("metric (validation split)", "value")),
            "## Cost",
            rows_markdown(cost_rows(summary, extra), ("cost", "value")),
            "## Loss curves",
            "Each term is the mean over the positions that count; `loss` is their weighted sum. "
            "FLOPs are what the meter counted: 6·N per trained token"
            + (", plus 2·N_teacher per token the teacher read." if distilled else "."),
        ]
    )
    images = [("loss_curves.png", png.getvalue())]
    return write_html(
        out / "report.html", title, markdown, images=images, config=cfg, command=command
    )
