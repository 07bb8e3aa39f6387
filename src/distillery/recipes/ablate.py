"""``distillery ablate``: what each part of a distillation mix buys, over several seeds.

1. train a teacher (or reuse the one a previous call trained with the same config);
2. for every arm (the full mix, each objective dropped, random initialisation) and every seed,
   distil the same half-depth student — finished runs with an unchanged config are reused, so
   an interrupted ablation continues where it stopped;
3. write ``ablation.md`` and ``ablation.json`` (validation perplexity and agreement, mean ± std
   over seeds) to the output folder and to ``results`` when set.

The seed sets the data order, the random initialisations and the projections; runs of one seed
see the same batches in every arm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from distillery.config import ModelSpec, ObjectiveConfig, RunConfig, Strict
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.quickstart import teacher_config
from distillery.recipes.study import (
    SeededStudy,
    TeacherStudentRecipe,
    distilbert_mix,
    hardware,
    mean_std,
    run_or_reuse,
    write_study,
)


class AblationArm(Strict):
    """One arm of an ablation: the full objective mix minus ``drop``, with or without the
    student initialised from the teacher's layers."""

    drop: list[str] = Field(default_factory=list)  # objective kinds left out
    init_from_teacher: bool = True


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
    out: Path = Path("runs/ablation")

    @model_validator(mode="after")
    def _arms_make_sense(self) -> AblationConfig:
        kinds = [o.kind for o in self.objectives]
        if len(set(kinds)) != len(kinds):
            raise ValueError("objectives: each kind once (arms drop objectives by kind)")
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
KEPT = (*METRICS, "flops", "train_seconds")


def _describe(objectives: list[Any]) -> str:
    return " + ".join(f"{o.weight:g}·{o.kind}" for o in objectives)


def ablate(cfg: AblationConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every arm × seed into ``cfg.out`` (``overwrite``: rerun even finished runs); return
    the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    teacher, reused = run_or_reuse(
        teacher_config(cfg, out / "teacher"), "teacher", reuse=not overwrite
    )
    reuse = reused  # students of another teacher (retrained now) are never reused
    teacher_model = out / "teacher" / "model"
    student_data = cfg.data.model_copy(update={"tokenizer": teacher_model})
    overrides = {**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers}

    arms: dict[str, dict[str, Any]] = {}
    for name, arm in cfg.arms.items():
        objectives = [o for o in cfg.objectives if o.kind not in arm.drop]
        runs = []
        for seed in cfg.seeds:
            run_cfg = RunConfig(
                data=student_data,
                model=ModelSpec(
                    preset=cfg.teacher.preset,
                    overrides=overrides,
                    init_from_teacher="every_other" if arm.init_from_teacher else None,
                ),
                teacher=teacher_model,
                objectives=objectives,
                train=cfg.student_train.model_copy(update={"seed": seed}),
                out=out / name / f"seed-{seed}",
            )
            summary, _ = run_or_reuse(run_cfg, f"{name}/seed-{seed}", reuse=reuse)
            runs.append({"seed": seed, **{k: summary[k] for k in KEPT}})
        stats = {}
        for key in METRICS:
            mean, std = mean_std([r[key] for r in runs])
            stats[key] = {"mean": mean, "std": std}
        arms[name] = {
            "objectives": _describe(objectives),
            "init": "teacher (every other layer)" if arm.init_from_teacher else "random",
            "runs": runs,
            **stats,
        }

    result = {
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "teacher": {k: teacher[k] for k in ("val_ppl", "val_loss", "accuracy", "layers")},
        "student_layers": cfg.student_layers,
        "student_steps": cfg.student_train.steps,
        "arms": arms,
        "config": cfg.model_dump(mode="json"),
    }
    write_study("ablation", result, ablation_markdown(result), [out, cfg.results])
    return result


def ablation_markdown(result: dict[str, Any]) -> str:
    """The ablation table: one row per arm, mean ± std over seeds, Δ against the first arm."""
    arms = result["arms"]
    base = next(iter(arms.values()))
    lines = [
        f"# Ablation ({result['hardware']}, seeds {result['seeds']})",
        "",
        f"Teacher: {result['teacher']['layers']} layers, validation perplexity "
        f"{result['teacher']['val_ppl']:.1f}. Student: {result['student_layers']} layers, "
        f"{result['student_steps']} steps per run; mean ± sample std over "
        f"{len(result['seeds'])} seeds.",
        "",
        "| arm | objectives | init | val ppl | Δ ppl vs first | agreement | KL(teacher‖student) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        ppl, agree, kl = arm["val_ppl"], arm["agreement"], arm["kl_teacher_student"]
        delta = ppl["mean"] - base["val_ppl"]["mean"]
        lines.append(
            f"| {name} | {arm['objectives']} | {arm['init']} | "
            f"{ppl['mean']:.1f} ± {ppl['std']:.1f} | {delta:+.1f} | "
            f"{agree['mean']:.3f} ± {agree['std']:.3f} | {kl['mean']:.3f} ± {kl['std']:.3f} |"
        )
    return "\n".join(lines) + "\n"
