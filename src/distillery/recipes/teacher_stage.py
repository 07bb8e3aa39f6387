"""A teacher trained to early-stopped convergence, once per (config, seed), reused by every study.

1. the teacher's run (its data, model and train settings; the cosine schedule spans the cap:
   ``max_steps``, or the steps ``max_flops`` pays for) is keyed by content: a folder
   ``root/<preset>-<layers>x<width>-seed<S>-<hash>`` holds it;
2. the engine trains ``eval_every`` steps at a time (a checkpoint at each boundary, so a stopped
   stage resumes exactly), and the validation loss is measured after each segment; an
   improvement of more than ``min_delta`` exports the model to ``model/`` (the best kept);
3. after ``patience`` evaluations without improvement, or at the cap, the best model is scored
   once on the whole validation split and ``summary.json`` is written (``finished: true``); a
   later call with the same config reuses it.

The validation split chooses the checkpoint, so the teacher's perplexity is slightly optimistic;
students are scored on the same split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator

from distillery.config import (
    CrossEntropyObjective,
    DataConfig,
    ModelSpec,
    RunConfig,
    Strict,
    TrainConfig,
    config_to_yaml,
)
from distillery.distributed import DistEnv, resolve_device
from distillery.engine import list_checkpoints
from distillery.errors import DistilleryError
from distillery.eval import evaluate_model
from distillery.files import atomic_write_text, write_json
from distillery.models import load_pretrained


class TeacherStage(Strict):
    """How a study's teacher is trained: until the validation loss stops improving."""

    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1], min_length=1)
    eval_every: int = Field(50, gt=0)  # steps between validation evaluations
    patience: int = Field(3, gt=0)  # evaluations without improvement before stopping
    min_delta: float = Field(0.0, ge=0.0)  # a val-loss drop smaller than this is no improvement
    max_steps: int = Field(3000, gt=0)  # the cap (the cosine schedule spans it)
    max_flops: float | None = Field(None, gt=0.0)  # set: the cap is the steps it pays for
    eval_batches: int = Field(1000, gt=0)  # batches of 16 blocks per evaluation (1000: all)
    root: Path = Path("runs/teachers")  # the content-keyed teacher folders

    @model_validator(mode="after")
    def _distinct_seeds(self) -> TeacherStage:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("teacher_stage.seeds: give each seed once")
        return self


def stage_run_config(
    data: DataConfig, model: ModelSpec, train: TrainConfig, stage: TeacherStage, seed: int
) -> RunConfig:
    """The teacher's run for ``seed`` (task loss only; checkpoints at each evaluation; its folder
    keyed by content)."""
    train = train.model_copy(
        update={
            "seed": seed,
            "steps": stage.max_steps,
            "flops_budget": stage.max_flops,
            "checkpoint_every": stage.eval_every,
            "eval_every": 0,  # the stage evaluates between segments
            "eval_batches": stage.eval_batches,
        }
    )
    cfg = RunConfig(data=data, model=model, objectives=[CrossEntropyObjective()], train=train)
    return cfg.model_copy(update={"out": stage.root / _folder_name(cfg, stage)})


def _keyed(cfg: RunConfig, stage: TeacherStage) -> dict[str, Any]:
    """What the folder's name hashes: the run (its folder left out) and the stopping rule, each
    without the fields at their defaults (a field added to the configs later changes no key)."""
    run = cfg.model_dump(mode="json", exclude={"out"}, exclude_defaults=True)
    rule = stage.model_dump(
        mode="json", exclude={"seeds", "root", "max_steps", "max_flops"}, exclude_defaults=True
    )
    return {"run": run, "stop": rule}


def _same(stored: dict[str, Any], keyed: dict[str, Any]) -> bool:
    """Whether a folder's ``stage.json`` is this config, read back through today's schemas."""
    try:
        return RunConfig.model_validate(stored["run"]) == RunConfig.model_validate(
            keyed["run"]
        ) and TeacherStage.model_validate(stored["stop"]) == TeacherStage.model_validate(
            keyed["stop"]
        )
    except (ValueError, KeyError, TypeError):
        return False


def _folder_name(cfg: RunConfig, stage: TeacherStage) -> str:
    """``<preset>-<layers>x<width>-seed<S>-<12 hex digits of the content hash>``."""
    from distillery.models.presets import PRESETS

    digest = hashlib.sha256(json.dumps(_keyed(cfg, stage), sort_keys=True).encode()).hexdigest()
    preset = cfg.model.preset or "model"
    width = cfg.model.overrides.get("hidden_size", PRESETS.get(preset, {}).get("hidden_size"))
    return f"{preset}-{cfg.model.preset_layers}x{width}-seed{cfg.train.seed}-{digest[:12]}"


def converged_teacher(cfg: RunConfig, stage: TeacherStage, *, reuse: bool = True) -> dict[str, Any]:
    """Train (or resume, or reuse) the teacher of ``cfg`` (from ``stage_run_config``) to
    early-stopped convergence; returns its summary (``model`` is the best model's folder)."""
    out = Path(cfg.out)
    summary_path, keyed_path = out / "summary.json", out / "stage.json"
    keyed = _keyed(cfg, stage)
    if keyed_path.is_file():
        if not _same(json.loads(keyed_path.read_text(encoding="utf-8")), keyed):
            raise DistilleryError(
                f"{out} holds a teacher stage of another config (a hash collision or an edited "
                "stage.json); remove the folder"
            )
        if reuse and summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            if summary.get("finished"):
                summary |= {"name": out.name, "model": str(out / "model")}  # if moved
                print(f"[distillery] teacher {out.name}: converged before, reusing", flush=True)
                return summary
    elif out.exists() and any(out.iterdir()):
        raise DistilleryError(f"{out} holds files no teacher stage wrote; remove it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(keyed_path, keyed)
    atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
    return _train_to_convergence(cfg, stage, reuse=reuse)


def _train_to_convergence(cfg: RunConfig, stage: TeacherStage, *, reuse: bool) -> dict[str, Any]:
    """The stage's loop: segments of ``eval_every`` steps, an evaluation after each, the best
    exported; ``state.json`` records the evaluations so an interrupted stage resumes."""
    from distillery.recipes.common import clear_out_dir, export_model
    from distillery.recipes.run import _assemble, _engine  # the run recipe's own assembly

    if DistEnv().world_size != 1 or torch.distributed.is_initialized():
        raise DistilleryError("the teacher stage trains in one process: run it without torchrun")
    out, env = Path(cfg.out), DistEnv()
    device = resolve_device(cfg.train.device, env)
    parts = _assemble(cfg, env, device)
    engine = _engine(cfg, parts, env, device, f"teacher-seed{cfg.train.seed}")
    state_path = out / "state.json"
    state: dict[str, Any] = {"history": [], "best_step": None, "best_loss": None}
    if reuse and state_path.is_file() and list_checkpoints(out):
        state = json.loads(state_path.read_text(encoding="utf-8"))
        engine.resume()
    else:  # a fresh start: nothing of an earlier attempt may be resumed by a later segment
        clear_out_dir(out)
        state_path.unlink(missing_ok=True)
    cap = engine.cfg.steps

    def stale() -> int:
        """Evaluations since the best one."""
        steps = [h["step"] for h in state["history"]]
        return len(steps) - 1 - steps.index(state["best_step"]) if steps else 0

    while True:
        step = engine.progress.step
        if step > 0 and step not in [h["step"] for h in state["history"]]:
            metrics = engine.evaluate()
            loss = float(metrics["val_loss"])
            ppl = metrics.get("val_ppl")  # None for a classifier (the calibration study's)
            state["history"].append({"step": step, "val_loss": loss, "val_ppl": ppl})
            if state["best_loss"] is None or loss < state["best_loss"] - stage.min_delta:
                export_model(parts.model, parts.tokenizer, out / "model")
                state.update(best_step=step, best_loss=loss, best_flops=engine.progress.flops)
            write_json(state_path, state)
        if step >= cap or (state["history"] and stale() >= stage.patience):
            break
        engine.fit(resume=step > 0, stop_after=stage.eval_every)
    stopped = "patience" if stale() >= stage.patience else "cap"
    return _summarize(cfg, parts, engine, state, stopped)


def _summarize(
    cfg: RunConfig, parts: Any, engine: Any, state: dict[str, Any], stopped: str
) -> dict[str, Any]:
    """Score the best model once on the whole validation split; write ``summary.json``."""
    out = Path(cfg.out)
    device = engine.device
    best = load_pretrained(out / "model", "teacher", cfg.data.task).to(device)
    metrics = evaluate_model(best, parts.val, device=device, vocab=parts.vocab)
    summary = {
        "name": out.name,
        "model": str(out / "model"),
        "seed": cfg.train.seed,
        "layers": best.config.num_hidden_layers,
        "hidden_size": best.config.hidden_size,
        **metrics,
        "best_step": state["best_step"],
        "flops": state["best_flops"],  # the compute the exported (best) teacher cost
        "steps_trained": engine.progress.step,
        "flops_trained": engine.progress.flops,  # including the steps after the best
        "train_seconds": engine.progress.seconds,
        "cap_steps": engine.cfg.steps,
        "stopped": stopped,
        "history": state["history"],
        "finished": True,
    }
    write_json(out / "summary.json", summary)
    return summary


def train_teachers(
    data: DataConfig,
    model: ModelSpec,
    train: TrainConfig,
    stage: TeacherStage,
    *,
    reuse: bool = True,
) -> dict[str, Any]:
    """One converged teacher per ``stage.seeds`` (each trained once, then reused); returns each
    teacher's summary and the teacher-seed spread of validation perplexity."""
    teachers = []
    for seed in stage.seeds:
        cfg = stage_run_config(data, model, train, stage, seed)
        teachers.append(converged_teacher(cfg, stage, reuse=reuse))
    ppl = [float(t["val_ppl"]) for t in teachers]
    mean = sum(ppl) / len(ppl)
    std = (sum((p - mean) ** 2 for p in ppl) / (len(ppl) - 1)) ** 0.5 if len(ppl) > 1 else 0.0
    kept = ("seed", "model", "val_ppl", "val_loss", "best_step", "flops", "steps_trained",
            "flops_trained", "stopped")  # fmt: skip
    return {
        "teachers": [{k: t[k] for k in kept} for t in teachers],
        "val_ppl": {"mean": mean, "std": std, "min": min(ppl), "max": max(ppl)},
        "steps": [t["best_step"] for t in teachers],
        "flops": {  # to the best checkpoint, and all the stage spent (patience included)
            "mean": sum(t["flops"] for t in teachers) / len(teachers),
            "trained_mean": sum(t["flops_trained"] for t in teachers) / len(teachers),
        },
    }


def stage_finished(
    data: DataConfig, model: ModelSpec, train: TrainConfig, stage: TeacherStage, seed: int
) -> bool:
    """Whether the stage teacher of ``seed`` has converged before (its summary is finished)."""
    summary = Path(stage_run_config(data, model, train, stage, seed).out) / "summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text()).get("finished"))


def teacher_for(stage_result: dict[str, Any], index: int) -> Path:
    """The teacher folder of the ``index``-th student seed: the teachers taken in turn, so every
    arm's seed ``i`` learns from the same teacher (paired) and teacher spread enters the
    seed-to-seed spread."""
    teachers = stage_result["teachers"]
    return Path(teachers[index % len(teachers)]["model"])


class TeachersConfig(Strict):
    """Converged teachers on their own (``experiments/teachers*.yaml``): how many steps and
    FLOPs convergence takes, the best validation perplexity, the teacher-seed spread."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelSpec = Field(default_factory=ModelSpec)
    teacher_train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=2e-3))
    teacher_stage: TeacherStage = Field(default_factory=TeacherStage)
    name: str = "teachers"  # the result files' stem
    out: Path | None = None  # NAME.json / NAME.md also here (the teachers live in stage.root)
    results: Path | None = None


def teachers(cfg: TeachersConfig, *, reuse: bool = True) -> dict[str, Any]:
    """Train (or reuse) ``cfg``'s teachers; write ``NAME.json`` and ``NAME.md`` to ``results``."""
    from distillery.recipes.study import hardware, write_study

    stage = train_teachers(cfg.data, cfg.teacher, cfg.teacher_train, cfg.teacher_stage, reuse=reuse)
    tokens_per_step = cfg.teacher_train.batch_size * cfg.data.seq_len
    result = {"hardware": hardware(), "tokens_per_step": tokens_per_step, **stage}
    result["config"] = cfg.model_dump(mode="json")
    write_study(cfg.name, result, teachers_markdown(result), [cfg.out, cfg.results])
    return result


def teachers_markdown(result: dict[str, Any]) -> str:
    """One row per teacher seed, then the mean ± std of the best validation perplexity."""
    lines = [
        f"# Teachers trained to early stopping ({result['hardware']})",
        "",
        f"{result['tokens_per_step']:,} tokens per step; validation perplexity of the best "
        "checkpoint on the whole validation split (which also chose it).",
        "",
        "| seed | best val ppl | best step | FLOPs to best | steps trained | stopped by |",
        "|---|---|---|---|---|---|",
    ]
    for t in result["teachers"]:
        lines.append(
            f"| {t['seed']} | {t['val_ppl']:.1f} | {t['best_step']} | {t['flops']:.3g} | "
            f"{t['steps_trained']} | {t['stopped']} |"
        )
    ppl = result["val_ppl"]
    lines += ["", f"Teacher-seed spread: {ppl['mean']:.1f} ± {ppl['std']:.1f} (sample std)."]
    capped = [t["seed"] for t in result["teachers"] if t["stopped"] == "cap"]
    if capped:
        lines.append(
            f"Seeds {capped} reached the cap before the patience rule stopped them (validation "
            "loss still improving at the cap under the cosine schedule): a higher cap may give a "
            "better teacher (not measured here)."
        )
    return "\n".join(lines) + "\n"
