"""The pool-ensemble study's tables (``recipes.pool_ensemble``): the result across seeds (mean ±
std, block-bootstrap intervals on the test set, seed-paired t-intervals, verdicts) and its
Markdown."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distillery.eval import CalibrationStats, bootstrap_calibration, bootstrap_weights
from distillery.eval.stats import verdict
from distillery.recipes.study import hardware, mean_std, paired_interval

if TYPE_CHECKING:
    from distillery.recipes.codistill_study import CodistillStudyConfig
    from distillery.recipes.pool_ensemble import PoolEnsembleConfig

NAME = "pool-ensemble"
METRICS = ("accuracy", "nll", "brier", "ece")
LOWER_IS_BETTER = {"accuracy": False, "nll": True, "brier": True, "ece": True}
DIGITS = {"accuracy": 4, "nll": 3, "brier": 4, "ece": 4}
LABELS = {"accuracy": "accuracy", "nll": "NLL", "brier": "Brier", "ece": "ECE"}


def _mean_std(values: list[float]) -> dict[str, float]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _compare(
    per_seed: list[dict[str, Any]],
    sums: dict[int, dict[str, np.ndarray]],
    weights: np.ndarray,
    name: str,
    against: str,
) -> dict[str, Any]:
    """``name`` − ``against`` per metric: the block bootstrap (paired on the shared test blocks,
    mean over seeds) and the seed-paired t-interval, each with its verdict."""
    seeds = [r["seed"] for r in per_seed]
    boot = bootstrap_calibration(
        [sums[s][name] for s in seeds], weights, [sums[s][against] for s in seeds]
    )
    runs, base = ([{"seed": r["seed"], **r["predictors"][n]} for r in per_seed]
                  for n in (name, against))  # fmt: skip
    metrics = {}
    for key in METRICS:
        lower = LOWER_IS_BETTER[key]
        seeded = paired_interval(runs, base, key)
        assert seeded is not None  # the same seeds on both sides
        metrics[key] = {
            "bootstrap": boot[key].as_dict(),
            "bootstrap_verdict": verdict(boot[key], lower_is_better=lower),
            "seeds": seeded.as_dict(),
            "seeds_verdict": verdict(seeded, lower_is_better=lower),
        }
    within = {}
    for s in seeds:  # each seed alone: its own test-block bootstrap
        one = bootstrap_calibration([sums[s][name]], weights, [sums[s][against]])
        within[str(s)] = {k: v.as_dict() for k, v in one.items()}
    return {"name": name, "against": against, "metrics": metrics, "per_seed_bootstrap": within}


def summarise(
    cfg: PoolEnsembleConfig,
    study: CodistillStudyConfig,
    per_seed: list[dict[str, Any]],
    sums: dict[int, dict[str, np.ndarray]],
    pooled: dict[str, CalibrationStats],
    setup: dict[str, Any],
    pairs: list[tuple[str, str]],
) -> dict[str, Any]:
    """Across seeds: each predictor's mean ± std and bootstrap intervals (alone and against
    ``single``), and each of ``pairs`` (predictor, against) compared."""
    seeds = [r["seed"] for r in per_seed]
    n_groups = per_seed[0]["test_blocks"]
    weights = bootstrap_weights(n_groups, cfg.bootstrap.samples, cfg.bootstrap.seed)
    rows = {}
    for name in per_seed[0]["predictors"]:
        values = [r["predictors"][name] for r in per_seed]
        row: dict[str, Any] = {
            k: _mean_std([v[k] for v in values]) for k in (*METRICS, "train_flops")
        }
        mine = [sums[s][name] for s in seeds]
        row["bootstrap"] = {k: v.as_dict() for k, v in bootstrap_calibration(mine, weights).items()}
        if name != "single":
            paired = bootstrap_calibration(mine, weights, [sums[s]["single"] for s in seeds])
            row["bootstrap_vs_single"] = {k: v.as_dict() for k, v in paired.items()}
        rows[name] = row
    return {
        "name": NAME,
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": seeds,
        "codistill": str(cfg.codistill),
        "codistill_out": str(study.out),
        "pool": cfg.peers,
        "member_steps": study.train.steps,
        "exchange": study.exchange.model_dump(mode="json"),
        "seq_len": study.data.seq_len,
        **setup,
        "n_bins": cfg.n_bins,
        "test_blocks": n_groups,
        "test_predictions": per_seed[0]["test_predictions"],
        "rows": rows,
        "diversity": {
            k: _mean_std([r["diversity"][k] for r in per_seed]) for k in per_seed[0]["diversity"]
        },
        "comparisons": [_compare(per_seed, sums, weights, a, b) for a, b in pairs],
        "per_seed": per_seed,
        "reliability": {n: {"width": s.bins(cfg.n_bins, "width")} for n, s in pooled.items()},
        "config": cfg.model_dump(mode="json"),
    }


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _cell(value: dict[str, float], digits: int) -> str:
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _span(value: dict[str, Any] | None, digits: int, *, signed: bool = False) -> str:
    """``0.1234 [0.1200, 0.1270]`` from an interval's dict (``Interval.as_dict``)."""
    if value is None:
        return "—"
    sign = "+" if signed else ""
    mean = f"{value['mean']:{sign}.{digits}f}"
    if value["low"] is None or value["high"] is None:
        return f"{mean} [no interval from one seed]"
    return f"{mean} [{value['low']:{sign}.{digits}f}, {value['high']:{sign}.{digits}f}]"


def _setup(result: dict[str, Any]) -> list[str]:
    """Who the members and students are, what they saw, and the test set."""
    distil, member, ex, n = (result["config"]["distil"], result["member"], result["exchange"],
                             result["pool"])  # fmt: skip
    shards = ", ".join(str(b) for b in result["shard_blocks"])
    temps = ", ".join(f"{t:g}" for t in distil["temperatures"])
    ce = (f" plus task CE (weight {distil['ce_weight']:g})" if distil["ce_weight"]
          else "; no task CE (as calibrate's students)")  # fmt: skip
    flops = {k: result["rows"][k]["train_flops"]["mean"] for k in ("single", "codistilled peer")}
    return [
        f"Members: the runs of `{result['codistill']}` (in `{result['codistill_out']}`); per "
        f"seed {n} peers of one architecture ({member['layers']} layers × hidden "
        f"{member['hidden_size']}, {member['params']:,} parameters), each trained "
        f"{result['member_steps']} steps on its own 1/{n} of the {result['train_blocks']} "
        f"training blocks ({shards} blocks for peers 0–{n - 1}). *Independent*: each peer "
        "alone (no exchange); *pool*: the same peers and shards codistilling through published "
        f"weights (every {ex['every']} steps after a burn-in of {ex['burn_in']}, KL weight "
        f"{ex['weight']:g} at T={ex['temperature']:g}), so each also learnt from peers trained "
        f"on the other shards. Training FLOPs per peer: alone {flops['single']:.3g}, in the "
        f"pool {flops['codistilled peer']:.3g} (its teacher-side forwards included).",
        "",
        f"Students: one per ensemble and T ∈ {{{temps}}}; the peer's architecture from a random "
        "initialisation (the seed's: both students of a seed share initialisation and data "
        f"order), {distil['steps']} steps (lr {distil['lr']:g}, warmup "
        f"{distil['warmup_steps']}) on all {result['train_blocks']} training blocks, forward KL "
        f"to the ensemble's mean distribution at T (× T², weight {distil['kl_weight']:g}){ce}; "
        "evaluated at T = 1.",
        "",
        f"Test split: {result['test_blocks']} blocks of {result['seq_len']} tokens, "
        f"{result['test_predictions']} next-token predictions per seed, never used for training "
        f"or model selection; ECE with {result['n_bins']} equal-width bins.",
    ]


def _verdicts(result: dict[str, Any]) -> list[str]:
    """One line per comparison, read off the intervals: seeds first, then the test set."""
    out = []
    for c in result["comparisons"]:
        said = [f"{LABELS[k]} {m['seeds_verdict']} (paired t), {m['bootstrap_verdict']} (block "
                "bootstrap)" for k, m in c["metrics"].items()]  # fmt: skip
        out.append(f"- {c['name']} vs {c['against']}: " + "; ".join(said) + ".")
    return out


def _not_shown(result: dict[str, Any]) -> list[str]:
    seeds = len(result["seeds"])
    return [
        f"- Other pool sizes, models or training lengths: one pool of {result['pool']} small "
        f"peers trained {result['member_steps']} steps (not converged), one corpus, an "
        "in-domain test split.",
        "- Other exchanges: only the checkpoints pool (not predictions), at the codistillation "
        "study's exchange settings.",
        "- Ensembles of equal information or cost: pool members learnt from the other shards "
        "through their peers and spent more FLOPs; this compares the two ways of training at "
        "equal data per member and equal steps.",
        f"- Variation beyond {_seeds(seeds)}: the t-intervals are wide at this many seeds, and "
        "'no difference detected' is not evidence of no difference; the bootstrap intervals "
        "hold the trained models fixed.",
        "- Tuned students: one recipe (steps, lr, T, objective) for every student, and no "
        "student trained without a teacher here to compare with.",
        "- Other notions of calibration: ECE here bins top-1 next-token confidence "
        "(equal-width); classwise or equal-mass calibration is not measured.",
    ]


def pool_ensemble_markdown(result: dict[str, Any]) -> str:
    """The tables (mean ± std over seeds; test-set bootstrap; comparisons) and the verdicts."""
    rows, seeds, boot = result["rows"], result["seeds"], result["config"]["bootstrap"]
    lines = [
        f"# Codistilled pool as an ensemble ({result['hardware']}, seeds {seeds})",
        "",
        *_setup(result),
        "",
        f"Mean ± sample std over {_seeds(len(seeds))}; train FLOPs: every run behind a predictor.",
        "",
        "| predictor | accuracy | NLL | Brier | ECE | train FLOPs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        cells = " | ".join(_cell(row[k], DIGITS[k]) for k in METRICS)
        lines.append(f"| {name} | {cells} | {row['train_flops']['mean']:.3g} |")
    div = "; ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in result["diversity"].items())
    lines += [
        "",
        f"Diversity (mean pairwise top-1 disagreement of an ensemble's members on the test "
        f"predictions): {div}.",
        "",
        "## Test-set intervals (block bootstrap within a seed)",
        "",
        f"95% percentile intervals over {boot['samples']} resamples (seed {boot['seed']}) of the "
        f"{result['test_blocks']} test blocks (a block's next tokens together: they are not "
        "independent), the same resamples for every predictor and seed; each value is the mean "
        "over seeds; Δ: paired with `single` on the same resampled blocks. They cover test-set "
        "sampling of these trained models, not training variation (see the paired t below).",
        "",
        "| predictor | " + " | ".join(f"{LABELS[k]} | Δ {LABELS[k]}" for k in METRICS) + " |",
        "|---|" + "---:|" * (2 * len(METRICS)),
    ]
    for name, row in rows.items():
        cells = []
        for k in METRICS:
            paired = row.get("bootstrap_vs_single", {}).get(k)
            cells += [_span(row["bootstrap"][k], DIGITS[k]), _span(paired, DIGITS[k], signed=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Comparisons",
        "",
        "Δ = first − second. Block bootstrap: paired on the shared test blocks, as above; "
        f"paired t: the per-seed differences, a Student-t interval over {_seeds(len(seeds))}. "
        "Better: higher accuracy, lower NLL, Brier and ECE.",
        "",
        "| comparison | metric | Δ (95% block bootstrap) | verdict | Δ (95% paired t, seeds) "
        "| verdict |",
        "|---|---|---:|---|---:|---|",
    ]
    for c in result["comparisons"]:
        for k, m in c["metrics"].items():
            lines.append(
                f"| {c['name']} − {c['against']} | {LABELS[k]} | "
                f"{_span(m['bootstrap'], DIGITS[k], signed=True)} | {m['bootstrap_verdict']} | "
                f"{_span(m['seeds'], DIGITS[k], signed=True)} | {m['seeds_verdict']} |"
            )
    lines += ["", "## Verdict", "", *_verdicts(result), ""]
    lines += ["## What this does not show", "", *_not_shown(result)]
    return "\n".join(lines) + "\n"
