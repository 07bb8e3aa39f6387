"""``distillery mode NAME``: one distillation mode against plain distillation at equal compute.

Every mode is a set of *arms*, each a chain of runs of the one engine (``recipes.run``); a run
is initialised from and/or distilled from the run before it:

- ``multi-teacher``: K teachers (seeds ``teacher_train.seed + i``, or the stage's converged
  ones) → one student, vs the seed's own teacher alone;
- ``self-distill``: born-again generations of the teacher's architecture (random init, each
  distilled from the previous, generation 0 being the teacher), vs that architecture trained
  plainly;
- ``rounds``: teacher → assistant(s) → student, each round initialised from every other layer of
  the previous model, vs teacher → student directly;
- ``two-step``: the student trained with the task loss, then fine-tuned on the teacher's soft
  targets, vs the distillation mix from the start.

The comparison arm's step count comes from a FLOPs budget (``train.flops_budget``) equal to what
the mode's arm spent for the same seed, as the engine's meter counts it (6·N per trained token
plus 2·N per teacher-forwarded token); training the teacher(s) is shared and reported apart,
except for self-distillation, where generation 0 is part of the chain and is charged to it.

With ``teacher_stage`` the teachers are converged ones shared with other studies (``study.
study_teachers``): seed index i's own teacher is stage teacher i mod n, and a charged teacher
costs what its stage spent (``flops_trained``, patience included). Without, the mode trains its
own for ``teacher_train`` steps and teacher 0 is every seed's own. Finished runs of an unchanged
config are reused (never those of a teacher retrained now), so an interrupted call continues.

With ``tune`` (``recipes.tuning``) each arm's lr and warmup are chosen first: every grid point
runs the arm's whole chain on the tuning seed (learning from teacher 0) under ``out/tune/ARM/
lr-LR-warmup-W``, scored by its last run's validation loss, and the reported runs go under
``out/ARM/lr-LR-warmup-W``; a matched arm's grid spends what the mode arm spent at its chosen
point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from distillery.config import (
    CrossEntropyObjective,
    LiveTeacherSpec,
    ModelSpec,
    RunConfig,
    TrainConfig,
    needs_teacher,
)
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.modes_config import (
    ModesConfig,
    MultiTeacherMode,
    RoundsMode,
    SelfDistillMode,
    TwoStepMode,
)
from distillery.recipes.modes_report import mean_and_std, modes_markdown
from distillery.recipes.quickstart import teacher_config
from distillery.recipes.study import (
    hardware,
    mean_std,
    run_or_reuse,
    study_teachers,
    write_study,
)
from distillery.recipes.tuning import choose, setting

METRICS = ("val_ppl", "val_loss", "accuracy", "agreement")
KEPT = (*METRICS, "steps", "flops", "train_seconds")
OWN = "own"  # the seed's own teacher: stage teacher i mod n for seed index i, else teacher 0
PREVIOUS = "previous"  # the run before this one in the arm (the seed's own teacher for the first)
TEACHER_KEPT = ("seed", "model", "val_ppl", "accuracy", "layers", "params", "flops")


@dataclass(frozen=True)
class Stage:
    """One run of an arm: a model of ``layers`` layers (``init``: ``every_other`` from its
    first teacher, ``random``, or ``previous`` = continue the previous run's model) trained with
    ``objectives`` from ``teachers`` (indices of the recipe's teachers, ``OWN`` or
    ``PREVIOUS``)."""

    name: str
    layers: int
    objectives: list[Any]
    teachers: tuple[int | str, ...]
    init: str
    train: TrainConfig
    match: str | None = None  # the arm whose total FLOPs (same seed) this arm spends
    teacher_fields: dict[str, Any] = field(default_factory=dict)  # e.g. weights, combine


@dataclass(frozen=True)
class Arm:
    """A chain of runs; ``charged`` counts the teacher's training into the arm's FLOPs."""

    stages: list[Stage]
    charged: bool = False
    label: str = ""


def plan(cfg: ModesConfig) -> dict[str, Arm]:
    """The mode's arms, the mode's own first and the equal-compute comparison after it."""
    mode, student, objectives = cfg.mode, cfg.student_layers, cfg.objectives
    plain = Stage("student", student, objectives, (OWN,), "every_other", cfg.student_train)
    if isinstance(mode, MultiTeacherMode):
        ensemble = {"weights": mode.weights, "combine": mode.ensemble}
        teachers = tuple(range(mode.teachers))
        return {
            "ensemble": Arm(
                [replace(plain, teachers=teachers, teacher_fields=ensemble)],
                label=f"{mode.teachers} teachers ({mode.ensemble})",
            ),
            "single": Arm([replace(plain, match="ensemble")], label="own teacher, same FLOPs"),
            "single-same-steps": Arm([plain], label="own teacher, same steps"),
        }
    if isinstance(mode, SelfDistillMode):
        depth, stage = cfg.teacher_layers, cfg.teacher_stage
        steps = mode.steps or (stage.max_steps if stage else cfg.teacher_train.steps)
        train = cfg.teacher_train.model_copy(update={"steps": steps})
        gens = [
            Stage(f"gen-{k}", depth, objectives, (PREVIOUS,), "random", train)
            for k in range(1, mode.generations + 1)
        ]
        ce = [CrossEntropyObjective()]
        return {
            "born-again": Arm(gens, charged=True, label="gen 0 = the teacher"),
            "plain": Arm(
                [Stage("plain", depth, ce, (OWN,), "random", train, match="born-again")],
                label="task loss only",
            ),
        }
    if isinstance(mode, RoundsMode):
        chain = [
            Stage(f"{n}-layers", n, objectives, (PREVIOUS,), "every_other", cfg.student_train)
            for n in [*mode.assistants, student]
        ]
        return {
            "assistants": Arm(
                chain, label=" → ".join(map(str, [cfg.teacher_layers, *mode.assistants, student]))
            ),
            "direct": Arm(
                [replace(plain, name=f"{student}-layers", match="assistants")],
                label=f"{cfg.teacher_layers} → {student}",
            ),
        }
    assert isinstance(mode, TwoStepMode)
    first = max(1, round(mode.first_fraction * cfg.student_train.steps))
    second = max(1, cfg.student_train.steps - first)
    task = cfg.student_train.model_copy(update={"steps": first})
    soft = cfg.student_train.model_copy(update={"steps": second})
    return {
        "two-step": Arm(
            [
                Stage("task", student, [CrossEntropyObjective()], (OWN,), "every_other", task),
                Stage("soft-targets", student, mode.finetune_objectives, (OWN,), PREVIOUS, soft),
            ],
            label="task loss, then soft targets",
        ),
        "from-start": Arm(
            [replace(plain, name="distill", match="two-step")],
            label="the objectives mix throughout",
        ),
    }


def _stage_config(
    cfg: ModesConfig,
    stage: Stage,
    *,
    seed: int,
    out: Path,
    teachers: list[Path],
    own: Path,
    previous: Path | None,
    budget: float | None,
) -> RunConfig:
    """The engine's config for one stage of one seed (``own``: the seed's own teacher)."""

    def folder(ref: int | str) -> Path:
        if ref == PREVIOUS:
            return previous if previous is not None else own
        return own if ref == OWN else teachers[int(ref)]

    paths = [folder(ref) for ref in stage.teachers]
    if stage.init == PREVIOUS:
        model = ModelSpec(path=previous, preset=None)
    else:
        model = ModelSpec(
            preset=cfg.teacher.preset,
            overrides={**cfg.teacher.overrides, "num_hidden_layers": stage.layers},
            init_from_teacher="every_other" if stage.init == "every_other" else None,
        )
    fields = {k: v for k, v in stage.teacher_fields.items() if v is not None}
    return RunConfig(
        data=cfg.data.model_copy(update={"tokenizer": own}),
        model=model,
        teacher=LiveTeacherSpec(path=paths[0] if len(paths) == 1 else paths, **fields),
        objectives=stage.objectives,
        train=stage.train.model_copy(update={"seed": seed, "flops_budget": budget}),
        out=out,
    )


def _teachers(
    cfg: ModesConfig, out: Path, overwrite: bool
) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """Train (or reuse) the mode's teachers: (each one's ``TEACHER_KEPT``, ``flops`` being what
    training it cost; the summary ``study.teacher_check`` reads; whether all were reused).
    With ``teacher_stage``: the stage's converged teachers, the summary ``study_teachers``'s."""
    if cfg.teacher_stage is not None:
        stage = study_teachers(cfg, out, reuse=not overwrite)
        teachers = []
        for t in stage.info["teachers"]:
            saved = json.loads((Path(t["model"]).parent / "summary.json").read_text())
            kept = {k: saved[k] for k in TEACHER_KEPT if k in saved} | {"model": t["model"]}
            teachers.append(kept | {"flops": t["flops_trained"], "flops_to_best": t["flops"]})
        return teachers, stage.info, stage.reused
    count = cfg.mode.teachers if isinstance(cfg.mode, MultiTeacherMode) else 1
    teachers, all_reused = [], True
    for i in range(count):
        name = "teacher" if i == 0 else f"teacher-{i}"
        train = cfg.teacher_train.model_copy(update={"seed": cfg.teacher_train.seed + i})
        teacher_cfg = teacher_config(cfg, out / name).model_copy(update={"train": train})
        summary, reused = run_or_reuse(teacher_cfg, name, reuse=not overwrite)
        summary |= {"seed": train.seed, "model": str(out / name / "model")}
        teachers.append({k: summary[k] for k in TEACHER_KEPT})
        all_reused &= reused
    ppl, std = mean_std([float(t["val_ppl"]) for t in teachers])
    info = {"val_ppl": ppl, "val_ppl_std": std, "layers": teachers[0]["layers"],
            "flops": teachers[0]["flops"], "converged": False,
            "teachers": [{k: t[k] for k in ("seed", "val_ppl")} for t in teachers]}  # fmt: skip
    return teachers, info, all_reused


@dataclass(frozen=True)
class _Runner:
    """Runs one arm's chain for one seed: the study's config, teachers and reuse rule."""

    cfg: ModesConfig
    teachers: list[dict[str, Any]]
    reuse: bool

    def arm(
        self, arm: Arm, seed: int, mine: int, root: Path, totals: dict[str, float]
    ) -> list[dict[str, Any]]:
        """Each stage's record for ``seed`` learning from teacher ``mine``, runs under ``root``
        (``totals``: the FLOPs each arm already run for this seed spent, for matched budgets);
        the last record's ``arm_flops`` is the arm's total."""
        paths = [Path(t["model"]) for t in self.teachers]
        spent, previous = float(self.teachers[mine]["flops"]) if arm.charged else 0.0, None
        records = []
        for stage in arm.stages:
            where = root / stage.name / f"seed-{seed}"
            run_cfg = _stage_config(
                self.cfg, stage, seed=seed, out=where, teachers=paths, own=paths[mine],
                previous=previous, budget=totals[stage.match] - spent if stage.match else None,
            )  # fmt: skip
            label = f"{root.relative_to(self.cfg.out)}/{stage.name}/seed-{seed}"
            summary, _ = run_or_reuse(run_cfg, label, reuse=self.reuse)
            spent += float(summary["flops"])
            previous = where / "model"
            records.append({"seed": seed, **{k: summary[k] for k in KEPT}, "arm_flops": spent})
        return records


def _at(arm: Arm, lr: float, warmup: int) -> Arm:
    """The arm with every run of its chain at this lr and warmup."""
    update = {"lr": lr, "warmup_steps": warmup}
    return replace(arm, stages=[replace(s, train=s.train.model_copy(update=update))
                                for s in arm.stages])  # fmt: skip


def _tune(
    runner: _Runner, arms: dict[str, Arm], out: Path
) -> tuple[dict[str, Arm], dict[str, Path], dict[str, Any]]:
    """(each arm at its chosen lr and warmup, the folder its reported runs go to, the grids):
    every grid point runs the whole chain on the tuning seed (learning from teacher 0), scored
    by its last run's validation loss; matched arms spend what the chosen mode arm spent."""
    tuning = runner.cfg.tune
    assert tuning is not None
    chosen, roots, records, totals = {}, {}, {}, {}
    spent: dict[tuple[str, float, int], float] = {}  # each tuning chain's FLOPs
    for name, arm in arms.items():

        def score(lr: float, warmup: int, name: str = name, arm: Arm = arm) -> float:
            root = out / "tune" / name / setting(lr, warmup)
            last = runner.arm(_at(arm, lr, warmup), tuning.seed, 0, root, totals)[-1]
            spent[name, lr, warmup] = float(last["arm_flops"])
            return float(last["val_loss"])

        record = records[name] = choose(tuning, score)
        lr, warmup = record["lr"], record["warmup_steps"]
        totals[name] = spent[name, lr, warmup]
        chosen[name], roots[name] = _at(arm, lr, warmup), out / name / setting(lr, warmup)
    return chosen, roots, records


def compare_modes(cfg: ModesConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the mode's arms for every seed into ``cfg.out`` (with ``tune``: each arm at its own
    lr and warmup, chosen first); write ``<mode>.md``/``.json`` there (and to ``cfg.results``);
    return the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    teachers, info, reuse = _teachers(cfg, out, overwrite)  # students of retrained ones rerun
    staged = cfg.teacher_stage is not None
    own = [i % len(teachers) if staged else 0 for i in range(len(cfg.seeds))]
    runner = _Runner(cfg, teachers, reuse)
    arms, tuning = plan(cfg), None
    roots = {name: out / name for name in arms}
    if cfg.tune is not None:
        arms, roots, tuning = _tune(runner, arms, out)

    runs: dict[str, list[list[dict[str, Any]]]] = {
        a: [[] for _ in arm.stages] for a, arm in arms.items()
    }
    for seed, mine in zip(cfg.seeds, own, strict=True):
        totals: dict[str, float] = {}
        for name, arm in arms.items():
            records = runner.arm(arm, seed, mine, roots[name], totals)
            for stage_runs, record in zip(runs[name], records, strict=True):
                stage_runs.append(record)
            totals[name] = float(records[-1]["arm_flops"])

    result = {
        "mode": cfg.mode.kind,
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "teacher": info,
        "teachers": teachers,
        "seed_teachers": own,  # seed index i's own teacher (an index into teachers)
        "arms": _arm_tables(arms, runs),
        "tuning": tuning,  # each arm's grid on the tuning seed, or None
        "config": cfg.model_dump(mode="json"),
    }
    write_study(cfg.mode.kind, result, modes_markdown(result), [out, cfg.results])
    return result


def _arm_tables(
    arms: dict[str, Arm], runs: dict[str, list[list[dict[str, Any]]]]
) -> dict[str, Any]:
    """Every arm's stages with their runs and statistics over seeds."""
    return {
        name: {
            "label": arm.label,
            "charged_teacher": arm.charged,
            "no_teacher": all(  # learns nothing from a teacher: random init, task loss only
                s.init == "random" and not any(needs_teacher(o) for o in s.objectives)
                for s in arm.stages
            ),
            "stages": [
                {
                    "name": stage.name,
                    "layers": stage.layers,
                    "init": stage.init,
                    "objectives": " + ".join(f"{o.weight:g}·{o.kind}" for o in stage.objectives),
                    "lr": stage.train.lr,
                    "warmup_steps": stage.train.warmup_steps,
                    "runs": stage_runs,
                    **{
                        k: mean_and_std([r[k] for r in stage_runs])
                        for k in (*METRICS, "arm_flops", "steps")
                    },
                }
                for stage, stage_runs in zip(arm.stages, runs[name], strict=True)
            ],
        }
        for name, arm in arms.items()
    }
