"""``distillery experiment prune``: students cut from a converged teacher (Minitron), width
against depth, before and after training, against the same shapes from scratch and from
every-other-layer initialisation.

1. the teachers (``teacher_stage``: converged, shared with other studies);
2. per teacher, ``distillery prune`` to two shapes of (nearly) equal size: **depth** (the
   blocks with the smallest angular distance removed, ``student_layers`` kept) and **width**
   (``width``: attention heads and MLP neurons ranked by activation);
3. per seed (student seed i learns from teacher i mod teachers), ``student_train`` steps from
   each initialisation — depth-pruned, width-pruned, every other teacher layer, and random
   weights of either shape — with the task loss alone (CE) and, but for the random-init
   students (the no-teacher baselines), with ``objectives`` (Minitron's logit KL by default);
4. every model (the pruned ones before training too) evaluated against its teacher on the
   validation split: perplexity, agreement, the draft's acceptance length at k = 8 and the
   teacher's assisted-generation speed-up (``distillery eval --teacher``).

FLOPs count training, teacher forwards and the pruning's calibration forward. Writes
``prune.{md,json,html}``; verdicts from paired t-intervals over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from distillery.config import ForwardKLObjective, ModelSpec, ObjectiveConfig, RunConfig
from distillery.models.presets import PRESETS
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.evaluate import evaluate_folder
from distillery.recipes.prune import CalibrationData, PruneConfig, PruneTarget, prune
from distillery.recipes.study import (
    SeededStudy,
    TeacherStudentRecipe,
    hardware,
    mean_std,
    paired_verdict,
    run_or_reuse,
    study_teachers,
    teacher_check,
    write_study,
)

METRICS = ("params", "val_ppl", "retained", "agreement", "acceptance_8", "assisted_speedup",
           "flops", "steps")  # fmt: skip
PAIRS = (  # (arm, against): the comparisons the write-up reads
    ("width-pruned + KD", "depth-pruned + KD"),
    ("width-pruned + CE", "depth-pruned + CE"),
    ("depth-pruned + KD", "every-other + KD"),
    ("depth-pruned + KD", "scratch (depth shape) + CE"),
    ("width-pruned + KD", "scratch (width shape) + CE"),
    ("width-pruned + KD", "width-pruned + CE"),
    ("depth-pruned + KD", "depth-pruned + CE"),
    ("depth-pruned + CE", "scratch (depth shape) + CE"),
    ("width-pruned + CE", "scratch (width shape) + CE"),
)


def _kl() -> list[ObjectiveConfig]:
    return [ForwardKLObjective(temperature=1.0)]


class PruneStudyConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery experiment prune``: width- and depth-pruned students of converged teachers,
    before training, after CE and after distillation, against scratch and every-other init."""

    width: PruneTarget = Field(
        default_factory=lambda: PruneTarget(num_attention_heads=2, intermediate_size=172)
    )
    calibration: CalibrationData = Field(
        default_factory=lambda: CalibrationData(seq_len=64, batch_size=8, batches=8)
    )
    objectives: list[ObjectiveConfig] = Field(default_factory=_kl, min_length=1)
    uses_teacher_stage: ClassVar[bool] = True
    out: Path = Path("runs/prune-study")


def _pruned(cfg: PruneStudyConfig, teacher: Path, folder: Path, target: PruneTarget) -> dict:
    """``distillery prune`` of ``teacher`` into ``folder`` (reused when it finished before)."""
    summary = folder / "summary.json"
    if summary.is_file():
        saved = json.loads(summary.read_text(encoding="utf-8"))
        if saved.get("finished") and saved["target"] == target.model_dump():
            return saved
    return prune(PruneConfig(teacher=teacher, out=folder, target=target, data=cfg.calibration),
                 overwrite=True)  # fmt: skip


def _inits(cfg: PruneStudyConfig, depth: Path, width: Path) -> dict[str, ModelSpec]:
    """Each initialisation's model: the pruned folders, every other layer, random weights."""
    preset = cfg.teacher.preset
    full = {**PRESETS[preset or "mini"], **cfg.teacher.overrides}
    shape = {**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers}
    target = {k: v for k, v in cfg.width.model_dump().items() if v is not None and k != "layers"}
    narrow = {**cfg.teacher.overrides, **target}
    heads = int(narrow.get("num_attention_heads", full["num_attention_heads"]))
    head_dim = int(full.get("head_dim") or full["hidden_size"] // full["num_attention_heads"])
    narrow |= {"head_dim": head_dim, "num_key_value_heads": heads}
    return {
        "depth-pruned": ModelSpec(path=depth),
        "width-pruned": ModelSpec(path=width),
        "every-other": ModelSpec(preset=preset, overrides=shape, init_from_teacher="every_other"),
        "scratch (depth shape)": ModelSpec(preset=preset, overrides=shape),
        "scratch (width shape)": ModelSpec(preset=preset, overrides=narrow),
    }


def _evaluated(cfg: PruneStudyConfig, model: Path, teacher: Path, out: Path) -> dict[str, Any]:
    """``distillery eval --teacher`` of ``model`` on the study's validation split (cached)."""
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    overrides = [f"seq_len={cfg.data.seq_len}", f"vocab_size={cfg.data.vocab_size}"]
    return evaluate_folder(model, teacher=teacher, data=cfg.data.source, overrides=overrides,
                           out=out)  # fmt: skip


def _row(ev: dict[str, Any], teacher_ppl: float, flops: float, steps: int) -> dict[str, Any]:
    return {
        "params": ev["params"],
        "val_ppl": ev["val_ppl"],
        "retained": 100.0 * teacher_ppl / ev["val_ppl"],
        "agreement": ev["agreement"],
        "acceptance_8": ev["acceptance_length"]["8"],
        "assisted_speedup": ev["assisted_speedup"],
        "flops": flops,
        "steps": steps,
    }


def prune_study(cfg: PruneStudyConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Prune, train and evaluate every arm × seed into ``cfg.out``; return the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    teachers = study_teachers(cfg, out, reuse=not overwrite)
    ppl_of = {str(t["model"]): float(t["val_ppl"]) for t in teachers.info["teachers"]}
    rows: dict[str, dict[str, Any]] = {}
    kept: dict[str, dict[str, Any]] = {}  # per teacher: what each cut kept

    def add(arm: str, seed: int, row: dict[str, Any]) -> None:
        rows.setdefault(arm, {"runs": []})["runs"].append({"seed": seed, **row})

    for index, seed in enumerate(cfg.seeds):
        teacher = teachers.folders(index)
        teacher_ppl = ppl_of.get(str(teacher), teachers.info["val_ppl"])
        tag = f"teacher-{index % len(teachers.info['teachers'])}"
        cut = {
            "depth-pruned": _pruned(cfg, teacher, out / tag / "depth",
                                    PruneTarget(layers=cfg.student_layers)),
            "width-pruned": _pruned(cfg, teacher, out / tag / "width", cfg.width),
        }  # fmt: skip
        kept[tag] = {"depth_layers": cut["depth-pruned"]["kept_layers"],
                     "width_heads": cut["width-pruned"]["kept_heads"]}  # fmt: skip
        inits = _inits(cfg, out / tag / "depth" / "model", out / tag / "width" / "model")
        for name, summary in cut.items():  # before training: the pruned model itself
            ev = _evaluated(cfg, Path(inits[name].path or ""), teacher, out / tag / f"{name}.json")
            add(
                f"{name}, before training",
                seed,
                _row(ev, teacher_ppl, summary["calibration_flops"], 0),
            )
        for name, model in inits.items():
            kinds = ("CE",) if name.startswith("scratch") else ("CE", "KD")  # scratch: no teacher
            for kind in kinds:
                folder = out / f"{_slug(name)}-{kind.lower()}" / f"seed-{seed}"
                run_cfg = RunConfig(
                    data=cfg.data.model_copy(update={"tokenizer": teacher}),
                    model=model,
                    teacher=teacher if kind == "KD" or model.init_from_teacher else None,
                    objectives=cfg.objectives if kind == "KD" else [{"kind": "ce"}],
                    train=cfg.student_train.model_copy(update={"seed": seed}),
                    out=folder,
                )
                summary, _ = run_or_reuse(run_cfg, f"{name} + {kind}/seed-{seed}",
                                          reuse=teachers.reused)  # fmt: skip
                ev = _evaluated(cfg, folder / "model", teacher, folder / "eval.json")
                spent = summary["flops"] + cut.get(name, {}).get("calibration_flops", 0.0)
                add(f"{name} + {kind}", seed, _row(ev, teacher_ppl, spent, summary["steps"]))
    for row in rows.values():
        for key in METRICS:
            mean, std = mean_std([float(r[key]) for r in row["runs"]])
            row[key] = {"mean": mean, "std": std}
    scratch = [r for k, v in rows.items() if k.startswith("scratch") for r in v["runs"]]
    result = {
        "hardware": hardware(),
        "seeds": cfg.seeds,
        "teacher": teachers.info,
        "teacher_check": teacher_check(teachers.info, scratch),
        "kept": kept,
        "rows": rows,
        "config": cfg.model_dump(mode="json"),
    }
    write_study("prune", result, prune_markdown(result), [out, cfg.results])
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def prune_markdown(result: dict[str, Any]) -> str:
    """The table (mean ± std over seeds) and the paired verdicts of ``PAIRS``."""
    lines = [
        f"# Pruned students ({result['hardware']}, seeds {result['seeds']})",
        "",
        result["teacher_check"],
        "",
        "Depth pruning kept layers "
        + "; ".join(f"{t}: {k['depth_layers']}" for t, k in result["kept"].items())
        + " (every-other init keeps [0, 2, …]).",
        "",
        "| arm | params | val ppl | retained % | agreement | acceptance (k=8) "
        "| assisted speed-up | FLOPs | steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        cells = [f"{row[k]['mean']:.3g} ± {row[k]['std']:.2g}" for k in METRICS[1:6]]
        lines.append(f"| {name} | {row['params']['mean']:,.0f} | " + " | ".join(cells)
                     + f" | {row['flops']['mean']:.3g} | {row['steps']['mean']:.0f} |")  # fmt: skip
    lines.append("")
    rows = result["rows"]
    for arm, against in PAIRS:
        if arm in rows and against in rows:
            ppl = paired_verdict(rows[arm]["runs"], rows[against]["runs"], "val_ppl",
                                 lower_is_better=True)  # fmt: skip
            acc = paired_verdict(rows[arm]["runs"], rows[against]["runs"], "acceptance_8",
                                 lower_is_better=False, digits=2)  # fmt: skip
            lines.append(f"- {arm} vs {against}: val ppl {ppl}; acceptance {acc}.")
    lines += [
        "",
        "Retained % is the teacher's validation perplexity over the student's. Before-training "
        "rows hold one pruned model per teacher, repeated for the seeds that learn from it.",
    ]
    return "\n".join(lines) + "\n"
