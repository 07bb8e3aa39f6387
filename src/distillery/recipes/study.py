"""What studies share: seeds, a teacher the study trains, finished runs reused, statistics and
tables written to ``results/``."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
import yaml
from pydantic import Field, model_validator

from distillery.config import (
    CrossEntropyObjective,
    DataConfig,
    ForwardKLObjective,
    HiddenCosineObjective,
    ModelSpec,
    RunConfig,
    Strict,
    TrainConfig,
)
from distillery.distributed import is_main_process
from distillery.errors import DistilleryError, Diverged
from distillery.eval.stats import Interval, paired_t, t_interval, verdict
from distillery.files import atomic_write_text, write_json
from distillery.recipes.common import DIVERGED
from distillery.recipes.teacher_stage import (
    TeacherStage,
    stage_finished,
    teacher_for,
    train_teachers,
)
from distillery.report.html import first_heading, referenced_images, write_html


class TeacherStudentRecipe(Strict):
    """What recipes that train their own teacher and then half-depth students share."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelSpec = Field(default_factory=ModelSpec)
    teacher_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=240, lr=2e-3, warmup_steps=20)
    )
    student_layers: int = Field(2, gt=0)  # initialised from every other teacher layer
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=100, lr=2e-3, warmup_steps=10)
    )
    # Set: converged teachers (``recipes.teacher_stage``), one per stage seed, trained with
    # ``teacher_train``'s settings until validation loss stops improving (``steps`` replaced by
    # the stage's cap), kept in content-keyed folders and shared by every study naming them.
    # Student seed i learns from teacher i mod len(seeds). Unset: one teacher, ``teacher_train``
    # steps, in the study's folder.
    teacher_stage: TeacherStage | None = None
    uses_teacher_stage: ClassVar[bool] = False  # recipes that read ``teacher_stage`` say so

    @property
    def teacher_layers(self) -> int:
        """The depth of the teacher the recipe trains (from a preset, checked below)."""
        return self.teacher.preset_layers or 0

    @model_validator(mode="after")
    def _student_fits_teacher(self) -> TeacherStudentRecipe:
        recipe = type(self).__name__.removesuffix("Config").lower()
        teacher = self.teacher
        if teacher.path is not None or teacher.init_from_teacher is not None:
            raise ValueError(f"teacher: {recipe} trains its teacher from a preset (teacher.preset)")
        if self.teacher_stage is not None and not self.uses_teacher_stage:
            raise ValueError(f"teacher_stage: {recipe} does not train converged teachers yet")
        layers = self.teacher_layers
        if 2 * self.student_layers - 1 > layers:
            raise ValueError(
                f"student_layers={self.student_layers} needs a teacher with at least "
                f"{2 * self.student_layers - 1} layers (every other layer); it has {layers}"
            )
        return self


@dataclass
class StudyTeachers:
    """A study's teachers: ``info`` for its result, the folder for each student seed index,
    and whether every teacher was reused (students of a retrained teacher are not)."""

    info: dict[str, Any]
    folders: Callable[[int], Path]
    reused: bool


def study_teachers(cfg: TeacherStudentRecipe, out: Path, *, reuse: bool = True) -> StudyTeachers:
    """The converged teachers of ``cfg.teacher_stage`` (trained once, reused by every study), or
    without a stage the study's own teacher in ``out/teacher`` (``teacher_train`` steps)."""
    if cfg.teacher_stage is None:
        from distillery.recipes.quickstart import teacher_config  # quickstart builds on this

        summary, reused = run_or_reuse(teacher_config(cfg, out / "teacher"), "teacher", reuse=reuse)
        info = {k: summary[k] for k in ("val_ppl", "val_loss", "accuracy", "layers", "flops")}
        info |= {"converged": False, "seeds": [cfg.teacher_train.seed]}
        info["teachers"] = [{"seed": cfg.teacher_train.seed, "val_ppl": summary["val_ppl"],
                             "val_loss": summary["val_loss"]}]  # fmt: skip
        return StudyTeachers(info, lambda _: out / "teacher" / "model", reused)
    before = [stage_finished(cfg.data, cfg.teacher, cfg.teacher_train, cfg.teacher_stage, t)
              for t in cfg.teacher_stage.seeds]  # fmt: skip
    stage = train_teachers(cfg.data, cfg.teacher, cfg.teacher_train, cfg.teacher_stage, reuse=reuse)
    first = json.loads((Path(stage["teachers"][0]["model"]).parent / "summary.json").read_text())
    info = {
        "val_ppl": stage["val_ppl"]["mean"],
        "val_ppl_std": stage["val_ppl"]["std"],
        "val_loss": statistics.fmean(t["val_loss"] for t in stage["teachers"]),
        "accuracy": first["accuracy"],
        "layers": first["layers"],
        "flops": stage["flops"]["trained_mean"],  # what a teacher cost, patience included
        "flops_to_best": stage["flops"]["mean"],
        "converged": True,
        "seeds": cfg.teacher_stage.seeds,
        "teachers": stage["teachers"],
    }
    return StudyTeachers(info, lambda i: teacher_for(stage, i), reuse and all(before))


def teacher_regime(teacher: dict[str, Any]) -> str:
    """How the teachers were trained: early-stopped by patience, stopped at the stage's cap
    (still improving there), or a fixed number of steps (no stage)."""
    stopped = [t.get("stopped") for t in teacher.get("teachers", [])]
    if not teacher.get("converged") or not stopped:
        return "trained for fixed steps (not converged)"
    if all(s == "patience" for s in stopped):
        return "converged (early-stopped by patience)"
    capped = sum(s == "cap" for s in stopped)
    return f"teacher stage: {capped} of {len(stopped)} stopped at the step cap, still improving"


def teacher_check(
    teacher: dict[str, Any],
    no_teacher_runs: list[dict[str, Any]] | None,
    *,
    against: str = "no-teacher",
) -> str:
    """Whether the teacher is clearly better than the best no-teacher student of the student's
    size: every teacher seed's validation perplexity below every no-teacher seed's. A study
    without a no-teacher arm compares its students (``against`` names them, e.g. "distilled")."""
    worst = max(float(t["val_ppl"]) for t in teacher["teachers"])
    spread = (
        f"{teacher['val_ppl']:.1f} ± {teacher.get('val_ppl_std', 0.0):.1f} over "
        f"{len(teacher['teachers'])} teacher seeds"
        if len(teacher["teachers"]) > 1
        else f"{teacher['val_ppl']:.1f} (one teacher seed: no teacher spread)"
    )
    if not no_teacher_runs:
        return f"Teacher val ppl {spread}; no {against} arm to compare it with."
    best = min(float(r["val_ppl"]) for r in no_teacher_runs)
    clearly = worst < best
    return f"Teacher val ppl {spread}; best {against} student {best:.1f}: the teacher is " + (
        f"clearly better (every teacher seed below every {against} seed)."
        if clearly
        else "**not clearly better than its students, so the comparisons below say little about "
        "distilling from a good teacher**."
    )


def distilbert_mix() -> list[Any]:
    """DistilBERT's triple loss with its weights: soft targets 5 (T=2), task 2, cosine 1."""
    return [
        ForwardKLObjective(weight=5.0, temperature=2.0),
        CrossEntropyObjective(weight=2.0),
        HiddenCosineObjective(weight=1.0, layers="last"),
    ]


class SeededStudy(Strict):
    """What a recipe repeated over seeds adds: the seeds, and a folder for its table."""

    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1
    )
    results: Path | None = None  # also write the table and its JSON here

    @model_validator(mode="after")
    def _distinct_seeds(self) -> SeededStudy:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: give each seed once")
        return self


def run_or_reuse(cfg: RunConfig, name: str, *, reuse: bool = True) -> tuple[dict[str, Any], bool]:
    """(summary, reused): ``run(cfg)``, unless ``cfg.out`` holds a finished run of exactly this
    config. The summary is read back from disk, so every rank of a torchrun job has it. A run
    that diverged left ``diverged.txt`` beside its config (``run`` writes it; a fresh start
    clears it): with ``reuse`` the same config raises ``Diverged`` again without training (a
    tuning grid's point is not retrained)."""
    from distillery.recipes.run import run  # run builds on this module

    out = Path(cfg.out)
    saved, summary, diverged = out / "config.yaml", out / "summary.json", out / DIVERGED

    def finished() -> dict[str, Any] | None:
        if not summary.is_file():
            return None
        result = json.loads(summary.read_text(encoding="utf-8"))
        return result if result.get("finished") else None

    same = False
    if saved.is_file():  # read back through today's config: fields added since take defaults
        try:
            same = (
                RunConfig.model_validate(yaml.safe_load(saved.read_text(encoding="utf-8"))) == cfg
            )
        except (ValueError, yaml.YAMLError):
            same = False
    if reuse and same and (result := finished()):
        if is_main_process():
            print(f"[distillery] {name}: finished before, reusing {out}", flush=True)
        return result, True
    if reuse and same and diverged.is_file():
        raise Diverged(
            f"{name}: diverged before ({diverged}): " + diverged.read_text(encoding="utf-8").strip()
        )
    run(cfg, overwrite=True, name=name)
    result = finished()
    if result is None:
        raise DistilleryError(f"{name}: the run in {out} did not finish")
    return result, False


def write_study(
    name: str,
    result: dict[str, Any],
    table: str,
    folders: list[Path | None],
    plot: Callable[[Path], None] | None = None,
) -> None:
    """A study's ``NAME.json``, ``NAME.md`` (and its ``plot``) and ``NAME.html`` (the Markdown
    with the plots it wrote, self-contained) into each folder given; the table printed. Only
    the main process writes."""
    if not is_main_process():
        return
    for folder in [Path(f) for f in folders if f is not None]:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{name}.json", result)
        atomic_write_text(folder / f"{name}.md", table)
        before = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}
        if plot is not None:
            plot(folder)
        shown = referenced_images(table, folder)
        plots = [
            p
            for p in sorted(folder.glob("*.png"))
            if before.get(p) != p.stat().st_mtime_ns and p not in shown
        ]
        write_html(
            folder / f"{name}.html",
            first_heading(table, name),
            table,
            images=plots,
            base=folder,
            config=result.get("config"),
            command=shlex.join(sys.argv),
            hardware=result.get("hardware") or hardware(),
        )
    print(table)


def hardware() -> str:
    """A short name of the machine for result folders and tables."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_interval(
    runs: list[dict[str, Any]], against: list[dict[str, Any]], key: str
) -> Interval | None:
    """``runs`` − ``against`` on ``key``, paired by each run's ``seed`` (the seeds both arms
    ran); None when they share no seed."""
    by_seed = {r["seed"]: float(r[key]) for r in against}
    pairs = [(float(r[key]), by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    if not pairs:
        return None
    return paired_t([a for a, _ in pairs], [b for _, b in pairs])


def paired_verdict(
    runs: list[dict[str, Any]],
    against: list[dict[str, Any]],
    key: str,
    *,
    lower_is_better: bool,
    digits: int = 1,
) -> str:
    """The verdict line's words: ``better: Δ −3.2 [−5.1, −1.3] (95% t-interval, 3 paired
    seeds)`` — "better" / "worse" / "no difference detected at n seeds" read off the paired
    interval of ``runs`` − ``against`` (``eval.stats``), never off overlapping stds."""
    interval = paired_interval(runs, against, key)
    if interval is None:
        return "no seed in common, so no paired comparison"
    return f"{verdict(interval, lower_is_better=lower_is_better)}: Δ {interval.describe(digits)}"


def summary_verdict(
    mean: float, std: float, n: int, *, lower_is_better: bool, digits: int = 1
) -> str:
    """``paired_verdict`` from the mean and sample std of ``n`` per-seed paired differences."""
    interval = t_interval(mean, std, n)
    return f"{verdict(interval, lower_is_better=lower_is_better)}: Δ {interval.describe(digits)}"
