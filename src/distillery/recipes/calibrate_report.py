"""The calibration study's report (``recipes.calibrate``): its Markdown tables, the plain
answers read off the intervals, and the reliability diagrams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.eval.metrics import TIMING_BATCHES, TIMING_REPEATS
from distillery.eval.stats import Interval, verdict
from distillery.recipes.study import summary_verdict

DESAI_DURRETT_ECE = 0.025  # in-domain fine-tuned BERT, 10 bins (Desai & Durrett 2020)


def _cell(value: dict[str, float], digits: int) -> str:
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _delta(value: dict[str, float], digits: int) -> str:
    if value["mean"] == 0 and value["std"] == 0:
        return "—"
    return f"{value['mean']:+.{digits}f} ± {value['std']:.{digits}f}"


def _interval(value: dict[str, Any]) -> Interval:
    return Interval(**value)


def _ci(value: dict[str, Any] | None, metric: str, *, delta: bool = False) -> str:
    """``0.60% [0.45, 0.80]`` (ECE in %; a difference in percentage points), ``5.985 [5.950,
    6.020]`` (NLL), ``0.9712 [0.9690, 0.9735]`` (Brier)."""
    if value is None:
        return "—"
    scale, digits, unit = {"ece": (100, 2, "%"), "nll": (1, 3, ""), "brier": (1, 4, "")}[metric]
    unit = " pp" if delta and unit else unit
    sign = "+" if delta else ""
    mean, low, high = (scale * value[k] for k in ("mean", "low", "high"))
    return f"{mean:{sign}.{digits}f}{unit} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def _setup(result: dict[str, Any]) -> list[str]:
    """What the members and the students were trained on, and for how long."""
    blocks, training, cfg = result["train_blocks"], result["training"], result["config"]
    members = [r for seed in training.values() for n, r in seed.items() if n.startswith("member")]
    if cfg["member_stage"] is not None:
        best = ", ".join(str(m["best_step"]) for m in members)
        trained = ", ".join(str(m["steps_trained"]) for m in members)
        stopped = sorted({m["stopped"] for m in members})
        said = (f"members trained to early stopping on the validation loss: best checkpoints at "
                f"steps {best} (trained {trained}; stopped by {' / '.join(stopped)})")  # fmt: skip
    else:
        said = f"members trained {members[0]['steps']} steps each"
    on = (
        f"{blocks['students']} training blocks held out of the training articles (the members "
        f"trained on the other {blocks['members']})"
        if cfg["transfer"] == "heldout"
        else f"the members' own {blocks['members']} training blocks"
    )
    temps = cfg["distill_temperatures"]
    at = (
        f"at T ∈ {{{', '.join(f'{t:g}' for t in temps)}}} (the KL between softened "
        "distributions, × T²; every student evaluated at T = 1)"
        if temps
        else "at the objectives' own temperature"
    )
    return [f"Training: {said}; students distilled on {on}, {at}.", ""]


def calibration_markdown(result: dict[str, Any]) -> str:
    """The tables (mean ± std over seeds; bootstrap intervals on the test set) and plain
    answers read off the intervals."""
    rows, seeds, cfg = result["rows"], result["seeds"], result["config"]
    unit = "test blocks (a block's next tokens together)"  # what the bootstrap resamples
    unit = "test examples" if result["task"] == "classify" else unit
    what = "next-token prediction" if result["task"] == "lm" else "topic classification"
    f1 = "macro_f1" in rows["single"]
    lines = [
        f"# Calibration: {result['name']} ({what}; {result['hardware']}, seeds {seeds})",
        "",
        f"Test split, {result['test_predictions']} predictions per seed; ECE with "
        f"{result['n_bins']} equal-width bins (ECE-mass: equal-mass bins); mean ± sample std "
        f"over seeds. Deep ensemble of {result['members']} models, MC dropout with "
        f"{result['mc_samples']} passes. Cost: forward passes per prediction and measured "
        f"time relative to the single model (fastest of {TIMING_REPEATS} passes over "
        f"{TIMING_BATCHES} test batches, side by side in the same run); training FLOPs of "
        "everything behind the predictor. Δ: the difference from the single model of the same "
        "seed (paired), mean ± std.",
        "",
        *_setup(result),
        "| predictor | passes | time × | train FLOPs | accuracy |"
        + (" macro-F1 |" if f1 else "")
        + " NLL | Δ NLL | ECE | Δ ECE | ECE-mass | MCE | Brier |",
        "|---|---:|---:|---:|---:|"
        + ("---:|" if f1 else "")
        + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['passes']} | {row['time_vs_single']['mean']:.2f} | "
            f"{row['train_flops']['mean']:.3g} | {_cell(row['accuracy'], 3)} |"
            + (f" {_cell(row['macro_f1'], 3)} |" if f1 else "")
            + f" {_cell(row['nll'], 3)} | {_delta(row['nll_vs_single'], 3)} | "
            f"{_cell(row['ece'], 4)} | {_delta(row['ece_vs_single'], 4)} | "
            f"{_cell(row['ece_mass'], 4)} | "
            f"{_cell(row['mce'], 3)} | {_cell(row['brier'], 4)} |"
        )
    temps = rows["single + temperature"]["temperatures"]
    lines += ["", f"Fitted temperatures: {', '.join(f'{t:.3f}' for t in temps)}.", ""]
    lines += [
        f"Bootstrap on the test set: 95% percentile intervals over {cfg['bootstrap_samples']} "
        f"resamples of the {result['test_blocks']} {unit}, seed {cfg['bootstrap_seed']}; "
        "the same resamples for every predictor and seed; each value is the mean over seeds, "
        "Δ the paired difference from the single model. These intervals cover test-set "
        "sampling for the trained models, not seed-to-seed variation (the ± std above, and "
        "the seed-paired intervals below).",
        "",
        "| predictor | ECE | Δ ECE | NLL | Δ NLL | Brier | Δ Brier |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        cells = []
        for metric in ("ece", "nll", "brier"):
            paired = row.get("bootstrap_vs_single", {}).get(metric)
            cells += [_ci(row["bootstrap"][metric], metric), _ci(paired, metric, delta=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *_answer(rows, len(seeds)), *_reference(rows, result["task"])]
    return "\n".join(lines) + "\n"


def _answer(rows: dict[str, Any], seeds: int) -> list[str]:
    """Each student against the single model: verdicts from the paired bootstrap intervals
    (ECE, NLL, Brier), then from the seed-paired t-intervals (ECE, NLL)."""
    out = []
    labels = {"ece": ("ECE", 2, 100, " pp"), "nll": ("NLL", 3, 1, ""), "brier": ("Brier", 4, 1, "")}
    for name, row in rows.items():
        if not name.startswith("student"):
            continue
        said = []
        for metric, (label, digits, scale, unit) in labels.items():
            iv = _interval(row["bootstrap_vs_single"][metric])
            shown = Interval(scale * iv.mean, scale * iv.low, scale * iv.high, iv.n,
                             iv.confidence, iv.unit, iv.method)  # fmt: skip
            said.append(f"{label}{unit and ' (pp)'} {verdict(iv, lower_is_better=True)}: "
                        f"Δ {shown.describe(digits)}")  # fmt: skip
        seed_said = []
        for metric, label, digits in (("ece", "ECE", 4), ("nll", "NLL", 3)):
            paired = row[f"{metric}_vs_single"]
            seed_said.append(f"{label} " + summary_verdict(
                paired["mean"], paired["std"], seeds, lower_is_better=True, digits=digits
            ))  # fmt: skip
        out.append(f"- {name} against the single model, test set resampled: "
                   f"{'; '.join(said)}. Paired by seed: {'; '.join(seed_said)}.")  # fmt: skip
    return out


def _reference(rows: dict[str, Any], task: str) -> list[str]:
    """The single model's ECE beside Desai & Durrett (2020)'s in-domain BERT."""
    ece = _ci(rows["single"]["bootstrap"]["ece"], "ece")
    caveat = (
        "a different task (next tokens over the whole vocabulary, whose confidences are low) "
        "and a small model trained from scratch"
        if task == "lm"
        else "a small classifier trained from scratch rather than a fine-tuned pre-trained one"
    )
    return [
        "",
        f"For comparison: Desai & Durrett (2020) report in-domain ECE ≈ "
        f"{DESAI_DURRETT_ECE:.1%} (10 bins) for fine-tuned BERT; the single model here has "
        f"{ece} — {caveat}.",
    ]


def plot_reliability(result: dict[str, Any], dest: Path) -> None:
    """Per predictor: a reliability diagram (accuracy per confidence bin against the diagonal)
    over a confidence histogram, seeds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["reliability"])
    n_bins = result["n_bins"]
    fig, axes = plt.subplots(
        2,
        len(names),
        figsize=(2.6 * len(names), 5.2),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.2]},
        squeeze=False,
    )
    width = 1.0 / n_bins
    for col, name in enumerate(names):
        bins = result["reliability"][name]["width"]
        top, bottom = axes[0][col], axes[1][col]
        lefts = [b["lower"] for b in bins]
        top.bar(lefts, [b["accuracy"] for b in bins], width=width, align="edge",
                edgecolor="black", linewidth=0.5, label="accuracy")  # fmt: skip
        top.bar(
            lefts,
            [abs(b["confidence"] - b["accuracy"]) for b in bins],
            bottom=[min(b["confidence"], b["accuracy"]) for b in bins],
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            label="gap to confidence",
        )
        centres = [b["lower"] + width / 2 for b in bins]
        top.plot(centres, [b["confidence"] for b in bins], "k_", markersize=9, label="confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        top.set(xlim=(0, 1), ylim=(0, 1))
        top.set_title(name, fontsize=8)
        ece = result["rows"][name]["ece"]["mean"]
        top.text(0.03, 0.9, f"ECE {ece:.3f}", fontsize=8, transform=top.transAxes)
        bottom.bar(lefts, [b["share"] for b in bins], width=width, align="edge",
                   color="tab:gray", edgecolor="black", linewidth=0.5)  # fmt: skip
        bottom.set(xlim=(0, 1), xlabel="confidence")
        if col == 0:
            top.set_ylabel("accuracy")
            bottom.set_ylabel("share")
            top.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['name']} ({result['hardware']}): reliability, seeds pooled")
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)
