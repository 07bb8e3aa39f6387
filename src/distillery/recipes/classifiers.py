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
from pydantic import Field, model_validator

from distillery.config import (
    CrossEntropyObjective,
    DataConfig,
    ForwardKLObjective,
    ModelSpec,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
)
from distillery.distributed import DistEnv, resolve_device
from distillery.errors import DistilleryError
from distillery.eval import evaluate_model
from distillery.eval.metrics import inference_seconds
from distillery.models import load_pretrained, num_params, spec_is_encoder
from distillery.recipes.classifiers_report import classifiers_markdown
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.study import (
    SeededStudy,
    distilbert_mix,
    hardware,
    mean_std,
    run_or_reuse,
    write_study,
)
from distillery.recipes.teacher_stage import (
    TeacherStage,
    stage_finished,
    teacher_for,
    train_teachers,
)
from distillery.teachers import LiveTeacher


def _classify_data() -> DataConfig:
    return DataConfig(task="classify", val_fraction=0.1, test_fraction=0.1)


class ClassifiersConfig(SeededStudy):
    """``distillery experiment classifiers``: DistilBERT's recipe and a retained-performance
    table (see ``recipes/classifiers``). The teacher is pretrained by the lab on the texts of
    ``data`` (masked LM for a ``bert-*`` preset, next tokens for a decoder) or read from
    ``teacher.path`` (a pretrained masked/causal LM folder), then fine-tuned on the labels; the
    student (``student_layers`` deep, the teacher's width) is pretrained with and without the
    teacher, then fine-tuned with and without task distillation; accuracy and macro-F1 on the
    test split."""

    data: DataConfig = Field(default_factory=_classify_data)  # the labelled texts
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(preset="bert-mini"))
    teacher_pretrain: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=600, lr=1e-3, warmup_steps=40)
    )
    # Set: the body is a converged teacher (``recipes.teacher_stage``: ``teacher_pretrain``'s
    # settings, trained until validation stops improving), one per stage seed; student seed i
    # uses body i mod len(seeds). Unset: one body, ``teacher_pretrain`` steps, for every seed.
    teacher_stage: TeacherStage | None = None
    teacher_finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=100, lr=5e-4, warmup_steps=10)
    )
    student_layers: int = Field(2, gt=0)  # initialised from every other teacher layer
    # The student's architecture: default the teacher preset at ``student_layers``; needed
    # (a preset of the teacher's width) when the teacher is a folder.
    student: ModelSpec | None = None
    general_objectives: list[ObjectiveConfig] = Field(
        default_factory=distilbert_mix, min_length=1
    )  # the student's pretraining with the teacher (DistilBERT's triple loss)
    general_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=300, lr=1e-3, warmup_steps=20)
    )
    task_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            CrossEntropyObjective(weight=1.0),
            ForwardKLObjective(weight=1.0, temperature=2.0),
        ],
        min_length=1,
    )  # fine-tuning the distilled student with the fine-tuned teacher
    finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=100, lr=5e-4, warmup_steps=10)
    )
    out: Path = Path("runs/classifiers")

    @model_validator(mode="after")
    def _shape(self) -> ClassifiersConfig:
        if self.data.task != "classify":
            raise ValueError("data.task: the labelled texts must be data.task=classify")
        if self.teacher.init_from_teacher is not None or self.teacher.grow is not None:
            raise ValueError("teacher: a preset or a pretrained folder, nothing else")
        if self.teacher.path is not None and self.teacher_stage is not None:
            raise ValueError("teacher_stage: the teacher is a pretrained folder; drop one of them")
        if self.teacher.path is not None and self.student is None:
            raise ValueError("student: give the student's preset when the teacher is a folder")
        if self.student is not None and self.student.path is not None:
            raise ValueError("student: a preset (it is initialised from the teacher's layers)")
        layers = self.teacher.preset_layers
        if layers is not None and 2 * self.student_layers - 1 > layers:
            raise ValueError(
                f"student_layers={self.student_layers} needs a teacher with at least "
                f"{2 * self.student_layers - 1} layers (every other layer); it has {layers}"
            )
        for field in ("general_objectives", "task_objectives"):
            kinds = [o.kind for o in getattr(self, field)]
            if "attention_kl" in kinds or "iit" in kinds:
                raise ValueError(f"{field}: logits and hidden_cosine/hidden_mse only")
        return self


ROWS = {
    "teacher": "teacher (fine-tuned)",
    "distilled": "student: distilled body + task distillation",
    "distilled-labels": "student: distilled body, fine-tuned on labels (DistilBERT's protocol)",
    "init-labels": "student: teacher-initialised body, LM loss only, labels (init alone)",
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


def _pretrained_bodies(
    cfg: ClassifiersConfig, out: Path, texts: Any, *, reuse: bool
) -> tuple[list[Path], list[dict[str, Any]], bool]:
    """(the teacher's pretrained bodies, their summaries, whether every one was reused): the
    folder given, the stage's converged teachers, or one body pretrained by the lab on
    ``texts``. The first body's tokenizer serves every later run (the stage's teachers share
    theirs: one data config, one tokenizer)."""
    if cfg.teacher.path is not None:
        return [Path(cfg.teacher.path)], [{"flops": 0.0, "val_ppl": None}], reuse
    if cfg.teacher_stage is not None:
        stage, pre = cfg.teacher_stage, cfg.teacher_pretrain
        before = all(stage_finished(texts, cfg.teacher, pre, stage, s) for s in stage.seeds)
        result = train_teachers(texts, cfg.teacher, pre, stage, reuse=reuse)
        bodies = [teacher_for(result, i) for i in range(len(stage.seeds))]
        tokenizers = {(b / "tokenizer.json").read_bytes() for b in bodies}
        if len(tokenizers) != 1:  # a student seed must read the tokens its teacher read
            raise DistilleryError(f"the stage's teachers ({bodies}) have different tokenizers")
        summaries = [
            {**t, "steps": t["best_step"], "flops": t["flops_trained"]}  # all the stage spent
            for t in result["teachers"]
        ]
        return bodies, summaries, reuse and before
    summary, reused = run_or_reuse(
        RunConfig(
            data=texts,
            model=cfg.teacher,
            objectives=[CrossEntropyObjective()],
            train=cfg.teacher_pretrain,
            out=out / "teacher-pretrain",
        ),
        "teacher-pretrain",
        reuse=reuse,
    )
    return [out / "teacher-pretrain" / "model"], [summary], reused


def _seed_runs(
    cfg: ClassifiersConfig, seed: int, out: Path, body: Path, data: dict[str, Any], reuse: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """One seed's stages: the teacher fine-tuned, the two student bodies, the three fine-tunes;
    (summaries, exported model folders) by stage. A stage reruns when one it builds on did."""
    texts, labelled, ce = data["texts"], data["labelled"], [CrossEntropyObjective()]

    def stage(name: str, upstream: bool, **fields: Any) -> dict[str, Any]:
        train = fields.pop("train").model_copy(update={"seed": seed})
        rc = RunConfig(**fields, train=train, out=out / name / f"seed-{seed}")
        summary, reused = run_or_reuse(rc, f"{name}/seed-{seed}", reuse=upstream)
        return {**summary, "_reused": reused, "_out": rc.out}

    teacher = stage(
        "teacher", reuse, data=labelled, model=ModelSpec(path=body), objectives=ce,
        train=cfg.teacher_finetune,
    )  # fmt: skip
    d_body = stage(
        "body-distilled", reuse, data=texts, model=_student_spec(cfg, init=True), teacher=body,
        objectives=cfg.general_objectives, train=cfg.general_train,
    )  # fmt: skip
    f_body = stage(
        "body-no-teacher", reuse, data=texts, model=_student_spec(cfg, init=False),
        objectives=ce, train=cfg.general_train,
    )  # fmt: skip
    i_body = stage(  # every other teacher layer, then the task loss alone: init, no distilling
        "body-init", reuse, data=texts, model=_student_spec(cfg, init=True), teacher=body,
        objectives=ce, train=cfg.general_train,
    )  # fmt: skip
    summaries = {"teacher": teacher, "body-distilled": d_body, "body-no-teacher": f_body,
                 "body-init": i_body}  # fmt: skip
    t_dir = teacher["_out"] / "model"
    finals = {
        "distilled": (d_body, t_dir, cfg.task_objectives),
        "distilled-labels": (d_body, None, ce),
        "init-labels": (i_body, None, ce),
        "no-teacher": (f_body, None, ce),
    }
    for name, (body_run, fine_teacher, objectives) in finals.items():
        fresh_teacher = fine_teacher is not None and not teacher["_reused"]
        summaries[name] = stage(
            name, reuse and body_run["_reused"] and not fresh_teacher, data=labelled,
            model=ModelSpec(path=body_run["_out"] / "model"), teacher=fine_teacher,
            objectives=objectives, train=cfg.finetune,
        )  # fmt: skip
        summaries[name]["flops"] += body_run["flops"]  # the body's pretraining counts too
    folders = {name: summaries[name]["_out"] / "model" for name in ROWS}
    return summaries, folders


def _test_rows(
    cfg: ClassifiersConfig,
    test: Any,
    runs: dict[str, list[dict[str, Any]]],
    folders: dict[str, dict[int, Path]],
) -> dict[str, Any]:
    """Test-split quality of every row and seed (against that seed's teacher), and size and
    speed timed side by side (first seed)."""
    device = resolve_device(cfg.finetune.device)
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
    return rows


def classifiers(cfg: ClassifiersConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage × seed into ``cfg.out``; return the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    encoder = spec_is_encoder(cfg.teacher)
    texts = cfg.data.model_copy(update={"task": "mlm" if encoder else "lm"})
    bodies_in, pretrains, reuse = _pretrained_bodies(cfg, out, texts, reuse=not overwrite)
    body = bodies_in[0]  # its tokenizer reads every text
    data = {
        "texts": texts.model_copy(update={"tokenizer": body}),
        "labelled": cfg.data.model_copy(update={"tokenizer": body}),
    }
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in ROWS}
    folders: dict[str, dict[int, Path]] = {key: {} for key in ROWS}
    bodies: dict[str, list[dict[str, Any]]] = {"distilled": [], "init": [], "no-teacher": []}
    for i, seed in enumerate(cfg.seeds):
        k = i % len(bodies_in)  # seed index i: body i mod n, as in every staged study
        summaries, seed_folders = _seed_runs(cfg, seed, out, bodies_in[k], data, reuse)
        bodies["distilled"].append(summaries["body-distilled"])
        bodies["no-teacher"].append(summaries["body-no-teacher"])
        bodies["init"].append(summaries["body-init"])
        runs["teacher"].append({"flops": pretrains[k]["flops"] + summaries["teacher"]["flops"]})
        for name in list(ROWS)[1:]:
            runs[name].append({"flops": summaries[name]["flops"]})
        for name, folder in seed_folders.items():
            folders[name][seed] = folder
    _, test = prepare_data(data["labelled"], DistEnv(), body, splits=("test",), encoder=encoder)
    result = {
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "family": "encoder (masked LM)" if encoder else "decoder (next tokens)",
        "test_examples": test.num_blocks,
        "classes": test.classes,
        "teacher_pretrain": _pretrain_info(cfg, pretrains),
        # The student bodies' held-out masked/next-token perplexity (and agreement).
        "bodies": {
            name: {
                key: _spread([b[key] for b in summaries])
                for key in ("val_ppl", "agreement")
                if key in summaries[0]
            }
            for name, summaries in bodies.items()
        },
        "rows": _test_rows(cfg, test, runs, folders),
        "config": cfg.model_dump(mode="json"),
    }
    write_study("classifiers", result, classifiers_markdown(result), [out, cfg.results])
    return result


def _pretrain_info(cfg: ClassifiersConfig, pretrains: list[dict[str, Any]]) -> dict[str, Any]:
    """The teacher bodies' held-out LM perplexity (mean, spread, each), steps and FLOPs."""
    ppl = [p.get("val_ppl") for p in pretrains]
    known = [float(v) for v in ppl if v is not None]
    mean, std = mean_std(known) if known else (None, None)
    return {
        "val_ppl": mean,
        "val_ppl_std": std,
        "converged": cfg.teacher_stage is not None,
        "teachers": [
            {k: p.get(k) for k in ("seed", "val_ppl", "steps", "flops", "stopped")}
            for p in pretrains
        ],
        "steps": pretrains[0].get("steps"),
        "flops": pretrains[0].get("flops"),
    }


def _spread(values: list[float]) -> dict[str, float]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}
