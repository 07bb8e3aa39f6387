"""``distillery experiment classifiers``: DistilBERT's recipe and a retained-performance table.

1. the teacher's body: pretrained by the lab on the texts (masked LM for an encoder preset,
   next tokens for a decoder), or a pretrained folder (``teacher.path``); shared by all seeds;
2. per seed, the teacher fine-tuned on the labels (task loss);
3. per seed, the student's body (``student_layers`` deep, same width) pretrained on the same
   texts for the same steps, twice: *distilled* (every other teacher layer, DistilBERT's soft
   targets + masked-LM loss + hidden cosine) and *without the teacher* (random init, task loss);
4. per seed, fine-tuning on the labels: the distilled body with task distillation from that
   seed's fine-tuned teacher, the distilled body on the labels alone (DistilBERT's own GLUE
   protocol), and the teacher-free body on the labels alone;
5. accuracy and macro-F1 on the test split (never seen in any stage: texts are split by hash,
   the same way for pretraining and fine-tuning), agreement with the teacher, retained %,
   parameters, FLOPs, and the inference speed-up timed side by side in this process.

Writes ``classifiers.{md,json}`` to the output folder and to ``results`` when set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distillery.config import ClassifiersConfig, CrossEntropyObjective, ModelSpec, RunConfig
from distillery.distributed import DistEnv, resolve_device
from distillery.eval import evaluate_model
from distillery.eval.metrics import inference_seconds
from distillery.models import folder_is_encoder, is_encoder, load_pretrained, num_params
from distillery.recipes.common import (
    against_spread,
    hardware,
    mean_std,
    prepare_data,
    prepare_out_dir,
    run_or_reuse,
    write_study,
)
from distillery.teachers import LiveTeacher

ROWS = {
    "teacher": "teacher (fine-tuned)",
    "distilled": "student: distilled body + task distillation",
    "distilled-labels": "student: distilled body, fine-tuned on labels (DistilBERT's protocol)",
    "no-teacher": "student without the teacher (same pretraining steps, labels)",
}
METRICS = ("accuracy", "macro_f1", "agreement", "flops")


def _student_spec(cfg: ClassifiersConfig, *, init: bool) -> ModelSpec:
    """The student's architecture, initialised from every other teacher layer if ``init``."""
    base = cfg.student or ModelSpec(
        preset=cfg.teacher.preset,
        overrides={**cfg.teacher.overrides, "num_hidden_layers": cfg.student_layers},
    )
    return base.model_copy(update={"init_from_teacher": "every_other" if init else None})


def classifiers(cfg: ClassifiersConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage × seed into ``cfg.out``; return the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    encoder = (
        folder_is_encoder(cfg.teacher.path)
        if cfg.teacher.path
        else is_encoder(cfg.teacher.preset or "")
    )
    texts = cfg.data.model_copy(update={"task": "mlm" if encoder else "lm"})
    ce = [CrossEntropyObjective()]

    # 1. The teacher's pretrained body (its tokenizer serves every later run).
    reuse = not overwrite
    pretrain: dict[str, Any] = {"flops": 0.0}
    if cfg.teacher.path is not None:
        body = Path(cfg.teacher.path)
    else:
        pretrain, reuse = run_or_reuse(
            RunConfig(
                data=texts,
                model=cfg.teacher,
                objectives=ce,
                train=cfg.teacher_pretrain,
                out=out / "teacher-pretrain",
            ),
            "teacher-pretrain",
            reuse=reuse,
        )
        body = out / "teacher-pretrain" / "model"
    texts = texts.model_copy(update={"tokenizer": body})
    labelled = cfg.data.model_copy(update={"tokenizer": body})

    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in ROWS}
    folders: dict[str, dict[int, Path]] = {key: {} for key in ROWS}
    bodies: dict[str, list[dict[str, Any]]] = {"distilled": [], "no-teacher": []}
    for seed in cfg.seeds:

        def stage(name: str, rc: RunConfig, upstream: bool, seed: int = seed) -> dict[str, Any]:
            summary, reused = run_or_reuse(rc, f"{name}/seed-{seed}", reuse=upstream)
            summary["_reused"] = reused
            return summary

        def train(base: Any, seed: int = seed) -> Any:
            return base.model_copy(update={"seed": seed})

        where = {name: out / name / f"seed-{seed}" for name in (
            "teacher", "body-distilled", "body-no-teacher", *list(ROWS)[1:]
        )}  # fmt: skip
        teacher = stage(
            "teacher",
            RunConfig(
                data=labelled,
                model=ModelSpec(path=body),
                objectives=ce,
                train=train(cfg.teacher_finetune),
                out=where["teacher"],
            ),
            reuse,
        )
        d_body = stage(
            "body-distilled",
            RunConfig(
                data=texts,
                model=_student_spec(cfg, init=True),
                teacher=body,
                objectives=cfg.general_objectives,
                train=train(cfg.general_train),
                out=where["body-distilled"],
            ),
            reuse,
        )
        f_body = stage(
            "body-no-teacher",
            RunConfig(
                data=texts,
                model=_student_spec(cfg, init=False),
                objectives=ce,
                train=train(cfg.general_train),
                out=where["body-no-teacher"],
            ),
            reuse,
        )
        bodies["distilled"].append(d_body)
        bodies["no-teacher"].append(f_body)
        t_dir = where["teacher"] / "model"
        finals = {
            "distilled": (d_body, t_dir, cfg.task_objectives),
            "distilled-labels": (d_body, None, ce),
            "no-teacher": (f_body, None, ce),
        }
        runs["teacher"].append({"flops": pretrain["flops"] + teacher["flops"]})
        folders["teacher"][seed] = t_dir
        for name, (body_run, fine_teacher, objectives) in finals.items():
            source = where["body-distilled" if name != "no-teacher" else "body-no-teacher"]
            fresh_teacher = fine_teacher is not None and not teacher["_reused"]
            upstream = reuse and body_run["_reused"] and not fresh_teacher
            summary = stage(
                name,
                RunConfig(
                    data=labelled,
                    model=ModelSpec(path=source / "model"),
                    teacher=fine_teacher,
                    objectives=objectives,
                    train=train(cfg.finetune),
                    out=where[name],
                ),
                upstream,
            )
            runs[name].append({"flops": body_run["flops"] + summary["flops"]})
            folders[name][seed] = where[name] / "model"

    # 5. Test-split quality (against that seed's teacher) and speed, side by side.
    device = resolve_device(cfg.finetune.device)
    _, test = prepare_data(labelled, DistEnv(), body, splits=("test",), encoder=encoder)
    speed: dict[str, float] = {}
    params: dict[str, int] = {}
    layers: dict[str, int] = {}
    for i, seed in enumerate(cfg.seeds):
        t_model = load_pretrained(folders["teacher"][seed], "teacher", "classify").to(device)
        t_signal = LiveTeacher(t_model)
        for name in ROWS:
            model = (
                t_model
                if name == "teacher"
                else load_pretrained(folders[name][seed], name, "classify").to(device)
            )
            metrics = evaluate_model(
                model, test, device=device, teacher=None if name == "teacher" else t_signal
            )
            metrics.setdefault("agreement", 1.0)
            runs[name][i] |= {"seed": seed, **metrics}
            if i == 0:
                speed[name] = inference_seconds(model, test, device)
                params[name] = num_params(model)
                layers[name] = model.config.num_hidden_layers
    rows: dict[str, Any] = {}
    for name, values in runs.items():
        rows[name] = {
            "label": ROWS[name],
            "runs": values,
            "params": params[name],
            "layers": layers[name],
            "seconds": speed[name],
            "speedup": speed["teacher"] / speed[name],
        }
        rows[name] |= {key: _spread([float(v[key]) for v in values]) for key in METRICS}
    for name in ROWS:
        for key in ("accuracy", "macro_f1"):
            rows[name][f"retained_{key}"] = (
                100.0 * rows[name][key]["mean"] / rows["teacher"][key]["mean"]
            )
    result = {
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "family": "encoder (masked LM)" if encoder else "decoder (next tokens)",
        "test_examples": test.num_blocks,
        "classes": test.classes,
        "teacher_pretrain": {k: pretrain.get(k) for k in ("val_ppl", "steps", "flops")},
        # The student bodies' held-out masked/next-token perplexity (and agreement).
        "bodies": {
            name: {
                key: _spread([b[key] for b in summaries])
                for key in ("val_ppl", "agreement")
                if key in summaries[0]
            }
            for name, summaries in bodies.items()
        },
        "rows": rows,
        "config": cfg.model_dump(mode="json"),
    }
    write_study("classifiers", result, classifiers_markdown(result), [out, cfg.results])
    return result


def _spread(values: list[float]) -> dict[str, float]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


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
    d_body, f_body = bodies["distilled"], bodies["no-teacher"]
    lines += [
        "",
        f"Pretraining ({cfg['general_train']['steps']} steps for each student body): held-out "
        f"{'masked-token' if 'masked' in result['family'] else 'next-token'} perplexity "
        f"{d_body['val_ppl']['mean']:.1f} ± {d_body['val_ppl']['std']:.1f} distilled vs "
        f"{f_body['val_ppl']['mean']:.1f} ± {f_body['val_ppl']['std']:.1f} without the teacher "
        f"(teacher: {result['teacher_pretrain']['val_ppl'] or float('nan'):.1f}).",
    ]
    seeds = len(result["seeds"])
    best = max(("distilled", "distilled-labels"), key=lambda k: rows[k]["accuracy"]["mean"])
    for key, what in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        gap = rows[best][key]["mean"] - rows["no-teacher"][key]["mean"]
        stds = [rows[best][key]["std"], rows["no-teacher"][key]["std"]]
        lines.append(
            f"- {rows[best]['label']} vs the student without the teacher: {what} "
            f"{gap:+.3f} ({against_spread(gap, stds, seeds, 3)})."
        )
    gap = rows["distilled"]["accuracy"]["mean"] - rows["distilled-labels"]["accuracy"]["mean"]
    stds = [rows["distilled"]["accuracy"]["std"], rows["distilled-labels"]["accuracy"]["std"]]
    lines.append(
        f"- Task distillation on top of the distilled body: accuracy {gap:+.3f} "
        f"({against_spread(gap, stds, seeds, 3)})."
    )
    return "\n".join(lines) + "\n"
