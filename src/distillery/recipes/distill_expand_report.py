"""The distill-expand study's table and plots (``recipes/distill_expand``).

Every comparison is paired by seed (``eval.stats`` through ``study.paired_interval``): each arm
against the best baseline (the learning rate with the lowest mean loss, chosen on the same
seeds, which favours the baseline; or, with ``tune``, each row at its own lr and warmup chosen
on a seed not reported), distill-expand against restart-only at the same phase
boundaries (the distillation step itself), and, for the split question, the grid of
f_train × f_distill with its best cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.eval.stats import verdict
from distillery.recipes.study import paired_interval
from distillery.recipes.tuning import grid_table
from distillery.report import LOSS_UNIT, plot_seed_band


def _vs(runs: list[dict[str, Any]], against: list[dict[str, Any]]) -> tuple[str, str]:
    """(``Δ [low, high]``, verdict) of ``runs`` − ``against`` on validation loss."""
    interval = paired_interval(runs, against, "val_loss")
    if interval is None:
        return "–", "no seed in common"
    return interval.describe(3).split(" (")[0], verdict(interval, lower_is_better=True)


def best_baseline(rows: dict[str, Any]) -> str | None:
    """The baseline row with the lowest mean validation loss (over its learning rates)."""
    names = [k for k, row in rows.items() if row["arm"] == "baseline"]
    return min(names, key=lambda k: rows[k]["val_loss"]["mean"]) if names else None


def expand_markdown(result: dict[str, Any]) -> str:
    """The table (final validation loss at budget B), the paired comparisons and the answer."""
    rows = result["rows"]
    n = len(result["seeds"])
    tuned = any(row.get("tuning") for row in rows.values())
    picked = (
        "each row's lr and warmup tuned on a seed not reported, see below"
        if tuned
        else "lowest mean loss over its learning rates, picked on these seeds"
    )
    warmup = result["config"]["train"]["warmup_steps"]  # rows written before it was recorded
    lines = [
        f"# Distill-expand ({result['hardware']}, seeds {result['seeds']})",
        "",
        f"Every arm ends in a {result['layers']}-layer model after at most "
        f"B = {result['budget_flops']:.3g} FLOPs on the same data stream. Mean ± sample std "
        f"over {n} seeds; Δ = arm − the best baseline ({picked}), paired by seed, with its 95% "
        "t-interval; the verdict is read off the interval (lower loss is better).",
        "",
        "| arm | lr | warmup | f_train | f_distill | phases (layers × steps) | step cost vs 2n "
        "| FLOPs / B | val loss | Δ loss vs best baseline [95% CI] | verdict | val ppl |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---|---|---:|",
    ]
    plain = _plain_step(rows)
    base_name = best_baseline(rows)
    base = rows[base_name] if base_name else None
    for label, row in rows.items():
        loss, ppl = row["val_loss"], row["val_ppl"]
        delta, said = _vs(row["runs"], base["runs"]) if base and label != base_name else ("–",) * 2
        phases = " → ".join(f"{p['layers']}×{p['steps']}" for p in row["phases"])
        cost = " → ".join(
            f"{p['flops_per_step'] / plain:.2f}" if plain and "flops_per_step" in p else "–"
            for p in row["phases"]
        )
        f_t = f"{row['f_train']:g}" if row["f_train"] is not None else "–"
        f_d = f"{row['f_distill']:g}" if row["f_distill"] is not None else "–"
        lines.append(
            f"| {label} | {row['lr']:g} | {row.get('warmup_steps', warmup)} | {f_t} | {f_d} "
            f"| {phases} | {cost} | "
            f"{row['flops'] / result['budget_flops']:.3f} "
            f"| {loss['mean']:.3f} ± {loss['std']:.3f} | {delta} | {said} | "
            f"{ppl['mean']:.1f} ± {ppl['std']:.1f} |"
        )
    lines += _against_restarts(rows) + _carry_vs_restart(rows) + _against_grow_only(rows)
    lines += _against_reset(rows)
    tuned = {label: row["tuning"] for label, row in rows.items() if row.get("tuning")}
    lines += _grid(rows, base) + grid_table(tuned, "validation loss at B")
    best = min(rows, key=lambda k: rows[k]["val_loss"]["mean"])
    if base and best != base_name:
        delta, said = _vs(rows[best]["runs"], base["runs"])
        lines += [
            "",
            f"Best at B (lowest mean): **{best}**; against the best baseline ({base_name}), "
            f"paired by seed: {said}, Δ {delta}.",
        ]
    elif base:
        lines += ["", f"Best at B: **{best}** (plain end-to-end training)."]
    return "\n".join(lines) + "\n"


_DONE = {"restart": "restarted", "carry": "carried"}


def _point(row: dict[str, Any]) -> tuple[float, float, str, float | str]:
    """Where a swept row sits: (f_train, f_distill, AdamW at boundaries, lr — "tuned" where
    each row has its own, so rows pair across lrs)."""
    lr = "tuned" if row.get("tuning") else row["lr"]
    return (row["f_train"], row["f_distill"], row.get("optimizer", "restart"), lr)


def _lr(lr: float | str) -> str:
    return lr if isinstance(lr, str) else f"{lr:g}"


def _against_restarts(rows: dict[str, Any]) -> list[str]:
    """Distill-expand − restart-only at each point both ran: the distillation step itself."""
    restarts = {_point(r): r for r in rows.values() if r["arm"] == "restart-only"}
    pairs = [(r, restarts[_point(r)]) for r in rows.values()
             if r["arm"] == "distill-expand" and _point(r) in restarts]  # fmt: skip
    return _paired_rows(
        "Distill-expand against restart-only at the same phase boundaries, schedule, lr and "
        'AdamW handling (the 2n layers throughout, no shrink; lr "tuned": each row at its '
        "own tuned lr and warmup), paired by seed:",
        pairs,
    )


def _paired_rows(title: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """A titled table of swept rows − their controls, paired by seed (none: no lines)."""
    if not pairs:
        return []
    lines = [
        "",
        title,
        "",
        "| f_train | f_distill | AdamW at boundaries | lr | Δ loss [95% CI] | verdict |",
        "|---:|---:|---|---:|---|---|",
    ]
    for row, control in pairs:
        delta, said = _vs(row["runs"], control["runs"])
        f_t, f_d, kind, lr = _point(row)
        f_d = "–" if f_d is None else f"{f_d:g}"  # shrink-expand: no distillation phase
        lines.append(f"| {f_t:g} | {f_d} | {kind} | {_lr(lr)} | {delta} | {said} |")
    return lines


def _against_grow_only(rows: dict[str, Any]) -> list[str]:
    """Distill-expand − f_distill = 0 (shrink and grow, no distillation) at the same f_train,
    lr (or each its own tuned one) and AdamW handling: what the distillation phase adds."""
    swept = [r for r in rows.values() if r["arm"] == "distill-expand"]
    plain = {(r["f_train"], *_point(r)[2:]): r for r in swept if r["f_distill"] == 0.0}
    pairs = [(r, plain[(r["f_train"], *_point(r)[2:])]) for r in swept
             if r["f_distill"] > 0.0 and (r["f_train"], *_point(r)[2:]) in plain]  # fmt: skip
    return _paired_rows(
        "Distill-expand against growing without distilling (f_distill = 0: the kept layers "
        'grown at once) at the same f_train, lr and AdamW handling (lr "tuned": each row '
        "at its own tuned lr and warmup), paired by seed:",
        pairs,
    )


def _against_reset(rows: dict[str, Any]) -> list[str]:
    """Growing on top (f_distill = 0) − re-initialising the dropped layers in place, at the
    same f_train, lr (or each its own tuned one) and AdamW handling: where new layers go."""
    resets = {(r["f_train"], *_point(r)[2:]): r for r in rows.values()
              if r["arm"] == "reset-in-place"}  # fmt: skip
    pairs = [(r, resets[(r["f_train"], *_point(r)[2:])]) for r in rows.values()
             if r["arm"] in ("distill-expand", "shrink-expand") and r["f_distill"] in (0.0, None)
             and (r["f_train"], *_point(r)[2:]) in resets]  # fmt: skip
    return _paired_rows(
        "Grown on top (the kept layers 0, 2, … then the new ones) against the same layers "
        "re-initialised in place (new ones between the kept), at the same f_train, lr and AdamW "
        'handling (lr "tuned": each row at its own tuned lr and warmup), paired by seed:',
        pairs,
    )


def _carry_vs_restart(rows: dict[str, Any]) -> list[str]:
    """Each swept arm with AdamW's moments carried − the same arm restarting them."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["arm"], r["f_train"], r["f_distill"], _point(r)[3])

    restarted = {key(r): r for r in rows.values() if _point(r)[2] == "restart"}
    pairs = [(r, restarted.get(key(r))) for r in rows.values() if _point(r)[2] == "carry"]
    if not any(control for _, control in pairs):
        return []
    lines = [
        "",
        "AdamW's moments carried across the phase boundaries against restarted (same arm and "
        "point), paired by seed:",
        "",
        "| arm | f_train | f_distill | lr | Δ loss [95% CI] | verdict |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row, control in pairs:
        if control is not None:
            delta, said = _vs(row["runs"], control["runs"])
            f_d = f"{row['f_distill']:g}" if row["f_distill"] is not None else "–"
            lines.append(
                f"| {row['arm']} | {row['f_train']:g} | {f_d} | {_lr(_point(row)[3])} | {delta} "
                f"| {said} |"
            )
    return lines


def _grid(rows: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """Mean Δ loss of distill-expand against the best baseline over f_train × f_distill."""
    swept = [r for r in rows.values() if r["arm"] == "distill-expand"]
    if not base or not swept:
        return []
    # One grid: the AdamW handling and lr of the best distill-expand row.
    kind, lr = _point(min(swept, key=lambda r: r["val_loss"]["mean"]))[2:]
    cells = {_point(r)[:2]: r for r in swept if _point(r)[2:] == (kind, lr)}
    if len(cells) < 2:
        return []
    trains = sorted({p[0] for p in cells})
    distils = sorted({p[1] for p in cells})
    lines = [
        "",
        f"The split (mean Δ loss of distill-expand at lr {_lr(lr)}, AdamW's moments {_DONE[kind]} "
        "at phase boundaries, against the "
        "best baseline; – not run):",
        "",
        "| f_train \\ f_distill | " + " | ".join(f"{d:g}" for d in distils) + " |",
        "|---:|" + "---:|" * len(distils),
    ]
    base_mean = base["val_loss"]["mean"]
    for t in trains:
        values = [
            f"{cells[(t, d)]['val_loss']['mean'] - base_mean:+.3f}" if (t, d) in cells else "–"
            for d in distils
        ]
        lines.append(f"| {t:g} | " + " | ".join(values) + " |")
    best = min(cells, key=lambda p: cells[p]["val_loss"]["mean"])
    delta, said = _vs(cells[best]["runs"], base["runs"])
    lines += [
        "",
        f"Best cell: f_train {best[0]:g}, f_distill {best[1]:g}: {said}, Δ {delta} (the best "
        "of several cells, so its interval is optimistic).",
    ]
    return lines


def _plain_step(rows: dict[str, Any]) -> float | None:
    """FLOPs of one plain 2n-layer training step (the first phase of any arm that starts 2n)."""
    for row in rows.values():
        first = row["phases"][0]
        if row["arm"] != "stacking" and "flops_per_step" in first:
            return float(first["flops_per_step"])
    return None


def plot_expand(result: dict[str, Any], folder: Path) -> None:
    """``final_loss.png`` (final validation loss per arm, ± std) and ``loss_vs_flops.png``
    (validation loss against cumulative FLOPs, mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    names = list(rows)
    ax.errorbar(
        [rows[n]["val_loss"]["mean"] for n in names],
        range(len(names)),
        xerr=[rows[n]["val_loss"]["std"] for n in names],
        fmt="o",
        capsize=3,
    )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel=f"final validation loss ({LOSS_UNIT}, mean ± std over seeds)",
           title="at equal FLOPs B")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "final_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, row in rows.items():
        curves = [r["curve"] for r in row["runs"]]
        if curves and curves[0]:
            plot_seed_band(ax, curves, marker=".", label=name)
    ax.set(xlabel="FLOPs (cumulative)", ylabel=f"validation loss ({LOSS_UNIT})",
           title="loss vs compute (mean ± std over seeds)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "loss_vs_flops.png", dpi=110)
    plt.close(fig)
