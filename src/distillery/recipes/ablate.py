"""``distillery ablate``: what each part of a distillation mix buys, over several seeds.

1. train a teacher (or reuse the one a previous call trained with the same config) — with
   ``teacher_stage`` set, converged teachers, one per stage seed, shared by every study;
2. for every arm (the full mix, each objective dropped, random initialisation — or each arm's
   own mix, a rung of a ladder) and every seed, distil the same half-depth student — finished
   runs with an unchanged config are reused, so an interrupted ablation continues where it
   stopped;
3. write ``ablation.md`` and ``ablation.json`` (validation perplexity and agreement, mean ± std
   over seeds; each arm minus the comparison arm paired by seed, with its 95% t-interval and
   verdict; the teacher beside the best no-teacher student) to the output folder and to
   ``results`` when set.

The seed sets the data order, the random initialisations and the projections; runs of one seed
see the same batches, and learn from the same teacher, in every arm.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from distillery.config import ModelSpec, ObjectiveConfig, RunConfig, Strict, needs_teacher
from distillery.eval.stats import verdict
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.study import (
    SeededStudy,
    TeacherStudentRecipe,
    distilbert_mix,
    hardware,
    mean_std,
    paired_interval,
    run_or_reuse,
    study_teachers,
    teacher_check,
    teacher_regime,
    write_study,
)
from distillery.recipes.tuning import Tuning, grid_table, shown, tuned


class AblationArm(Strict):
    """One arm of an ablation: the study's objective mix minus ``drop`` (or the arm's own
    ``objectives``: a rung of a ladder), with or without the student initialised from the
    teacher's layers."""

    drop: list[str] = Field(default_factory=list)  # objective kinds left out
    objectives: list[ObjectiveConfig] | None = Field(None, min_length=1)  # instead of the mix
    init_from_teacher: bool = True

    @model_validator(mode="after")
    def _one_way(self) -> AblationArm:
        if self.drop and self.objectives is not None:
            raise ValueError("give an arm 'drop' or its own 'objectives', not both")
        return self


def _distilbert_arms() -> dict[str, AblationArm]:
    return {
        "full": AblationArm(),
        "no-soft-kl": AblationArm(drop=["forward_kl"]),
        "no-cosine": AblationArm(drop=["hidden_cosine"]),
        "no-task-ce": AblationArm(drop=["ce"]),
        "random-init": AblationArm(init_from_teacher=False),
    }


class AblationConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery ablate``: one teacher, then the same student distilled with the full mix
    and with each part removed, over several seeds."""

    objectives: list[ObjectiveConfig] = Field(default_factory=distilbert_mix, min_length=1)
    arms: dict[str, AblationArm] = Field(default_factory=_distilbert_arms, min_length=1)
    compare_to: str | None = None  # the arm every arm is paired against (default: the first)
    tune: Tuning | None = None  # set: each arm's lr and warmup chosen on validation first
    uses_teacher_stage: ClassVar[bool] = True
    out: Path = Path("runs/ablation")

    @property
    def comparison(self) -> str:
        return self.compare_to or next(iter(self.arms))

    @model_validator(mode="after")
    def _arms_make_sense(self) -> AblationConfig:
        kinds = [o.kind for o in self.objectives]
        if len(set(kinds)) != len(kinds) and any(a.drop for a in self.arms.values()):
            raise ValueError("objectives: each kind once (arms drop objectives by kind)")
        if self.compare_to is not None and self.compare_to not in self.arms:
            raise ValueError(f"compare_to: {self.compare_to!r} is not one of the arms")
        if self.tune is not None:
            self.tune.check_seed(self.seeds)
        for name, arm in self.arms.items():
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"arms: name {name!r} must be letters, digits, '-' or '_'")
            unknown = sorted(set(arm.drop) - set(kinds))
            if unknown:
                raise ValueError(f"arms.{name}.drop: {unknown} not among the objectives {kinds}")
            if set(kinds) <= set(arm.drop):
                raise ValueError(f"arms.{name}: drops every objective")
        return self


METRICS = ("val_ppl", "val_loss", "agreement", "kl_teacher_student", "accuracy")
KEPT = (*METRICS, "flops", "steps", "train_seconds")
# Paired against the comparison arm, and which way is better.
COMPARED = {"val_ppl": True, "agreement": False, "kl_teacher_student": True}  # lower is better


def _describe(objectives: list[Any]) -> str:
    def one(o: Any) -> str:
        temperature = getattr(o, "temperature", None)
        return f"{o.weight:g}·{o.kind}" + (f"(T={temperature:g})" if temperature else "")

    return " + ".join(one(o) for o in objectives)


def _no_teacher(arm: AblationArm, objectives: list[Any]) -> bool:
    """An arm that learns nothing from the teacher: random init, no objective reading it."""
    return not arm.init_from_teacher and not any(needs_teacher(o) for o in objectives)


def _arm_run(
    cfg: AblationConfig,
    arm: AblationArm,
    objectives: list[Any],
    train: Any,
    folder: Path,
    teacher: Path,
) -> RunConfig:
    """The run of ``arm`` with ``train`` settings into ``folder``, learning from ``teacher``."""
    return RunConfig(
        data=cfg.data.model_copy(update={"tokenizer": teacher}),
        model=ModelSpec(
            preset=cfg.teacher.preset,
            overrides={**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers},
            init_from_teacher="every_other" if arm.init_from_teacher else None,
        ),
        teacher=teacher,
        objectives=objectives,
        train=train,
        out=folder,
    )


def ablate(cfg: AblationConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every arm × seed into ``cfg.out`` (``overwrite``: rerun even finished runs); return
    the table's data. Seed i of every arm learns from the same teacher (``study_teachers``),
    so arms are compared paired by seed."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    teachers = study_teachers(cfg, out, reuse=not overwrite)
    reuse = teachers.reused  # students of another teacher (retrained now) are never reused

    arms: dict[str, dict[str, Any]] = {}
    for name, arm in cfg.arms.items():
        objectives = arm.objectives or [o for o in cfg.objectives if o.kind not in arm.drop]

        build = partial(_arm_run, cfg, arm, objectives)  # (train, folder, teacher) -> run

        train, tuning = cfg.student_train, None
        if cfg.tune is not None:  # the arm's lr and warmup, on the first seed's teacher
            train, tuning = tuned(
                cfg.tune, train, partial(build, teacher=teachers.folders(0)),
                out / name / "tune", name, reuse=reuse,
            )  # fmt: skip
        runs = []
        for i, seed in enumerate(cfg.seeds):
            teacher_model = teachers.folders(i)
            run_cfg = build(train.model_copy(update={"seed": seed}), out / name / f"seed-{seed}",
                            teacher_model)  # fmt: skip
            summary, _ = run_or_reuse(run_cfg, f"{name}/seed-{seed}", reuse=reuse)
            runs.append({"seed": seed, "teacher": str(teacher_model),
                         **{k: summary[k] for k in KEPT}})  # fmt: skip
        stats = {}
        for key in METRICS:
            mean, std = mean_std([r[key] for r in runs])
            stats[key] = {"mean": mean, "std": std}
        arms[name] = {
            "objectives": _describe(objectives),
            "init": "teacher (every other layer)" if arm.init_from_teacher else "random",
            "no_teacher": _no_teacher(arm, objectives),
            "lr": train.lr,
            "warmup_steps": train.warmup_steps,
            "tuning": tuning,
            "runs": runs,
            **stats,
        }
    base = arms[cfg.comparison]["runs"]
    for arm in arms.values():
        arm["vs_comparison"] = {}
        for key, lower in COMPARED.items():
            interval = paired_interval(arm["runs"], base, key)
            assert interval is not None  # every arm ran every seed
            arm["vs_comparison"][key] = {
                **interval.as_dict(),
                "verdict": verdict(interval, lower_is_better=lower),
            }

    result = {
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "teacher": teachers.info,
        "student_layers": cfg.student_layers,
        "student_steps": cfg.student_train.steps,
        "student_flops_budget": cfg.student_train.flops_budget,
        "comparison": cfg.comparison,
        "arms": arms,
        "config": cfg.model_dump(mode="json"),
    }
    write_study("ablation", result, ablation_markdown(result), [out, cfg.results])
    return result


def _ci(vs: dict[str, Any], digits: int) -> str:
    """``+3.2 [-1.0, +7.4]`` (an unbounded interval: one seed)."""
    if vs["low"] is None:
        return f"{vs['mean']:+.{digits}f} [one seed]"
    return f"{vs['mean']:+.{digits}f} [{vs['low']:+.{digits}f}, {vs['high']:+.{digits}f}]"


def _setting(arm: dict[str, Any]) -> str:
    """``2e-3, 20`` (the arm's lr and warmup; tuned ones say so, an lr at the grid's edge too)."""
    tuning, note = arm.get("tuning"), ""
    if tuning is not None:
        note = " (tuned, at the grid's edge)" if tuning["lr_at_edge"] else " (tuned)"
    return shown(arm) + note


def ablation_markdown(result: dict[str, Any]) -> str:
    """The ablation table: one row per arm, mean ± std over seeds, and each arm minus the
    comparison arm paired by seed (95% t-interval) with the verdict it gives."""
    arms, comparison, teacher = result["arms"], result["comparison"], result["teacher"]
    no_teacher = [r for arm in arms.values() if arm.get("no_teacher") for r in arm["runs"]]
    compute = (
        f"at equal FLOPs ({result['student_flops_budget']:.3g} per run, teacher forwards counted)"
        if result.get("student_flops_budget")
        else f"{result['student_steps']} steps per run"
    )
    regime = teacher_regime(teacher)
    lines = [
        f"# Ablation ({result['hardware']}, seeds {result['seeds']})",
        "",
        f"Teacher: {teacher['layers']} layers, {regime}, trained with {teacher['flops']:.3g} "
        f"FLOPs. {teacher_check(teacher, no_teacher)}",
        "",
        f"Student: {result['student_layers']} layers, {compute}; mean ± sample std over "
        f"{len(result['seeds'])} seeds; Δ = arm − **{comparison}** paired by seed, with its "
        "95% t-interval; the verdict is read off the interval (lower perplexity is better).",
        "",
        f"| arm | objectives | init | lr, warmup | steps | val ppl | Δ ppl vs {comparison} "
        "[95% CI] | verdict | agreement | KL(teacher‖student) |",
        "|---|---|---|---|---:|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        ppl, agree, kl = arm["val_ppl"], arm["agreement"], arm["kl_teacher_student"]
        vs = arm["vs_comparison"]["val_ppl"]
        steps = sorted({r["steps"] for r in arm["runs"]})
        lines.append(
            f"| {name} | {arm['objectives']} | {arm['init']} | {_setting(arm)} | "
            f"{'/'.join(str(s) for s in steps)} | {ppl['mean']:.1f} ± {ppl['std']:.1f} | "
            f"{'–' if name == comparison else _ci(vs, 1)} | "
            f"{'–' if name == comparison else vs['verdict']} | "
            f"{agree['mean']:.3f} ± {agree['std']:.3f} | {kl['mean']:.3f} ± {kl['std']:.3f} |"
        )
    tuned = {name: arm["tuning"] for name, arm in arms.items() if arm.get("tuning")}
    lines += grid_table(tuned, "validation loss")
    return "\n".join(lines) + "\n"
