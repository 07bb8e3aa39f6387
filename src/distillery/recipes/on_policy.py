"""``distillery experiment on-policy``: distilling on text the student writes (GKD) against
supervised and sequence-level KD, at equal FLOPs.

1. the teachers: converged ones (``teacher_stage``, trained on ``data`` as language-model
   blocks and shared with other studies), or one trained here for ``teacher_train`` steps;
2. each teacher completes the training prompts once (``distillery generate``: the seq-KD data;
   its FLOPs, the prompts' forwards and every sampled token, are charged to the seq-KD arm);
3. per divergence (forward KL, JSD(0.5)) and seed, the same half-depth student (every other
   teacher layer) on the prompt data: supervised KD (λ = 0, the data's completions), seq-KD
   (the teacher's completions), on-policy λ = 0.5 and λ = 1 — every arm on the FLOPs the
   supervised arm spent (``train.flops_budget``; on-policy arms pay for their sampling);
4. held-out prompts (the validation split): the reference completions' perplexity under the
   student and top-1 agreement with the teacher on them (the run's own final evaluation), the
   teacher's per-token NLL of the student's samples, and distinct-1/2 of those samples.

Writes ``on_policy.{md,json}``; verdicts from paired t-intervals over seeds (``eval.stats``
through ``study.paired_verdict``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from distillery.config import DataConfig, ModelSpec, ObjectiveConfig, RunConfig
from distillery.config.run import OnPolicySpec
from distillery.distributed import DistEnv, resolve_device
from distillery.errors import DistilleryError
from distillery.eval import evaluate_model
from distillery.models import load_pretrained
from distillery.models.generation import Sampling
from distillery.objectives.logits import IGNORE_INDEX, cross_entropy
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.generate import GenerateConfig, complete, generate, prepare_prompts
from distillery.recipes.study import (
    SeededStudy,
    TeacherStudentRecipe,
    hardware,
    mean_std,
    paired_verdict,
    run_or_reuse,
    study_teachers,
    teacher_regime,
    write_study,
)
from distillery.step.on_policy import completion_rows
from distillery.teachers import LiveTeacher


def _divergences() -> list[dict[str, Any]]:
    return [{"kind": "forward_kl"}, {"kind": "jsd", "beta": 0.5}]


class OnPolicyStudyConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery experiment on-policy``: supervised KD, seq-KD and on-policy λ ∈
    ``fractions`` per divergence, at the supervised arm's FLOPs, over seeds."""

    divergences: list[ObjectiveConfig] = Field(default_factory=_divergences, min_length=1)
    fractions: list[float] = Field(default_factory=lambda: [0.5, 1.0], min_length=1)
    sampling: OnPolicySpec = Field(default_factory=lambda: OnPolicySpec(max_new_tokens=48))
    eval_prompts: int = Field(64, gt=0)  # held-out prompts the samples are scored on
    generate_limit: int | None = Field(None, gt=0)  # seq-KD data: the first N training prompts
    prompt_tokens: int | None = Field(None, gt=0)  # the prompt data's cap (data: the teacher's)
    uses_teacher_stage: ClassVar[bool] = True
    out: Path = Path("runs/on-policy")

    def prompt_data(self, teacher: Path, source: str | None = None) -> DataConfig:
        """``data`` as prompt rows on the teacher's tokenizer (``source``: another corpus)."""
        update: dict[str, Any] = {"task": "prompts", "tokenizer": teacher}
        update |= {"prompt_tokens": self.prompt_tokens} if self.prompt_tokens else {}
        return self.data.model_copy(update=update | ({"source": source} if source else {}))


METRICS = ("val_ppl", "agreement", "teacher_nll", "distinct_1", "distinct_2", "steps", "flops")


def distinct_n(samples: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of the samples (Li et al. 2016); 0 without any."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample_metrics(
    cfg: OnPolicyStudyConfig, student_dir: Path, teacher_dir: Path, seed: int
) -> dict[str, float]:
    """On held-out prompts: the reference completions' perplexity under the student and its
    agreement with the teacher on them; the student's samples' mean NLL per token under the
    teacher, their distinct-1 and distinct-2."""
    device = resolve_device(cfg.student_train.device)
    tokenizer, val = prepare_prompts(cfg.prompt_data(teacher_dir), DistEnv(), teacher_dir, ("val",))
    student = load_pretrained(student_dir, "student").to(device)
    teacher = load_pretrained(teacher_dir, "teacher").to(device).eval()
    spec = cfg.sampling
    sampling = Sampling(spec.temperature, spec.top_p, spec.max_new_tokens)
    indices = list(range(min(cfg.eval_prompts, val.num_blocks)))
    nll, tokens, samples = 0.0, 0, []
    for start in range(0, len(indices), 16):
        batch = indices[start : start + 16]
        new = complete(student, tokenizer, val, batch, sampling, seed, step=1 << 30)
        samples += new
        ids, labels = completion_rows(
            val.prompt_ids(batch), new, val.seq_len + spec.max_new_tokens, tokenizer.pad_token_id
        )
        logits = teacher(input_ids=ids.to(device)).logits[..., : len(tokenizer)]
        flat = labels.to(device).reshape(-1)
        nll += float(cross_entropy(logits.reshape(flat.numel(), -1), flat, flat != IGNORE_INDEX))
        tokens += int((flat != IGNORE_INDEX).sum())
    # every arm scored on the same reference completions (a seq-KD run's own validation split
    # holds the teacher's completions, not the references)
    held = evaluate_model(student, val, device=device, teacher=LiveTeacher(teacher),
                          vocab=len(tokenizer))  # fmt: skip
    return {
        "val_ppl": held["val_ppl"],
        "agreement": held["agreement"],
        "teacher_nll": nll / max(tokens, 1),
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
    }


def _arms(cfg: OnPolicyStudyConfig, generated: Path) -> dict[str, dict[str, Any]]:
    """Each arm's data source and ``on_policy`` block."""
    arms: dict[str, dict[str, Any]] = {
        "supervised (λ=0)": {"source": cfg.data.source, "on_policy": None, "folder": "sup"},
        "seq-KD": {"source": str(generated), "on_policy": None, "folder": "seqkd"},
    }
    for fraction in cfg.fractions:
        spec = cfg.sampling.model_copy(update={"fraction": fraction})
        arms[f"on-policy λ={fraction:g}"] = {
            "source": cfg.data.source, "on_policy": spec, "folder": f"on-policy-{fraction:g}"
        }  # fmt: skip
    return arms


def on_policy_study(cfg: OnPolicyStudyConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every divergence × arm × seed into ``cfg.out``; return the table's data. Seed i of
    every arm learns from the same teacher (``study_teachers``), so arms pair by seed."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    teachers = study_teachers(cfg, out, reuse=not overwrite)
    reuse = teachers.reused
    spec = cfg.sampling
    made: dict[Path, tuple[Path, float]] = {}  # teacher -> (its seq-KD data, what it cost)
    for index in range(len(cfg.seeds)):
        teacher_dir = teachers.folders(index)
        if teacher_dir not in made:
            folder = out / f"generated-{len(made)}"
            manifest = generate(GenerateConfig(
                teacher=teacher_dir, data=cfg.prompt_data(teacher_dir),
                temperature=spec.temperature, top_p=spec.top_p,
                max_new_tokens=spec.max_new_tokens, limit=cfg.generate_limit, out=folder,
            ), overwrite=not reuse)  # fmt: skip
            made[teacher_dir] = (folder, float(manifest["flops"]))
    student = ModelSpec(
        preset=cfg.teacher.preset,
        overrides={**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers},
        init_from_teacher="every_other",
    )
    rows: dict[str, dict[str, Any]] = {}
    for divergence in cfg.divergences:
        name = divergence.kind
        for index, seed in enumerate(cfg.seeds):
            teacher_dir = teachers.folders(index)
            generated, generation_flops = made[teacher_dir]
            train = cfg.student_train.model_copy(update={"seed": seed})
            budget: float | None = None
            for arm, setup in _arms(cfg, generated).items():
                charged = generation_flops if setup["folder"] == "seqkd" else 0.0
                if budget is not None and budget <= charged:
                    raise DistilleryError(
                        f"on-policy: generating the seq-KD data ({charged:.3g} FLOPs) costs the "
                        f"whole budget ({budget:.3g}); set generate_limit or more student steps"
                    )
                folder = f"{name}/{setup['folder']}"
                run_cfg = RunConfig(
                    data=cfg.prompt_data(teacher_dir, setup["source"]), model=student,
                    teacher=teacher_dir, objectives=[divergence],
                    train=train if budget is None else train.model_copy(
                        update={"flops_budget": budget - charged}),
                    on_policy=setup["on_policy"], out=out / folder / f"seed-{seed}",
                )  # fmt: skip
                summary, _ = run_or_reuse(run_cfg, f"{folder}/seed-{seed}", reuse=reuse)
                budget = summary["flops"] if budget is None else budget
                summary |= sample_metrics(cfg, run_cfg.out / "model", teacher_dir, seed)
                summary["flops"] += charged
                key = f"{name}: {arm}"
                rows.setdefault(key, {"runs": []})["runs"].append(
                    {"seed": seed, **{k: summary[k] for k in METRICS}}
                )
    for row in rows.values():
        for key in METRICS:
            mean, std = mean_std([float(r[key]) for r in row["runs"]])
            row[key] = {"mean": mean, "std": std}
    # the teachers themselves on the same held-out prompts: the rows' reference point
    reference = {str(t): sample_metrics(cfg, t, t, 0) for t in made}
    result = {
        "hardware": hardware(),
        "seeds": cfg.seeds,
        "teacher": teachers.info,
        "teacher_reference": reference,
        "teacher_generation_flops": sorted(f for _, f in made.values()),
        "rows": rows,
        "config": cfg.model_dump(mode="json"),
    }
    write_study("on_policy", result, on_policy_markdown(result), [out, cfg.results])
    return result


def on_policy_markdown(result: dict[str, Any]) -> str:
    """The table (mean ± std over seeds) and paired verdicts of each arm against λ = 0."""
    lines = [
        f"# On-policy distillation ({result['hardware']}, seeds {result['seeds']})",
        "",
        "| arm | steps | FLOPs | ref. ppl | agreement | teacher NLL of samples | distinct-1 "
        "| distinct-2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, ref in enumerate(result.get("teacher_reference", {}).values()):
        cells = [f"{ref[k]:.3g}" for k in METRICS[:5]]
        lines.append(f"| teacher {i} (itself) | – | – | " + " | ".join(cells) + " |")
    for name, row in result["rows"].items():
        cells = [f"{row[k]['mean']:.3g} ± {row[k]['std']:.2g}" for k in METRICS[:5]]
        lines.append(f"| {name} | {row['steps']['mean']:.0f} | {row['flops']['mean']:.3g} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines.append("")
    if result.get("teacher_reference"):
        worst = max(r["val_ppl"] for r in result["teacher_reference"].values())
        best = min(r["val_ppl"] for row in result["rows"].values() for r in row["runs"])
        lines += [
            f"Teachers: {teacher_regime(result['teacher'])}"
            f" (val ppl {result['teacher']['val_ppl']:.1f} on LM blocks); "
            f"worst teacher's reference ppl {worst:.1f} against the best student run's "
            f"{best:.1f}: the teacher is "
            + ("clearly better." if worst < best else "**not clearly better**."),
            "",
        ]
    for name, row in result["rows"].items():
        base_name = name.split(": ")[0] + ": supervised (λ=0)"
        if name == base_name:
            continue
        base = result["rows"][base_name]["runs"]
        ppl = paired_verdict(row["runs"], base, "val_ppl", lower_is_better=True)
        nll = paired_verdict(row["runs"], base, "teacher_nll", lower_is_better=True, digits=3)
        lines.append(f"- {name} vs λ=0, paired by seed: reference ppl {ppl}; teacher NLL {nll}.")
    return "\n".join(lines) + "\n"
