"""The heterogeneous pool's per-peer rows (paired by seed), Markdown and plot
(``recipes/codistill_hetero``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from distillery.recipes.study import mean_std, paired_interval, paired_verdict
from distillery.report import LOSS_UNIT, plot_seed_band

MEANS = ("seconds", "solo_seconds", "process_seconds", "solo_process_seconds", "steps_per_second",
         "solo_steps_per_second", "bytes", "wait_seconds", "mean_copy_lag_steps")  # fmt: skip


def _paired(runs: list[dict], key: str, against: str, digits: int) -> dict[str, Any] | None:
    """``key`` − ``against`` of the same runs, paired by seed (``eval.stats``)."""
    mine = [{"seed": r["seed"], "x": r[key]} for r in runs if r[key] is not None]
    theirs = [{"seed": r["seed"], "x": r[against]} for r in runs if r[against] is not None]
    interval = paired_interval(mine, theirs, "x")
    if interval is None:
        return None
    words = paired_verdict(mine, theirs, "x", lower_is_better=True, digits=digits)
    return {"interval": interval.as_dict(), "text": words}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def peer_rows(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per peer: means over seeds, and pool − solo paired by seed (val loss, seconds)."""
    rows = []
    for i in range(len(per_seed[0]["peers"])):
        runs = [s["peers"][i] for s in per_seed]
        loss = mean_std([r["val_loss"] for r in runs])
        solo = mean_std([r["solo_val_loss"] for r in runs])
        fixed = ("peer", "layers", "params", "delay", "cores", "threads")
        rows.append(
            {
                **{k: runs[0][k] for k in fixed},
                "val_loss": {"mean": loss[0], "std": loss[1]},
                "solo_val_loss": {"mean": solo[0], "std": solo[1]},
                "steps": [r["steps"] for r in runs],
                "steps_to_solo": [r["steps_to_solo"] for r in runs],
                "seconds_to_solo": [r["seconds_to_solo"] for r in runs],
                "reached": sum(r["steps_to_solo"] is not None for r in runs),
                **{k: _mean([r[k] for r in runs]) for k in MEANS},
                "delta_val_loss": _paired(runs, "val_loss", "solo_val_loss", 3),
                "delta_seconds": _paired(runs, "seconds", "solo_seconds", 1),
            }
        )
    return rows


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _list(values: list[Any], spec: str = "") -> str:
    return ", ".join("–" if v is None else format(v, spec) for v in values)


def _setup(result: dict[str, Any]) -> list[str]:
    ex, rows = result["exchange"], result["rows"]
    peers = "; ".join(
        f"peer {r['peer']}: {r['layers']} layers, {r['params'] / 1e6:.2f}M params, "
        f"cores {r['cores'] if r['cores'] is not None else 'unpinned'}, {r['threads']} "
        f"thread{'s' if r['threads'] > 1 else ''}, sleeps {r['delay']:g} s before every step"
        for r in rows
    )
    return [
        f"{len(rows)} peers, each its own `distillery codistill --peer I` process ({peers}); "
        f"{result['cpu_count']} cores on this machine. cores: {result['cores']}, threads "
        f"(OMP_NUM_THREADS): {result['threads']}, delays: {result['delays'] or 'none'}. Both "
        "arms start all their processes at once with the same pinning, threads and delays, so "
        "the cores are shared the same way: `solo`, every peer alone on its own shard; `pool`, "
        f"codistilling through published weights every {ex['every']} steps after a "
        f"{ex['burn_in']}-step burn-in (weight {ex['weight']:g}, temperature "
        f"{ex['temperature']:g}). {result['steps']} steps; validation loss every "
        f"{result['eval_every']} steps.",
        "",
        "Seconds: the engine's wall-clock from the first step (sleeps, exchanges and evaluations "
        "in; process start-up and data loading out; for the rejoined peer, the downtime, the "
        "restart and the lost first attempt at the redone steps are out too). Process s: from "
        "launch to exit as the study timed it (start-up and, for the rejoined peer, the kill, "
        "pause and restart in). Steps / s to solo loss: the first evaluation at or below the "
        "same peer's final loss alone (per seed; – never). Δ: pool − solo paired by seed, 95% "
        "t-interval (`eval.stats`). Bytes: sent + received. Copy lag: mean steps between a "
        "peer and the copies of the others it learnt from. Means over seeds.",
        "",
    ]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| peer | layers | delay s | val loss pool | alone | Δ val loss (pool − solo) "
        "| steps to solo loss | s to solo loss | s pool | s alone | Δ s | process s "
        "| steps/s pool | steps/s alone | bytes | wait s | copy lag |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = [(r[k] or {}).get("text", "–") for k in ("delta_val_loss", "delta_seconds")]
        lines.append(
            f"| {r['peer']} | {r['layers']} | {r['delay']:g} | "
            f"{r['val_loss']['mean']:.3f} ± {r['val_loss']['std']:.3f} | "
            f"{r['solo_val_loss']['mean']:.3f} ± {r['solo_val_loss']['std']:.3f} | {delta[0]} | "
            f"{_list(r['steps_to_solo'])} | {_list(r['seconds_to_solo'], '.1f')} | "
            f"{_num(r['seconds'], '.1f')} | {_num(r['solo_seconds'], '.1f')} | {delta[1]} | "
            f"{_num(r['process_seconds'], '.1f')} | {_num(r['steps_per_second'], '.2f')} | "
            f"{_num(r['solo_steps_per_second'], '.2f')} | {_num(r['bytes'], '.3g')} | "
            f"{_num(r['wait_seconds'], '.1f')} | {_num(r['mean_copy_lag_steps'], '.1f')} |"
        )
    return lines


def _slowed(rows: list[dict[str, Any]]) -> list[str]:
    slow = [r for r in rows if r["delay"] > 0]
    others = [r for r in rows if r["delay"] == 0]
    if not slow:
        return ["No slowed worker (no delays)."]
    rest = "; ".join(f"peer {r['peer']} {r['steps_per_second']:.2f}" for r in others) or "none"
    return [
        f"Slowed worker: peer {r['peer']} (+{r['delay']:g} s a step) ran "
        f"{r['steps_per_second']:.2f} steps/s in the pool ({r['solo_steps_per_second']:.2f} "
        f"alone); the undelayed peers' steps/s in the pool: {rest}."
        for r in slow
    ]


def _rejoins(result: dict[str, Any]) -> list[str]:
    found = result["rejoins"]
    if not found:
        return ["No peer was killed (no rejoin)."]
    at = result["config"]["rejoin"]
    each = "; ".join(
        f"seed {r['seed']}: resumed from step {r['resumed_from']}, down {r['downtime']:.1f} s"
        for r in found
    )
    mean = statistics.fmean(r["downtime"] for r in found)
    return [
        f"Kill-and-rejoin: peer {at['peer']} was SIGKILLed once it had checkpointed at step ≥ "
        f"{at['at_step']} and relaunched with `--resume` after a {at['pause']:g} s pause (the "
        f"others kept training on its last published weights). {each}; mean downtime (kill to "
        f"relaunch) {mean:.1f} s."
    ]


def hetero_markdown(result: dict[str, Any]) -> str:
    """The setup, the per-peer table, the slowed worker and the rejoin, in words."""
    lines = [f"# Heterogeneous codistillation pool ({result['hardware']}, seeds "
             f"{result['seeds']})", ""]  # fmt: skip
    lines += _setup(result) + _table(result["rows"]) + [""]
    lines += [*_slowed(result["rows"]), "", *_rejoins(result)]
    return "\n".join(lines) + "\n"


def plot_hetero(result: dict[str, Any], dest: Path) -> None:
    """Validation loss against wall-clock seconds per peer: pool solid, alone dashed (mean ±
    std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    per_seed = result["per_seed"]
    for i, row in enumerate(result["rows"]):
        color = f"C{i}"
        label = f"peer {i} ({row['layers']} layers, +{row['delay']:g} s/step)"
        for key, style, suffix in (("timed", "-", "pool"), ("solo_timed", "--", "alone")):
            timed = [[(sec, loss) for _, sec, loss in s["peers"][i][key]] for s in per_seed]
            plot_seed_band(ax, timed, linestyle=style, color=color, marker=".",
                           label=f"{label} {suffix}")  # fmt: skip
    ax.set(xlabel="wall-clock seconds", ylabel=f"validation loss ({LOSS_UNIT})",
           title="heterogeneous pool (solid) vs alone (dashed), mean ± std over seeds")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
