"""``distillery experiment iit``: does interchange intervention training help, at equal compute?

1. the teachers: converged ones (``teacher_stage``: one per stage seed, shared with other
   studies; student seed i learns from teacher i mod n), or one trained here for
   ``teacher_train`` steps (reused when its config is unchanged);
2. per seed, the same half-depth student (every other teacher layer) distilled with
   ``objectives`` (``standard``), with ``objectives`` + ``iit`` on the FLOPs ``standard`` spent
   (``standard + IIT``: fewer steps, its counterfactual runs are charged), and with the extra
   term at the same number of steps (``standard + IIT, same steps``: more compute);
3. validation perplexity, agreement with the teacher, and interchange agreement on the same
   held-out interventions for every arm (also for ``standard``, which never trained on them);
   the teacher beside the best student (``study.teacher_check``).

Writes ``iit.{md,json}`` to the output folder and to ``results`` when set.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from distillery.config import (
    CrossEntropyObjective,
    ForwardKLObjective,
    InterchangeObjective,
    ModelSpec,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
)
from distillery.distributed import DistEnv, resolve_device
from distillery.eval import interchange_agreement
from distillery.models import load_pretrained
from distillery.models.interventions import num_layers
from distillery.objectives.representations import layer_pairs
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.study import (
    SeededStudy,
    TeacherStudentRecipe,
    hardware,
    mean_std,
    paired_verdict,
    run_or_reuse,
    study_teachers,
    teacher_check,
    teacher_regime,
    write_study,
)
from distillery.recipes.tuning import Tuning, grid_table, setting, shown, tuned


class IITStudyConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery experiment iit``: the same student distilled with ``objectives`` and with
    ``objectives`` + ``iit``, at equal FLOPs (and, for reference, at equal steps), over seeds."""

    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            CrossEntropyObjective(weight=1.0),
            ForwardKLObjective(weight=1.0, temperature=2.0),
        ],
        min_length=1,
    )
    iit: InterchangeObjective = Field(default_factory=InterchangeObjective)
    eval_batches: int | None = Field(None, gt=0)  # held-out batches for interchange agreement
    tune: Tuning | None = None  # set: each arm's lr and warmup chosen on validation first
    uses_teacher_stage: ClassVar[bool] = True
    out: Path = Path("runs/iit")

    @model_validator(mode="after")
    def _no_iit_twice(self) -> IITStudyConfig:
        if any(o.kind == "iit" for o in self.objectives):
            raise ValueError("objectives: the iit term is set apart in 'iit', not in objectives")
        if self.tune is not None:
            self.tune.check_seed(self.seeds)
        return self


ARMS = ("standard", "standard + IIT", "standard + IIT, same steps")
FOLDERS = dict(zip(ARMS, ("standard", "iit-equal-flops", "iit-same-steps"), strict=True))
METRICS = (
    "val_ppl",
    "agreement",
    "interchange_agreement",
    "interchange_agreement_swapped",
    "interchange_agreement_changed",
    "interchange_changed_fraction",
    "steps",
    "flops",
)


def _held_out_agreement(
    cfg: IITStudyConfig, student_dir: Path, teacher_dir: Path
) -> dict[str, float]:
    """Interchange agreement of a finished student with the teacher, on the validation split."""
    device = resolve_device(cfg.student_train.device)
    tokenizer, val = prepare_data(cfg.data, DistEnv(), teacher_dir, splits=("val",))
    student = load_pretrained(student_dir, "student").to(device)
    teacher = load_pretrained(teacher_dir, "teacher").to(device)
    pairs = layer_pairs(cfg.iit.layers, num_layers(student), num_layers(teacher))
    return interchange_agreement(
        student,
        teacher,
        val,
        pairs,
        device=device,
        positions=cfg.iit.positions,
        fraction=cfg.iit.fraction,
        max_batches=cfg.eval_batches,
        vocab=len(tokenizer),
    )


def _run_config(
    cfg: IITStudyConfig, teacher_dir: Path, objectives: list[Any], train: TrainConfig, out: Path
) -> RunConfig:
    """One arm's run: the half-depth student distilled from ``teacher_dir`` into ``out``."""
    return RunConfig(
        data=cfg.data.model_copy(update={"tokenizer": teacher_dir}),
        model=ModelSpec(
            preset=cfg.teacher.preset,
            overrides={**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers},
            init_from_teacher="every_other",
        ),
        teacher=teacher_dir,
        objectives=objectives,
        train=train,
        out=out,
    )


def _arm(
    cfg: IITStudyConfig,
    teacher_dir: Path,
    objectives: list[Any],
    train: TrainConfig,
    root: Path,
    *,
    reuse: bool,
) -> dict[str, Any]:
    """One arm's run for ``train.seed`` under ``root``, distilled from ``teacher_dir``; its
    kept metrics."""
    seed = train.seed
    run_cfg = _run_config(cfg, teacher_dir, objectives, train, root / f"seed-{seed}")
    name = f"{root.relative_to(cfg.out)}/seed-{seed}"
    summary, _ = run_or_reuse(run_cfg, name, reuse=reuse)
    # Every arm measured on the same held-out interventions (the IIT runs' own summary has it
    # too, over the whole split).
    summary |= _held_out_agreement(cfg, run_cfg.out / "model", teacher_dir)
    return {"seed": seed, "teacher": str(teacher_dir), **{k: summary[k] for k in METRICS}}


def _tune(
    cfg: IITStudyConfig, teacher_dir: Path, objectives: dict[str, list[Any]], *, reuse: bool
) -> tuple[dict[str, TrainConfig], dict[str, Path], dict[str, Any]]:
    """(each arm's train settings at its chosen lr and warmup, the folder of its reported runs,
    the grids), tuned on the tuning seed with ``teacher_dir``; the equal-FLOPs arm spends what
    ``standard`` at its chosen point spent."""
    assert cfg.tune is not None
    out, trains, roots, records = Path(cfg.out), {}, {}, {}
    for arm in ARMS:
        train = cfg.student_train
        if arm == "standard + IIT":
            point = setting(trains["standard"].lr, trains["standard"].warmup_steps)
            chosen = out / FOLDERS["standard"] / "tune" / point / "summary.json"
            spent = json.loads(chosen.read_text(encoding="utf-8"))["flops"]
            train = train.model_copy(update={"flops_budget": spent})
        build = partial(_run_config, cfg, teacher_dir, objectives[arm])
        folder = out / FOLDERS[arm]
        trains[arm], records[arm] = tuned(
            cfg.tune, train, build, folder / "tune", FOLDERS[arm], reuse=reuse
        )
        roots[arm] = folder / setting(trains[arm].lr, trains[arm].warmup_steps)
    return trains, roots, records


def iit_study(cfg: IITStudyConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every arm × seed into ``cfg.out`` (with ``tune``: each arm at its own lr and warmup,
    chosen first); return the table's data. Seed i of every arm learns from the same teacher
    (``study_teachers``), so arms are compared paired by seed."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    teachers = study_teachers(cfg, out, reuse=not overwrite)
    reuse = teachers.reused  # students of another teacher (retrained now) are never reused
    with_iit = [*cfg.objectives, cfg.iit]
    objectives = {arm: with_iit if "IIT" in arm else cfg.objectives for arm in ARMS}
    trains = dict.fromkeys(ARMS, cfg.student_train)
    roots, tuning = {arm: out / FOLDERS[arm] for arm in ARMS}, None
    if cfg.tune is not None:
        trains, roots, tuning = _tune(cfg, teachers.folders(0), objectives, reuse=reuse)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for index, seed in enumerate(cfg.seeds):
        arm = partial(_arm, cfg, teachers.folders(index), reuse=reuse)
        for name in ARMS:
            train = trains[name].model_copy(update={"seed": seed})
            if name == "standard + IIT":  # the FLOPs standard spent on this seed
                train = train.model_copy(update={"flops_budget": runs["standard"][-1]["flops"]})
            runs[name].append(arm(objectives[name], train, roots[name]))
    rows = {}
    for name, values in runs.items():
        rows[name] = {"runs": values, "lr": trains[name].lr,
                      "warmup_steps": trains[name].warmup_steps}  # fmt: skip
        for key in METRICS:
            mean, std = mean_std([float(v[key]) for v in values])
            rows[name][key] = {"mean": mean, "std": std}
    result = {
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "teacher": teachers.info,
        "student_layers": cfg.student_layers,
        "iit": cfg.iit.model_dump(mode="json"),
        "rows": rows,
        "tuning": tuning,  # each arm's grid on the tuning seed, or None
        "config": cfg.model_dump(mode="json"),
    }
    write_study("iit", result, iit_markdown(result), [out, cfg.results])
    return result


def iit_markdown(result: dict[str, Any]) -> str:
    """The table (mean ± std over seeds) and a plain answer at equal FLOPs."""
    rows, iit, teacher = result["rows"], result["iit"], result["teacher"]
    students = [r for row in rows.values() for r in row["runs"]]
    regime = teacher_regime(teacher)
    lines = [
        f"# Interchange intervention training ({result['hardware']}, seeds {result['seeds']})",
        "",
        f"Teacher: {teacher['layers']} layers, {regime}, trained with {teacher['flops']:.3g} "
        f"FLOPs. {teacher_check(teacher, students, against='distilled')}",
        "",
        f"Student: {result['student_layers']} layers "
        f"(every other teacher layer). IIT: layers {iit['layers']}, positions {iit['positions']} "
        f"(fraction {iit['fraction']:g}), {iit['divergence']} at T={iit['temperature']:g}, weight "
        f"{iit['weight']:g}. Interchange agreement: counterfactual top-1 equal to the teacher's "
        "on the same held-out interventions for every arm (all counted positions / the swapped "
        "ones / the positions whose teacher prediction the intervention changes, where "
        "agreeing is more than plain agreement). Mean ± sample std over seeds.",
        "",
        "| arm | lr, warmup | steps | FLOPs | val ppl | agreement | interchange agreement "
        "| (swapped) | (changed) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {shown(row)} | {row['steps']['mean']:.0f} | "
            f"{row['flops']['mean']:.3g} | "
            f"{row['val_ppl']['mean']:.1f} ± {row['val_ppl']['std']:.1f} | "
            f"{row['agreement']['mean']:.3f} ± {row['agreement']['std']:.3f} | "
            f"{row['interchange_agreement']['mean']:.3f} ± "
            f"{row['interchange_agreement']['std']:.3f} | "
            f"{row['interchange_agreement_swapped']['mean']:.3f} ± "
            f"{row['interchange_agreement_swapped']['std']:.3f} | "
            f"{row['interchange_agreement_changed']['mean']:.3f} ± "
            f"{row['interchange_agreement_changed']['std']:.3f} |"
        )
    base, equal = rows["standard"], rows["standard + IIT"]
    ppl = paired_verdict(equal["runs"], base["runs"], "val_ppl", lower_is_better=True)
    ia = paired_verdict(
        equal["runs"], base["runs"], "interchange_agreement", lower_is_better=False, digits=3
    )
    changed = paired_verdict(
        equal["runs"], base["runs"], "interchange_agreement_changed", lower_is_better=False,
        digits=3,
    )  # fmt: skip
    share = base["interchange_changed_fraction"]["mean"]
    lines += [
        "",
        f"At equal FLOPs, adding IIT, paired by seed: validation perplexity {ppl}; interchange "
        f"agreement {ia}; on the {100 * share:.1f}% of positions the intervention changes the "
        f"teacher's prediction at, {changed}.",
    ]
    lines += grid_table(result.get("tuning") or {}, "validation loss")
    return "\n".join(lines) + "\n"
