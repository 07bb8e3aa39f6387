"""``distillery calibrate``: are students distilled from an ensemble better calibrated?

For each seed s, every model has the same architecture and residual dropout:

- ``members``: M models trained with seeds s·M, …, s·M+M−1 (member 0 is *the single model*):
  ``train.steps`` steps, or with ``member_stage`` until the validation loss stops improving
  (the teacher stage's rule: patience, the best checkpoint kept; ``recipes.teacher_stage``);
- ``student ← ensemble``: trained towards the deep ensemble's mean distribution;
- ``student ← MC dropout``: trained towards the single model's MC-dropout mean;
  both students start from the single model's seed (same initialisation and data order) and
  train ``train.steps`` steps on the *transfer set*: the members' own training split
  (``transfer: train``) or ``data.transfer_fraction`` of the training articles that the members
  never saw (``transfer: heldout``; ``DataConfig.train_split``). With ``distill_temperatures``
  there is one student per teacher and T: every soft objective of ``distill_objectives`` at T,
  so the KL targets the *softened* teacher distribution ∝ p̄^(1/T) (times T², the loss
  contract); the student is evaluated, like every predictor, at T = 1.

On the test split (the temperature is fitted on the validation split), the predictors are:
the single model; the single model with temperature scaling; MC dropout (K passes); the deep
ensemble (M models); the students. Reported: accuracy, NLL, ECE (equal-width and equal-mass
bins), MCE, Brier, forward passes and measured time per prediction relative to the single
model, and the training FLOPs behind each predictor; for ECE, NLL and Brier also 95% bootstrap
intervals over test blocks (classification: examples; the same resampled ones for every
predictor and seed, seeded), and
each predictor's paired bootstrap difference from the single model. Writes ``<name>.{md,json}``
and ``<name>-reliability.png`` (``recipes.calibrate_report``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
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
from distillery.eval import (
    CalibrationStats,
    bootstrap_calibration,
    bootstrap_weights,
    calibration_sums,
    evaluate_model,
    fit_temperature,
    prediction_groups,
    predictions,
)
from distillery.eval.metrics import inference_seconds
from distillery.models import load_pretrained
from distillery.recipes.calibrate_report import calibration_markdown, plot_reliability
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.study import SeededStudy, hardware, mean_std, run_or_reuse, write_study
from distillery.recipes.teacher_stage import TeacherStage, converged_teacher, stage_run_config
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
    # Set: members trained to early stopping (eval_every, patience, max_steps; the students
    # keep train.steps). Its seeds are the members' (leave them out); root: <out>/members.
    member_stage: TeacherStage | None = None
    mc_samples: int = Field(8, ge=2)  # stochastic passes of MC dropout
    distill_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [ForwardKLObjective(weight=1.0, temperature=1.0)], min_length=1
    )  # the students' objectives (towards the ensemble's / MC dropout's mean distribution)
    # One student per teacher and T, every soft objective at T (None: one student per teacher,
    # the objectives' own temperatures, named without T as before).
    distill_temperatures: list[Annotated[float, Field(gt=0.0)]] | None = Field(None, min_length=1)
    # What the students are distilled on: the members' training split, or the held-out
    # data.transfer_fraction of the training articles (the members train on the rest).
    transfer: Literal["train", "heldout"] = "train"
    n_bins: int = Field(10, ge=2)  # equal-width ECE bins (equal-mass ECE is reported too)
    eval_batches: int | None = Field(None, gt=0)  # cap on test batches (None: the whole split)
    temperature_batches: int = Field(8, gt=0)  # validation batches the temperature is fitted on
    bootstrap_samples: int = Field(1000, ge=100)  # resamples of the test blocks / examples
    bootstrap_seed: int = Field(0, ge=0)
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
        if self.data.train_split != "train":
            raise ValueError("data.train_split: calibrate chooses it (set transfer instead)")
        if (self.transfer == "heldout") != (self.data.transfer_fraction > 0):
            raise ValueError(
                "transfer: heldout needs data.transfer_fraction > 0, and only it uses one"
            )
        if self.member_stage is not None and "seeds" in self.member_stage.model_fields_set:
            raise ValueError("member_stage.seeds: the members' seeds come from seeds and members")
        temps = self.distill_temperatures
        if temps is not None:
            if len(set(temps)) != len(temps):
                raise ValueError("distill_temperatures: give each temperature once")
            if not any("temperature" in type(o).model_fields for o in self.distill_objectives):
                raise ValueError("distill_temperatures: no objective in distill_objectives has one")
        return self


@dataclass(frozen=True)
class StudentArm:
    """One student: its run folder, predictor name, teacher ("ensemble" / "mcdropout"), T."""

    folder: str
    name: str
    teacher: str
    temperature: float | None


def student_arms(cfg: CalibrateConfig) -> list[StudentArm]:
    """The students, towards the ensemble then MC dropout, each at every distillation T."""
    arms = []
    for teacher, label in (("ensemble", "ensemble"), ("mcdropout", "MC dropout")):
        for t in cfg.distill_temperatures or [None]:
            folder, name = f"student-{teacher}", f"student ← {label}"
            if t is not None:
                folder, name = f"{folder}-T{t:g}", f"{name} (T={t:g})"
            arms.append(StudentArm(folder, name, teacher, t))
    return arms


# The rows without distill_temperatures (with them, the students are named with their T).
PREDICTORS = ("single", "single + temperature", "MC dropout", "deep ensemble",
              "student ← ensemble", "student ← MC dropout")  # fmt: skip
METRICS = ("accuracy", "nll", "ece", "ece_mass", "mce", "brier")


def predictor_names(cfg: CalibrateConfig) -> list[str]:
    """The table's rows: the four predictors of the members, then ``student_arms``."""
    return [*PREDICTORS[:4], *(a.name for a in student_arms(cfg))]


def _objectives_at(cfg: CalibrateConfig, temperature: float | None) -> list[Any]:
    """``distill_objectives`` with every soft objective at ``temperature`` (None: as given)."""
    if temperature is None:
        return list(cfg.distill_objectives)
    return [
        type(o).model_validate({**o.model_dump(), "temperature": temperature})
        if "temperature" in type(o).model_fields
        else o
        for o in cfg.distill_objectives
    ]


def _member_stage(cfg: CalibrateConfig) -> TeacherStage | None:
    """``member_stage`` with its folders under ``<out>/members`` unless it names a root."""
    stage = cfg.member_stage
    if stage is None or "root" in stage.model_fields_set:
        return stage
    return stage.model_copy(update={"root": Path(cfg.out) / "members"})


def run_configs(cfg: CalibrateConfig, seed: int) -> dict[str, RunConfig]:
    """The seed's runs: ``member<i>`` (early-stopped: the teacher stage's run) and each
    student arm's folder; the students read the transfer split."""
    out, first = Path(cfg.out) / f"seed{seed}", seed * cfg.members
    stage = _member_stage(cfg)
    configs = {}
    for i in range(cfg.members):
        train = cfg.train.model_copy(update={"seed": first + i})
        configs[f"member{i}"] = (
            RunConfig(data=cfg.data, model=cfg.model, train=train, out=out / f"member{i}")
            if stage is None
            else stage_run_config(cfg.data, cfg.model, train, stage, first + i)
        )
    members = [Path(configs[f"member{i}"].out) / "model" for i in range(cfg.members)]
    split = "transfer" if cfg.transfer == "heldout" else "train"
    data = cfg.data.model_copy(update={"train_split": split})
    teachers = {
        "ensemble": LiveTeacherSpec(path=members),
        "mcdropout": MCDropoutTeacherSpec(path=members[0], samples=cfg.mc_samples),
    }
    for arm in student_arms(cfg):
        configs[arm.folder] = RunConfig(
            data=data,
            model=cfg.model,
            teacher=teachers[arm.teacher],
            objectives=_objectives_at(cfg, arm.temperature),
            train=cfg.train.model_copy(update={"seed": first}),
            out=out / arm.folder,
        )
    return configs


def _train_models(cfg: CalibrateConfig, seed: int, reuse: bool) -> dict[str, dict[str, Any]]:
    """The seed's members and students. With ``reuse``, finished runs with the same config are
    kept; students are retrained whenever a member was."""
    stage = _member_stage(cfg)
    runs: dict[str, dict[str, Any]] = {}
    for name, run_cfg in run_configs(cfg, seed).items():
        label = f"s{seed}-{name}"
        if name.startswith("member") and stage is not None:
            summary_path = Path(run_cfg.out) / "summary.json"
            done = summary_path.is_file() and json.loads(summary_path.read_text()).get("finished")
            summary, reused = converged_teacher(run_cfg, stage, reuse=reuse), bool(done)
            summary = {**summary, "flops": summary["flops_trained"]}  # patience steps included
        else:
            summary, reused = run_or_reuse(run_cfg, label, reuse=reuse)
        runs[name] = {"out": Path(run_cfg.out), **summary}
        if name.startswith("member"):
            reuse = reuse and reused
    return runs


def _evaluate_seed(
    cfg: CalibrateConfig,
    seed: int,
    runs: dict[str, dict[str, Any]],
    pooled: dict[str, CalibrationStats],
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Every predictor's metrics on the test split (and its cost), for one seed; and its
    ``calibration_sums`` per test block, for the bootstrap."""
    device = resolve_device(cfg.train.device)
    member_dirs = [runs[f"member{i}"]["out"] / "model" for i in range(cfg.members)]
    tokenizer, val, test = prepare_data(cfg.data, DistEnv(), member_dirs[0], splits=("val", "test"))
    classes = getattr(test, "classes", None)
    cut = len(classes) if classes is not None else len(tokenizer)
    task = cfg.data.task
    groups = prediction_groups(test, max_batches=cfg.eval_batches)
    n_groups = int(groups.max()) + 1

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
    }
    member_flops = [runs[f"member{i}"]["flops"] for i in range(cfg.members)]
    train_flops = {name: member_flops[0] for name in PREDICTORS[:3]}
    train_flops["deep ensemble"] = sum(member_flops)
    for arm in student_arms(cfg):
        predictors[arm.name] = (live(runs[arm.folder]["out"] / "model"), 1)
        behind = sum(member_flops) if arm.teacher == "ensemble" else member_flops[0]
        train_flops[arm.name] = behind + runs[arm.folder]["flops"]
    out: dict[str, dict[str, float]] = {}
    sums: dict[str, np.ndarray] = {}
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
        sums[name] = calibration_sums(stats.table, groups, n_groups, cfg.n_bins)
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
    return out, sums


def _training(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each run's steps, seconds, FLOPs; early-stopped members' best step and what stopped it."""
    kept = ("steps", "steps_trained", "best_step", "stopped", "train_seconds", "flops")
    return {name: {k: run[k] for k in kept if k in run} for name, run in runs.items()}


def _train_blocks(cfg: CalibrateConfig, runs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many training examples (token blocks) the members and the students read."""
    tokenizer_dir = runs["member0"]["out"] / "model"
    members = prepare_data(cfg.data, DistEnv(), tokenizer_dir, splits=("train",))[1]
    student_data = run_configs(cfg, cfg.seeds[0])[student_arms(cfg)[0].folder].data
    students = prepare_data(student_data, DistEnv(), tokenizer_dir, splits=("train",))[1]
    return {"members": members.num_blocks, "students": students.num_blocks}


def calibrate(cfg: CalibrateConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Train, evaluate and tabulate; returns the result written to ``<name>.json``."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    pooled: dict[str, CalibrationStats] = {}
    per_seed, sums, training = {}, {}, {}
    for seed in cfg.seeds:
        runs = _train_models(cfg, seed, reuse=not overwrite)
        per_seed[seed], sums[seed] = _evaluate_seed(cfg, seed, runs, pooled)
        training[str(seed)] = _training(runs)
    n_groups = sums[cfg.seeds[0]]["single"].shape[0]
    weights = bootstrap_weights(n_groups, cfg.bootstrap_samples, cfg.bootstrap_seed)
    single_sums = [sums[s]["single"] for s in cfg.seeds]
    unit = "test examples" if cfg.data.task == "classify" else "test blocks"
    rows = {}
    for name in predictor_names(cfg):
        values = [per_seed[s][name] for s in cfg.seeds]
        row: dict[str, Any] = {}
        keys = [*METRICS, *(["macro_f1"] if "macro_f1" in values[0] else [])]
        for key in [*keys, "time_vs_single", "train_flops"]:
            mean, std = mean_std([v[key] for v in values])
            row[key] = {"mean": mean, "std": std}
        for key in ("nll", "ece", "brier"):  # paired with the single model of the same seed
            diffs = [per_seed[s][name][key] - per_seed[s]["single"][key] for s in cfg.seeds]
            mean, std = mean_std(diffs)
            row[f"{key}_vs_single"] = {"mean": mean, "std": std}
        mine = [sums[s][name] for s in cfg.seeds]
        alone = bootstrap_calibration(mine, weights, unit=unit)
        row["bootstrap"] = {k: v.as_dict() for k, v in alone.items()}
        if name != "single":
            paired = bootstrap_calibration(mine, weights, single_sums, unit=unit)
            row["bootstrap_vs_single"] = {k: v.as_dict() for k, v in paired.items()}
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
        "train_blocks": _train_blocks(cfg, runs),
        "n_bins": cfg.n_bins,
        "test_predictions": int(pooled["single"].table.shape[0] / len(cfg.seeds)),
        "test_blocks": n_groups,  # what the bootstrap resamples (lm: blocks; classify: examples)
        "rows": rows,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "training": training,
        "reliability": {
            name: {"width": stats.bins(cfg.n_bins, "width")} for name, stats in pooled.items()
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
