"""The classifiers study's report (``recipes.classifiers``): the DistilBERT-style table, the
teacher check and the paired verdicts."""

from __future__ import annotations

from typing import Any

from distillery.recipes.study import paired_verdict


def _pm(value: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * value['mean']:.{digits}f} ± {scale * value['std']:.{digits}f}"


def classifiers_markdown(result: dict[str, Any]) -> str:
    """DistilBERT-style table (mean ± std over seeds) and a plain answer."""
    rows, cfg = result["rows"], result["config"]
    bodies = result["bodies"]
    lines = [
        f"# Retained performance of distilled classifiers ({result['hardware']}, "
        f"seeds {result['seeds']})",
        "",
        f"Task: {len(result['classes'])}-class topics ({', '.join(result['classes'])}), "
        f"{result['test_examples']} test texts (held out of every stage). Family: "
        f"{result['family']}. Accuracy and macro-F1 on the test split, mean ± sample std over "
        "seeds; retained % = the student's mean over the teacher's mean; speed-up = the "
        "teacher's time over the model's to classify the first test batches (fastest of 3 "
        "passes, timed side by side in one process); FLOPs = everything that row's model cost "
        "(the teacher's pretraining + fine-tuning; a student's pretraining + fine-tuning, "
        "teacher forwards included, not the teacher's own training).",
        "",
        "| model | layers | params | accuracy | macro-F1 | retained acc % | retained F1 % | "
        "agreement w/ teacher | speed-up | FLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row['label']} | {row['layers']} | {row['params']:,} | "
            f"{_pm(row['accuracy'])} | {_pm(row['macro_f1'])} | "
            f"{row['retained_accuracy']:.1f} | {row['retained_macro_f1']:.1f} | "
            f"{_pm(row['agreement'])} | {row['speedup']:.2f}× | {row['flops']['mean']:.3g} |"
        )
    d_body, f_body, i_body = bodies["distilled"], bodies["no-teacher"], bodies.get("init")
    lines += [
        "",
        f"Pretraining ({cfg['general_train']['steps']} steps for each student body): held-out "
        f"{'masked-token' if 'masked' in result['family'] else 'next-token'} perplexity "
        f"{d_body['val_ppl']['mean']:.1f} ± {d_body['val_ppl']['std']:.1f} distilled vs "
        f"{f_body['val_ppl']['mean']:.1f} ± {f_body['val_ppl']['std']:.1f} without the teacher"
        + (
            f", {i_body['val_ppl']['mean']:.1f} ± {i_body['val_ppl']['std']:.1f} "
            "teacher-initialised with the LM loss alone"
            if i_body
            else ""
        )
        + f" (teacher: {_teacher_ppl(result['teacher_pretrain'])}).",
        "",
        f"- {_teacher_check(rows)}",
    ]
    if "init-labels" in rows:  # what distilling adds over the teacher's layers alone
        said = paired_verdict(rows["distilled-labels"]["runs"], rows["init-labels"]["runs"],
                              "accuracy", lower_is_better=False, digits=3)  # fmt: skip
        lines.append(f"- Distilled body vs teacher-initialised body (both on labels): "
                     f"accuracy {said}.")  # fmt: skip
    best = max(("distilled", "distilled-labels"), key=lambda k: rows[k]["accuracy"]["mean"])
    for key, what in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        said = paired_verdict(
            rows[best]["runs"], rows["no-teacher"]["runs"], key, lower_is_better=False, digits=3
        )
        lines.append(
            f"- {rows[best]['label']} vs the student without the teacher, paired by seed: "
            f"{what} {said}."
        )
    said = paired_verdict(
        rows["distilled"]["runs"],
        rows["distilled-labels"]["runs"],
        "accuracy",
        lower_is_better=False,
        digits=3,
    )
    lines.append(f"- Task distillation on top of the distilled body: accuracy {said}.")
    return "\n".join(lines) + "\n"


def _teacher_ppl(pretrain: dict[str, Any]) -> str:
    """The teacher bodies' held-out perplexity: mean ± std over stage seeds, or the one body's."""
    if pretrain.get("val_ppl") is None:
        return "a pretrained folder, not scored here"
    if len(pretrain.get("teachers", [])) > 1:
        return (
            f"{pretrain['val_ppl']:.1f} ± {pretrain['val_ppl_std']:.1f} over "
            f"{len(pretrain['teachers'])} converged bodies"
        )
    how = "converged" if pretrain.get("converged") else f"{pretrain['steps']} steps"
    return f"{pretrain['val_ppl']:.1f}, one body ({how})"


def _teacher_check(rows: dict[str, Any]) -> str:
    """Whether the fine-tuned teacher is clearly better than the student without it: every
    teacher seed's test accuracy above every teacher-free seed's."""
    teacher = [float(r["accuracy"]) for r in rows["teacher"]["runs"]]
    free = [float(r["accuracy"]) for r in rows["no-teacher"]["runs"]]
    said = (
        f"Teacher test accuracy {_pm(rows['teacher']['accuracy'])}; the student without the "
        f"teacher {_pm(rows['no-teacher']['accuracy'])}: "
    )
    if min(teacher) > max(free):
        return said + "the teacher is clearly better (every teacher seed above every such seed)."
    return said + (
        "**the teacher is not clearly better than its students, so the rows below say little "
        "about distilling from a good teacher**."
    )
