"""``distillery calibrate``: are students distilled from an ensemble better calibrated?

For each seed s, every model has the same architecture and residual dropout:

- ``members``: M models trained with seeds s·M, …, s·M+M−1 (member 0 is *the single model*);
- ``student ← ensemble``: trained towards the deep ensemble's mean distribution;
- ``student ← MC dropout``: trained towards the single model's MC-dropout mean;
  both students start from the single model's seed (same initialisation and data order).

On the test split (the temperature is fitted on the validation split), the predictors are:
the single model; the single model with temperature scaling; MC dropout (K passes); the deep
ensemble (M models); the two students. Reported: accuracy, NLL, ECE (equal-width and
equal-mass bins), MCE, Brier, forward passes and measured time per prediction relative to the
single model, and the training FLOPs behind each predictor. Writes ``<name>.{md,json}`` and
``<name>-reliability.png`` (reliability diagrams and confidence histograms, seeds pooled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from distillery.config import (
    DataConfig,
    ForwardKLObjective,
    LiveTeacherSpec,
    MCDropoutTeacherSpec,
    ModelSpec,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
)
from distillery.distributed import DistEnv, resolve_device
from distillery.engine import seed_everything
from distillery.eval import CalibrationStats, evaluate_model, fit_temperature, predictions
from distillery.eval.metrics import TIMING_BATCHES, TIMING_REPEATS, inference_seconds
from distillery.models import load_pretrained
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.study import (
    SeededStudy,
    hardware,
    mean_std,
    run_or_reuse,
    summary_verdict,
    write_study,
)
from distillery.teachers import (
    EnsembleTeacher,
    LiveTeacher,
    MCDropoutTeacher,
    TeacherSignal,
    TemperatureScaled,
)


class CalibrateConfig(SeededStudy):
    """``distillery calibrate``: a single model, its temperature-scaled and MC-dropout versions,
    a deep ensemble, and students of the single model's size distilled from the ensemble and
    from MC dropout — calibration on the test split, over seeds (see ``recipes/calibrate``)."""

    name: str = Field("calibration", pattern=r"^[A-Za-z0-9_-]+$")  # file names of the results
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(val_fraction=0.1, test_fraction=0.1)
    )
    # Every model's architecture; its dropout is what MC dropout samples (so it must be > 0).
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(preset="mini", dropout=0.1))
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=240, lr=2e-3, warmup_steps=20, checkpoint_every=0)
    )
    members: int = Field(3, ge=2)  # deep-ensemble size (members trained with different seeds)
    mc_samples: int = Field(8, ge=2)  # stochastic passes of MC dropout
    distill_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [ForwardKLObjective(weight=1.0, temperature=1.0)], min_length=1
    )  # the students' objectives (towards the ensemble's / MC dropout's mean distribution)
    n_bins: int = Field(10, ge=2)  # equal-width ECE bins (equal-mass ECE is reported too)
    eval_batches: int | None = Field(None, gt=0)  # cap on test batches (None: the whole split)
    temperature_batches: int = Field(8, gt=0)  # validation batches the temperature is fitted on
    out: Path = Path("runs/calibrate")

    @model_validator(mode="after")
    def _samples_something(self) -> CalibrateConfig:
        if self.model.dropout <= 0:
            raise ValueError("model.dropout: MC dropout needs a model trained with dropout (> 0)")
        if self.model.path is not None or self.model.init_from_teacher or self.model.grow:
            raise ValueError("model: calibrate trains its models from a preset (model.preset)")
        if not self.data.test_fraction or not self.data.val_fraction:
            raise ValueError(
                "data: calibrate fits temperatures on the validation split and measures on the "
                "test split; give both val_fraction and test_fraction"
            )
        return self


PREDICTORS = (
    "single",
    "single + temperature",
    "MC dropout",
    "deep ensemble",
    "student ← ensemble",
    "student ← MC dropout",
)
METRICS = ("accuracy", "nll", "ece", "ece_mass", "mce", "brier")


def _train_models(cfg: CalibrateConfig, seed: int, reuse: bool) -> dict[str, dict[str, Any]]:
    """The seed's members and students. With ``reuse``, finished runs with the same config are
    kept; students are retrained whenever a member was."""
    out = Path(cfg.out) / f"seed{seed}"
    base = {"data": cfg.data, "model": cfg.model}
    runs: dict[str, dict[str, Any]] = {}
    first = seed * cfg.members
    for i in range(cfg.members):
        train = cfg.train.model_copy(update={"seed": first + i})
        run_cfg = RunConfig(**base, train=train, out=out / f"member{i}")
        summary, reused = run_or_reuse(run_cfg, f"s{seed}-member{i}", reuse=reuse)
        runs[f"member{i}"] = {"out": run_cfg.out, **summary}
        reuse = reuse and reused
    members = [runs[f"member{i}"]["out"] / "model" for i in range(cfg.members)]
    students = {
        "student-ensemble": {"teacher": LiveTeacherSpec(path=members)},
        "student-mcdropout": {
            "teacher": MCDropoutTeacherSpec(path=members[0], samples=cfg.mc_samples)
        },
    }
    for name, teacher in students.items():
        run_cfg = RunConfig(
            **base,
            **teacher,
            objectives=cfg.distill_objectives,
            train=cfg.train.model_copy(update={"seed": first}),
            out=out / name,
        )
        summary, _ = run_or_reuse(run_cfg, f"s{seed}-{name}", reuse=reuse)
        runs[name] = {"out": run_cfg.out, **summary}
    return runs


def _evaluate_seed(
    cfg: CalibrateConfig,
    seed: int,
    runs: dict[str, dict[str, Any]],
    pooled: dict[str, CalibrationStats],
) -> dict[str, dict[str, float]]:
    """Every predictor's metrics on the test split (and its cost), for one seed."""
    device = resolve_device(cfg.train.device)
    member_dirs = [runs[f"member{i}"]["out"] / "model" for i in range(cfg.members)]
    tokenizer, val, test = prepare_data(cfg.data, DistEnv(), member_dirs[0], splits=("val", "test"))
    classes = getattr(test, "classes", None)
    cut = len(classes) if classes is not None else len(tokenizer)
    task = cfg.data.task

    def live(folder: Path) -> LiveTeacher:
        return LiveTeacher(load_pretrained(folder, "model", task).to(device))

    members = [live(d) for d in member_dirs]
    single = members[0]
    val_logits, val_labels = [], []
    for logits, labels, _ in predictions(
        single, val, device=device, max_batches=cfg.temperature_batches, vocab=cut
    ):
        val_logits.append(logits.cpu())
        val_labels.append(labels.cpu())
    temperature = fit_temperature(torch.cat(val_logits), torch.cat(val_labels))
    predictors: dict[str, tuple[TeacherSignal, int]] = {  # (predictor, forward passes)
        "single": (single, 1),
        "single + temperature": (TemperatureScaled(single, temperature), 1),
        "MC dropout": (MCDropoutTeacher(single, cfg.mc_samples, vocab=cut), cfg.mc_samples),
        "deep ensemble": (EnsembleTeacher(members, vocab=cut), cfg.members),
        "student ← ensemble": (live(runs["student-ensemble"]["out"] / "model"), 1),
        "student ← MC dropout": (live(runs["student-mcdropout"]["out"] / "model"), 1),
    }
    member_flops = [runs[f"member{i}"]["flops"] for i in range(cfg.members)]
    train_flops = {
        "single": member_flops[0],
        "single + temperature": member_flops[0],
        "MC dropout": member_flops[0],
        "deep ensemble": sum(member_flops),
        "student ← ensemble": sum(member_flops) + runs["student-ensemble"]["flops"],
        "student ← MC dropout": member_flops[0] + runs["student-mcdropout"]["flops"],
    }
    out: dict[str, dict[str, float]] = {}
    for name, (predictor, passes) in predictors.items():
        seed_everything(seed)  # MC dropout's masks are reproducible
        stats = CalibrationStats()
        with torch.inference_mode():
            metrics = evaluate_model(
                predictor,
                test,
                device=device,
                max_batches=cfg.eval_batches,
                vocab=cut,
                n_bins=cfg.n_bins,
                stats=stats,
            )
        seconds = inference_seconds(predictor, test, device, cut)
        pooled.setdefault(name, CalibrationStats()).parts.extend(stats.parts)
        out[name] = {
            **{k: metrics[k] for k in ("accuracy", "ece", "mce", "brier")},
            "nll": metrics["val_loss"],
            "ece_mass": stats.metrics(cfg.n_bins, "mass")["ece"],
            "passes": passes,
            "seconds": seconds,
            "train_flops": train_flops[name],
            **({"macro_f1": metrics["macro_f1"]} if "macro_f1" in metrics else {}),
            **({"temperature": temperature} if name == "single + temperature" else {}),
        }
    base = out["single"]["seconds"]
    for row in out.values():
        row["time_vs_single"] = row["seconds"] / base
    return out


def calibrate(cfg: CalibrateConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Train, evaluate and tabulate; returns the result written to ``<name>.json``."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    pooled: dict[str, CalibrationStats] = {}
    per_seed = {}
    for seed in cfg.seeds:
        runs = _train_models(cfg, seed, reuse=not overwrite)
        per_seed[seed] = _evaluate_seed(cfg, seed, runs, pooled)
    rows = {}
    for name in PREDICTORS:
        values = [per_seed[s][name] for s in cfg.seeds]
        row: dict[str, Any] = {}
        keys = [*METRICS, *(["macro_f1"] if "macro_f1" in values[0] else [])]
        for key in [*keys, "time_vs_single", "train_flops"]:
            mean, std = mean_std([v[key] for v in values])
            row[key] = {"mean": mean, "std": std}
        for key in ("nll", "ece"):  # paired with the single model of the same seed
            diffs = [per_seed[s][name][key] - per_seed[s]["single"][key] for s in cfg.seeds]
            mean, std = mean_std(diffs)
            row[f"{key}_vs_single"] = {"mean": mean, "std": std}
        row["passes"] = values[0]["passes"]
        if name == "single + temperature":
            row["temperatures"] = [v["temperature"] for v in values]
        rows[name] = row
    result = {
        "name": cfg.name,
        "task": cfg.data.task,
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "members": cfg.members,
        "mc_samples": cfg.mc_samples,
        "n_bins": cfg.n_bins,
        "test_predictions": int(pooled["single"].table.shape[0] / len(cfg.seeds)),
        "rows": rows,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "reliability": {
            name: {
                "width": stats.bins(cfg.n_bins, "width"),
            }
            for name, stats in pooled.items()
        },
        "config": cfg.model_dump(mode="json"),
    }
    write_study(
        cfg.name,
        result,
        calibration_markdown(result),
        [out, cfg.results],
        lambda folder: plot_reliability(result, folder / f"{cfg.name}-reliability.png"),
    )
    return result


def _cell(value: dict[str, float], digits: int) -> str:
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _delta(value: dict[str, float], digits: int) -> str:
    if value["mean"] == 0 and value["std"] == 0:
        return "—"
    return f"{value['mean']:+.{digits}f} ± {value['std']:.{digits}f}"


def calibration_markdown(result: dict[str, Any]) -> str:
    """The table (mean ± std over seeds) and a plain answer."""
    rows, seeds = result["rows"], result["seeds"]
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
    lines += _answer(rows, len(seeds))
    return "\n".join(lines) + "\n"


def _answer(rows: dict[str, Any], seeds: int) -> list[str]:
    """Plain sentences: the ensemble student against the single model (paired by seed), the
    ensemble and temperature scaling, on ECE and NLL."""
    out = []
    student, single = rows["student ← ensemble"], rows["single"]
    for metric, label, digits in (("ece", "ECE", 4), ("nll", "NLL", 3)):
        paired = student[f"{metric}_vs_single"]
        said = summary_verdict(
            paired["mean"], paired["std"], seeds, lower_is_better=True, digits=digits
        )
        out.append(
            f"- {label}: the student distilled from the ensemble against the single model, "
            f"paired by seed: {said} ({single[metric]['mean']:.{digits}f} → "
            f"{student[metric]['mean']:.{digits}f}). The ensemble itself: "
            f"{rows['deep ensemble'][metric]['mean']:.{digits}f}; temperature scaling: "
            f"{rows['single + temperature'][metric]['mean']:.{digits}f}; the MC-dropout "
            f"student: {rows['student ← MC dropout'][metric]['mean']:.{digits}f}."
        )
    return out


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
        top.set(xlim=(0, 1), ylim=(0, 1), title=name)
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
