"""``distillery train`` and ``distillery distill``: one recipe, with or without a teacher.

Protocol: config → data → teacher → student → objectives → engine → export → evaluate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.config import RunConfig, config_to_yaml
from distillery.data import load_tokenizer
from distillery.distributed import init_distributed, resolve_device, shutdown_distributed
from distillery.engine import Engine, seed_everything
from distillery.errors import DistilleryError
from distillery.eval import evaluate_lm, folder_size, generation_speed
from distillery.files import atomic_write_text, write_json
from distillery.models import (
    build_model,
    check_same_tokenizer,
    compute_params,
    every_other,
    init_from_teacher,
    load_causal_lm,
    num_params,
)
from distillery.models.loading import check_vocab_fits
from distillery.objectives.mix import LossMix, terms_from_config
from distillery.recipes.common import export_model, prepare_data, prepare_out_dir
from distillery.teachers import LiveTeacher


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    name: str = "train",
) -> dict[str, Any]:
    """Train (or distil into) ``cfg.model`` and return its summary; files go to ``cfg.out``."""
    out = Path(cfg.out)
    device_kind = "cuda" if cfg.train.device == "cuda" else "auto"
    env = init_distributed(resolve_device(device_kind).type if device_kind == "auto" else "cuda")
    try:
        device = resolve_device(cfg.train.device, env)
        if env.is_main:
            prepare_out_dir(out, resume=resume, overwrite=overwrite)

        # Teacher: a local HF folder, frozen.
        teacher_model = None
        if cfg.teacher is not None:
            teacher_model = load_causal_lm(Path(cfg.teacher), role="teacher")
        tokenizer_dir = Path(cfg.teacher) if cfg.teacher is not None else None
        if cfg.model.path is not None and cfg.data.tokenizer is None:
            tokenizer_dir = tokenizer_dir or Path(cfg.model.path)
        tokenizer, train_data, val_data = prepare_data(cfg.data, env, tokenizer_dir)

        # Student (or the model being trained): a preset or a folder.
        seed_everything(cfg.train.seed)
        if cfg.model.path is not None:
            model = load_causal_lm(Path(cfg.model.path), role="student")
            if cfg.teacher is not None:
                check_same_tokenizer(
                    load_tokenizer(Path(cfg.teacher)), load_tokenizer(cfg.model.path)
                )
        else:
            vocab = (
                teacher_model.get_input_embeddings().weight.shape[0]
                if teacher_model is not None
                else len(tokenizer)
            )
            model = build_model(
                cfg.model.preset or "",
                vocab,
                cfg.model.overrides,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        check_vocab_fits(model, tokenizer, "model")
        if teacher_model is not None:
            check_vocab_fits(teacher_model, tokenizer, "teacher")
            if cfg.data.tokenizer is not None:
                check_same_tokenizer(load_tokenizer(Path(cfg.teacher)), tokenizer)
            t_rows = teacher_model.get_output_embeddings().weight.shape[0]
            s_rows = model.get_output_embeddings().weight.shape[0]
            if t_rows != s_rows:
                raise DistilleryError(
                    f"teacher predicts {t_rows} tokens, student {s_rows}: give the student the "
                    "teacher's vocabulary size (same tokenizer, same embedding rows)"
                )
        if cfg.model.init_from_teacher is not None:
            assert teacher_model is not None
            n_student = model.config.num_hidden_layers
            layer_map = (
                every_other(teacher_model.config.num_hidden_layers, n_student)
                if cfg.model.init_from_teacher == "every_other"
                else list(cfg.model.init_from_teacher)
            )
            init_from_teacher(model, teacher_model, layer_map)

        # Objectives and the teacher signal.
        teacher = LiveTeacher(teacher_model.to(device)) if teacher_model is not None else None
        loss = LossMix(terms_from_config(cfg.objectives), teacher)
        flops_per_token = 6.0 * compute_params(model) + loss.teacher_flops_per_token()

        def eval_fn(m: Any) -> dict[str, float]:
            return evaluate_lm(
                m, val_data, device=device, batch_size=16, max_batches=cfg.train.eval_batches
            )

        if env.is_main:  # written once everything above has been checked
            atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
        engine = Engine(
            model,
            loss,
            train_data,
            cfg.train,
            out,
            device=device,
            env=env,
            flops_per_token=flops_per_token,
            eval_fn=eval_fn,
            name=name,
        )
        progress = engine.fit(resume=resume, stop_after=stop_after)
        if progress.step < cfg.train.steps:  # stopped early on purpose; resume later
            return {"step": progress.step, "finished": False}

        summary: dict[str, Any] = {}
        if env.is_main:
            export_model(model, tokenizer, out / "model")
            metrics = evaluate_lm(model, val_data, device=device, batch_size=16, teacher=teacher)
            summary = {
                "name": name,
                "params": num_params(model),
                "compute_params": compute_params(model),
                "layers": model.config.num_hidden_layers,
                **metrics,
                "flops": progress.flops,
                "tokens": progress.tokens,
                "train_seconds": progress.seconds,
                "tokens_per_s": progress.tokens / max(progress.seconds, 1e-9),
                "size_on_disk": folder_size(out / "model"),
                "generation_tokens_per_s": generation_speed(model, tokenizer, device=device),
                "device": str(device),
                "world_size": env.world_size,
                "finished": True,
            }
            write_json(out / "summary.json", summary)
        return summary
    except KeyboardInterrupt:
        raise DistilleryError(
            f"interrupted; continue with --resume --out {out} (from its last checkpoint)"
        ) from None
    finally:
        shutdown_distributed()
