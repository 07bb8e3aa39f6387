"""``distillery quickstart``: the whole lab in one go on the embedded corpus.

1. train a teacher on the data;
2. distil a half-depth student initialised from every other teacher layer;
3. train the same student architecture from scratch, same steps, tokens and data order;
4. evaluate all three against the teacher; write summary.json, report.md, loss curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from distillery.config import (
    CrossEntropyObjective,
    ForwardKLObjective,
    ModelSpec,
    ObjectiveConfig,
    RunConfig,
)
from distillery.errors import DistilleryError
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.run import run
from distillery.recipes.study import TeacherStudentRecipe
from distillery.report import markdown_table, write_report


class QuickstartConfig(TeacherStudentRecipe):
    """The main job: train a teacher, distil a half-depth student, train it from scratch too."""

    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            CrossEntropyObjective(weight=1.0),
            ForwardKLObjective(weight=1.0, temperature=2.0),
        ]
    )
    out: Path = Path("runs/quickstart")


KEPT = (
    "params",
    "layers",
    "val_loss",
    "val_ppl",
    "accuracy",
    "agreement",
    "kl_teacher_student",
    "flops",
    "tokens",
    "train_seconds",
    "tokens_per_s",
    "generation_tokens_per_s",
    "size_on_disk",
)


def report_notes(source: str, models: dict[str, dict[str, Any]]) -> list[str]:
    """The paragraphs under the quickstart table: what was compared, and how to read compute."""
    d, s = models["student-distilled"], models["student-scratch"]
    return [
        f"Data: `{source}`, validation split ({int(d.get('tokens', 0)):,} training tokens "
        "per student). Perplexity and accuracy are on held-out text; agreement is the rate at "
        "which a model's top-1 next token equals the teacher's.",
        f"Distilled vs scratch student at equal steps and tokens: val perplexity "
        f"{d['val_ppl']:.1f} vs {s['val_ppl']:.1f}.",
        "Compute: `flops` is what each run spent (6·N·tokens for training, plus 2·N_teacher·tokens "
        "for the teacher's forwards when distilling); `flops_with_teacher` adds the teacher's own "
        "training to the distilled student. At equal *total* compute the comparison is not "
        "the same as at equal steps: read both columns.",
    ]


def teacher_config(cfg: TeacherStudentRecipe, out: Path) -> RunConfig:
    """The teacher's run: ``cfg.teacher`` trained on the data with the task loss alone."""
    return RunConfig(
        data=cfg.data,
        model=cfg.teacher,
        objectives=[CrossEntropyObjective()],
        train=cfg.teacher_train,
        out=out,
    )


def quickstart(cfg: QuickstartConfig, *, overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Run the three arms into ``cfg.out`` and return the per-model summary."""
    if cfg.teacher.preset is None:
        raise DistilleryError("quickstart trains its teacher from a preset: set teacher.preset")
    out = Path(cfg.out)
    for name in ("teacher", "student-distilled", "student-scratch", "report.md"):
        if (out / name).exists() and not overwrite:
            raise DistilleryError(f"--out {out} already holds a quickstart; use --overwrite")
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)

    teacher_dir = out / "teacher"
    run(teacher_config(cfg, teacher_dir), overwrite=overwrite, name="teacher")

    student_overrides = {**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers}
    student_data = cfg.data.model_copy(update={"tokenizer": teacher_dir / "model"})
    distilled_cfg = RunConfig(
        data=student_data,
        model=ModelSpec(
            preset=cfg.teacher.preset, overrides=student_overrides, init_from_teacher="every_other"
        ),
        teacher=teacher_dir / "model",
        objectives=cfg.objectives,
        train=cfg.student_train,
        out=out / "student-distilled",
    )
    run(distilled_cfg, overwrite=overwrite, name="student-distilled")

    # Same architecture, task loss only; the teacher is loaded only to measure agreement.
    scratch_cfg = RunConfig(
        data=student_data,
        model=ModelSpec(preset=cfg.teacher.preset, overrides=student_overrides),
        teacher=teacher_dir / "model",
        objectives=[CrossEntropyObjective()],
        train=cfg.student_train,
        out=out / "student-scratch",
    )
    run(scratch_cfg, overwrite=overwrite, name="student-scratch")

    models: dict[str, dict[str, Any]] = {}
    for name in ("teacher", "student-distilled", "student-scratch"):
        summary = json.loads((out / name / "summary.json").read_text(encoding="utf-8"))
        models[name] = {"run_dir": str(out / name), **{k: summary.get(k) for k in KEPT}}
    models["teacher"].update(agreement=1.0, kl_teacher_student=0.0)
    teacher_flops = models["teacher"]["flops"]
    models["teacher"]["flops_with_teacher"] = teacher_flops
    models["student-distilled"]["flops_with_teacher"] = (
        models["student-distilled"]["flops"] + teacher_flops
    )
    models["student-scratch"]["flops_with_teacher"] = models["student-scratch"]["flops"]

    notes = report_notes(cfg.data.source, models)
    write_report(out, models, title="distillery quickstart", notes=notes, config=cfg)
    print(markdown_table(models))
    print(f"\nreport: {out / 'report.md'} ({out / 'report.html'})  summary: {out / 'summary.json'}")
    return models
