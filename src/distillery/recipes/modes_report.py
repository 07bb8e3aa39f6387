"""The table of ``distillery mode NAME``: every arm's runs over seeds and the final comparison."""

from __future__ import annotations

from typing import Any

from distillery.recipes.study import mean_std, paired_verdict, teacher_check, teacher_regime
from distillery.recipes.tuning import grid_table, shown


def mean_and_std(values: list[float]) -> dict[str, float]:
    """``{"mean": ..., "std": ...}`` (sample std) of ``values``."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _teacher_line(result: dict[str, Any]) -> str:
    """The teachers: depth, regime, perplexity, cost, which seed learns from which, and whether
    they are clearly better than the arms' final models (``study.teacher_check``)."""
    teachers, info, arms = result["teachers"], result["teacher"], result["arms"].values()
    converged = info.get("converged")
    ppl = ", ".join(f"{t['val_ppl']:.1f}" for t in teachers)
    flops = ", ".join(f"{t['flops']:.3g}" for t in teachers)
    line = (
        f"Teacher{'s' if len(teachers) > 1 else ''}: {teachers[0]['layers']} layers, "
        f"{teacher_regime(info)}, validation "
        f"perplexity {ppl}, trained with {flops} FLOPs"
    )
    if converged:
        line += f" (patience included); seed index i learns from teacher i mod {len(teachers)}"
    elif len(teachers) > 1:
        line += "; single-teacher runs learn from teacher 0"
    no_teacher = [r for arm in arms if arm["no_teacher"] for r in arm["stages"][-1]["runs"]]
    if no_teacher:  # e.g. self-distillation's plain arm: the teacher's size, task loss only
        return f"{line}. {teacher_check(info, no_teacher)}"
    finals = [r for arm in arms for r in arm["stages"][-1]["runs"]]
    return f"{line}. {teacher_check(info, finals, against='distilled')}"


def modes_markdown(result: dict[str, Any]) -> str:
    """One row per stage of every arm (mean ± std over seeds) and the final comparison."""
    lines = [
        f"# Mode `{result['mode']}` ({result['hardware']}, seeds {result['seeds']})",
        "",
        _teacher_line(result),
        "",
        "Mean ± sample std over seeds; agreement is with each run's own teacher (top-1 next "
        "token); arm FLOPs are cumulative along the arm.",
        "",
        "| arm | run | layers | init | objectives | lr, warmup | steps | arm FLOPs | val ppl "
        "| top-1 acc | agreement |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    finals = {}
    # generation 0 of a charged arm: each seed's own teacher
    gen0 = [result["teachers"][i] for i in result["seed_teachers"]]
    for name, arm in result["arms"].items():
        if arm["charged_teacher"]:
            ppl, acc, flops = (
                mean_and_std([float(t[k]) for t in gen0]) for k in ("val_ppl", "accuracy", "flops")
            )
            lines.append(
                f"| {name} | gen-0 (teacher) | {gen0[0]['layers']} | random | 1·ce | – | – | "
                f"{flops['mean']:.3g} | {ppl['mean']:.1f} ± "
                f"{ppl['std']:.1f} | {acc['mean']:.3f} ± {acc['std']:.3f} | – |"
            )
        for stage in arm["stages"]:
            ppl, acc, agree = stage["val_ppl"], stage["accuracy"], stage["agreement"]
            lines.append(
                f"| {name} | {stage['name']} | {stage['layers']} | {stage['init']} | "
                f"{stage['objectives']} | {shown(stage)} | {stage['steps']['mean']:.0f} | "
                f"{stage['arm_flops']['mean']:.3g} | {ppl['mean']:.1f} ± {ppl['std']:.1f} | "
                f"{acc['mean']:.3f} ± {acc['std']:.3f} | {agree['mean']:.3f} ± {agree['std']:.3f} |"
            )
        finals[name] = arm["stages"][-1]
    (mode_arm, a), (base_arm, b) = list(finals.items())[:2]
    said = paired_verdict(a["runs"], b["runs"], "val_ppl", lower_is_better=True)
    pa, pb = a["val_ppl"], b["val_ppl"]
    lines += [
        "",
        f"Final models at equal FLOPs: **{mode_arm}** {pa['mean']:.1f} ± {pa['std']:.1f} vs "
        f"**{base_arm}** {pb['mean']:.1f} ± {pb['std']:.1f} validation perplexity; paired by "
        f"seed: {said}.",
    ]
    lines += grid_table(result.get("tuning") or {}, "the arm's final validation loss")
    return "\n".join(lines) + "\n"
