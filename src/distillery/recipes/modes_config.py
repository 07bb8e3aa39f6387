"""The configs of ``distillery mode NAME``: each mode's arms, compared with plain distillation."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from distillery.config import CrossEntropyObjective, ForwardKLObjective, ObjectiveConfig, Strict
from distillery.recipes.study import SeededStudy, TeacherStudentRecipe
from distillery.recipes.tuning import Tuning


class MultiTeacherMode(Strict):
    """Several teachers (trained with seeds ``teacher_train.seed + i``) distilled together into
    one student, against the student distilled from the first teacher alone at equal FLOPs.
    With ``teacher_stage`` the teachers are the stage's converged ones, one per stage seed
    (``teachers`` must equal their number), and seed index i's single-teacher arms learn from
    teacher i mod K."""

    kind: Literal["multi-teacher"] = "multi-teacher"
    teachers: int = Field(3, ge=2)
    weights: list[Annotated[float, Field(ge=0.0)]] | None = None  # one per teacher
    ensemble: Literal["mean", "confident"] = "mean"

    @model_validator(mode="after")
    def _one_weight_each(self) -> MultiTeacherMode:
        if self.weights is not None and len(self.weights) != self.teachers:
            raise ValueError(f"weights: give one weight per teacher ({self.teachers})")
        return self


class SelfDistillMode(Strict):
    """Born-again networks: generation k (the teacher's architecture, random init) learns from
    generation k−1, generation 0 being the teacher; against the teacher's architecture trained
    plainly with the FLOPs of the whole chain."""

    kind: Literal["self-distill"] = "self-distill"
    generations: int = Field(2, ge=1)
    # each generation's steps (with teacher_train's other settings); unset: teacher_train.steps,
    # or with teacher_stage the stage's max_steps (the converged teacher's cap)
    steps: int | None = Field(None, gt=0)


class RoundsMode(Strict):
    """Teacher assistants: teacher → assistants → student, each round initialised from every
    other layer of the previous model and distilled from it; against teacher → student
    directly with the FLOPs of all rounds."""

    kind: Literal["rounds"] = "rounds"
    assistants: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [4], min_length=1)


class TwoStepMode(Strict):
    """Step 1: the student trained on the data with the task loss (``first_fraction`` of
    ``student_train.steps``); step 2: fine-tuned on the teacher's soft targets; against the
    ``objectives`` mix from the start, at equal FLOPs."""

    kind: Literal["two-step"] = "two-step"
    first_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    finetune_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [ForwardKLObjective(weight=1.0, temperature=2.0)], min_length=1
    )


ModeConfig = Annotated[
    MultiTeacherMode | SelfDistillMode | RoundsMode | TwoStepMode, Field(discriminator="kind")
]
MODES = ("multi-teacher", "self-distill", "rounds", "two-step")


class ModesConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery mode NAME``: one distillation mode against plain distillation at equal
    compute, over several seeds (the teacher is trained once and shared by every seed; with
    ``teacher_stage``, seed index i learns from the stage's converged teacher i mod n)."""

    mode: ModeConfig = Field(default_factory=SelfDistillMode)
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            CrossEntropyObjective(weight=1.0),
            ForwardKLObjective(weight=1.0, temperature=2.0),
        ],
        min_length=1,
    )
    # set: each arm's lr and warmup (every run of its chain) chosen on validation first
    tune: Tuning | None = None
    uses_teacher_stage: ClassVar[bool] = True
    out: Path = Path("runs/modes")

    @model_validator(mode="after")
    def _mode_fits(self) -> ModesConfig:
        if not any(o.kind != "ce" for o in self.objectives):
            raise ValueError("objectives: give at least one teacher objective (e.g. forward_kl)")
        if self.tune is not None:
            self.tune.check_seed(self.seeds)
        mode, stage = self.mode, self.teacher_stage
        if isinstance(mode, MultiTeacherMode) and stage and mode.teachers != len(stage.seeds):
            raise ValueError(
                f"mode.teachers: with teacher_stage the teachers are the stage's converged "
                f"ones, one per seed {stage.seeds}; set mode.teachers={len(stage.seeds)}"
            )
        if isinstance(self.mode, RoundsMode):
            sizes = [self.teacher_layers, *self.mode.assistants, self.student_layers]
            for big, small in itertools.pairwise(sizes):
                if not big > small or 2 * small - 1 > big:
                    raise ValueError(
                        f"mode.assistants: each round must shrink the model and keep every "
                        f"other layer ({big} → {small} layers cannot); sizes {sizes}"
                    )
        return self
