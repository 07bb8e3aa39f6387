"""The cross-tokenizer experiment (recipe written, not yet run at scale): is a teacher with
another tokenizer worth distilling from, through ULD on span-aligned positions?

1. the teachers, with their BPE of ``data.vocab_size`` words: converged ones
   (``teacher_stage``, shared with other studies), or one trained here (``teacher_train``);
2. per seed, the same half-depth student (from scratch: another vocabulary has no teacher
   layers to copy), ``student_train`` steps, in four arms:
   - **no teacher**, its own BPE of ``student_vocab`` words (2–4k), CE alone;
   - **ULD, other tokenizer**: the same student and BPE, CE + ULD from the teacher
     (``teacher.tokenizer: own``);
   - **no teacher, the teacher's BPE**: CE alone on the teacher's tokens (the control of the
     two same-tokenizer arms: another vocabulary also changes the text a step covers);
   - **same tokenizer, forward KL**: the student on the teacher's BPE, CE + forward KL;
   - **same tokenizer, ULD**: the student on the teacher's BPE, CE + ULD (separates what ULD
     loses as an objective from what the alignment loses);
3. bits per character on the validation split (tokenizers differ, so perplexities do not
   compare): the final evaluation's loss (nats per token) divided by ln 2 and by the
   validation text's characters per token under the arm's tokenizer.

Writes ``cross_tokenizer.{md,json,html}``; verdicts from paired t-intervals over seeds.
Arms share steps, not FLOPs: the table gives each arm's FLOPs (teacher forwards included).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from distillery.config import ModelSpec, RunConfig
from distillery.data import load_documents, load_tokenizer, split_documents
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.study import (
    SeededStudy,
    TeacherStudentRecipe,
    hardware,
    mean_std,
    paired_verdict,
    run_or_reuse,
    study_teachers,
    write_study,
)

METRICS = ("bits_per_char", "val_loss", "chars_per_token", "flops", "steps")
NO_TEACHER = "no teacher (own BPE)"


class CrossTokenizerStudyConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery experiment cross-tokenizer``: a student with its own BPE distilled from a
    teacher with another (ULD), against no teacher and same-tokenizer distillation."""

    student_vocab: int = Field(3072, ge=300)  # the student's own BPE (the teacher's: data)
    temperature: float = Field(2.0, gt=0.0)  # of the ULD and forward-KL terms
    top_k: int | None = Field(None, ge=1)  # ULD's ranks compared (None: all)
    uses_teacher_stage: ClassVar[bool] = True
    out: Path = Path("runs/cross-tokenizer")


def _arms(cfg: CrossTokenizerStudyConfig, teacher: Path) -> dict[str, dict[str, Any]]:
    """Each arm's data, teacher block and objectives."""
    own_data = cfg.data.model_copy(update={"vocab_size": cfg.student_vocab, "tokenizer": None})
    shared_data = cfg.data.model_copy(update={"tokenizer": teacher})
    ce = {"kind": "ce"}
    uld = {"kind": "uld", "temperature": cfg.temperature, "top_k": cfg.top_k}
    kl = {"kind": "forward_kl", "temperature": cfg.temperature}
    own = {"kind": "live", "path": teacher, "tokenizer": "own"}
    return {
        NO_TEACHER: {"data": own_data, "teacher": None, "objectives": [ce], "dir": "none"},
        "ULD, other tokenizer": {
            "data": own_data, "teacher": own, "objectives": [ce, uld], "dir": "uld-own"
        },
        "no teacher (teacher's BPE)": {
            "data": shared_data, "teacher": None, "objectives": [ce], "dir": "none-shared"
        },
        "same tokenizer, forward KL": {
            "data": shared_data, "teacher": teacher, "objectives": [ce, kl], "dir": "kl-shared"
        },
        "same tokenizer, ULD": {
            "data": shared_data, "teacher": teacher, "objectives": [ce, uld], "dir": "uld-shared"
        },
    }  # fmt: skip


def chars_per_token(cfg: CrossTokenizerStudyConfig, tokenizer_dir: Path) -> float:
    """Characters per token of the validation documents under the tokenizer in the folder."""
    docs = split_documents(
        load_documents(cfg.data.source, cfg.data.text_field),
        cfg.data.val_fraction,
        cfg.data.test_fraction,
    )["val"]
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
    return sum(len(d) for d in docs) / max(tokens, 1)


def cross_tokenizer_study(
    cfg: CrossTokenizerStudyConfig, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run the teacher and every arm × seed into ``cfg.out``; return the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    teachers = study_teachers(cfg, out, reuse=not overwrite)
    student = ModelSpec(
        preset=cfg.teacher.preset,
        overrides={**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers},
    )
    rows: dict[str, dict[str, Any]] = {}
    for index, seed in enumerate(cfg.seeds):
        teacher = teachers.folders(index)
        train = cfg.student_train.model_copy(update={"seed": seed})
        for arm, setup in _arms(cfg, teacher).items():
            run_cfg = RunConfig.model_validate(
                {
                    "data": setup["data"].model_dump(),
                    "model": student.model_dump(),
                    "teacher": setup["teacher"],
                    "objectives": setup["objectives"],
                    "train": train.model_dump(),
                    "out": out / setup["dir"] / f"seed-{seed}",
                }
            )
            name = f"{setup['dir']}/seed-{seed}"
            summary, _ = run_or_reuse(run_cfg, name, reuse=teachers.reused and not overwrite)
            per_token = chars_per_token(cfg, run_cfg.out / "model")
            bpc = summary["val_loss"] / math.log(2) / per_token
            run = {"seed": seed, "bits_per_char": bpc, "chars_per_token": per_token}
            run |= {k: summary[k] for k in ("val_loss", "flops", "steps")}
            rows.setdefault(arm, {"runs": []})["runs"].append(run)
    for row in rows.values():
        for key in METRICS:
            mean, std = mean_std([float(r[key]) for r in row["runs"]])
            row[key] = {"mean": mean, "std": std}
    teacher_cpt = chars_per_token(cfg, teachers.folders(0))  # the teachers share a tokenizer
    worst = max(float(t["val_loss"]) for t in teachers.info["teachers"])
    info = teachers.info | {
        "bits_per_char": teachers.info["val_loss"] / math.log(2) / teacher_cpt,
        "bits_per_char_worst": worst / math.log(2) / teacher_cpt,
    }
    result = {
        "hardware": hardware(),
        "seeds": cfg.seeds,
        "teacher": info,
        "rows": rows,
        "config": cfg.model_dump(mode="json"),
    }
    write_study("cross_tokenizer", result, cross_tokenizer_markdown(result), [out, cfg.results])
    return result


def cross_tokenizer_markdown(result: dict[str, Any]) -> str:
    """The table (mean ± std over seeds) and paired verdicts on bits per character."""
    teacher = result["teacher"]
    lines = [
        f"# Cross-tokenizer distillation ({result['hardware']}, seeds {result['seeds']})",
        "",
        f"Teacher: {teacher['layers']} layers, {teacher['bits_per_char']:.3f} bits/char "
        f"(val ppl {teacher['val_ppl']:.1f} on its own tokenizer).",
        "",
        _teacher_line(result),
        "",
        "| arm | bits/char | val loss (nats/token) | chars/token | FLOPs | steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        cells = [f"{row[k]['mean']:.4g} ± {row[k]['std']:.2g}" for k in METRICS[:3]]
        lines.append(
            f"| {name} | " + " | ".join(cells)
            + f" | {row['flops']['mean']:.3g} | {row['steps']['mean']:.0f} |"
        )  # fmt: skip
    lines.append("")
    rows = result["rows"]
    pairs = [
        ("ULD, other tokenizer", NO_TEACHER),
        ("ULD, other tokenizer", "same tokenizer, forward KL"),
        ("same tokenizer, ULD", "same tokenizer, forward KL"),
        ("same tokenizer, forward KL", "no teacher (teacher's BPE)"),
        ("same tokenizer, ULD", "no teacher (teacher's BPE)"),
        ("no teacher (teacher's BPE)", NO_TEACHER),
    ]
    for arm, against in pairs:
        if arm in rows and against in rows:
            words = paired_verdict(
                rows[arm]["runs"], rows[against]["runs"], "bits_per_char",
                lower_is_better=True, digits=3,
            )  # fmt: skip
            lines.append(f"- {arm} vs {against}, bits/char paired by seed: {words}.")
    return "\n".join(lines) + "\n"


def _teacher_line(result: dict[str, Any]) -> str:
    """Whether every teacher seed is below every no-teacher student in bits per character."""
    teacher, rows = result["teacher"], result["rows"]
    if NO_TEACHER not in rows:
        return "No no-teacher arm to compare the teacher with."
    best = min(float(r["bits_per_char"]) for r in rows[NO_TEACHER]["runs"])
    worst = teacher["bits_per_char_worst"]
    clearly = worst < best
    return f"Worst teacher seed {worst:.3f} bits/char; best no-teacher student {best:.3f}: the " + (
        "teacher is clearly better." if clearly else "**teacher is not clearly better**."
    )
