"""``distillery train`` and ``distillery distill``: one recipe, with or without a teacher.

Protocol: config → output folder → models from folders → data → student → objectives →
engine → export → one full evaluation → summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from distillery.config import RunConfig, config_to_yaml
from distillery.data import has_tokenizer, load_tokenizer
from distillery.distributed import init_distributed, resolve_device, shutdown_distributed
from distillery.engine import Engine, seed_everything, steps_for_budget
from distillery.eval import (
    evaluate_model,
    folder_size,
    generation_speed,
    interchange_agreement,
)
from distillery.files import atomic_write_text, write_json
from distillery.models import (
    build_model,
    check_classes,
    check_fits_data,
    check_same_tokenizer,
    compute_params,
    every_other,
    folder_is_encoder,
    init_from_teacher,
    is_encoder,
    load_pretrained,
    num_params,
)
from distillery.models.dropout import add_residual_dropout
from distillery.models.growth import grow_layers, stack_layers
from distillery.models.loading import is_bidirectional
from distillery.objectives.chunked import check_plain_head
from distillery.objectives.mix import LossMix, terms_from_config
from distillery.recipes.common import export_model, once_per_job, prepare_data, prepare_out_dir
from distillery.teacher_cache import CachedTeacher, cache_key, check_cache_objectives
from distillery.teachers import EnsembleTeacher, LiveTeacher, MCDropoutTeacher, TeacherSignal


def _student(
    cfg: RunConfig,
    vocab: int,
    tok: Any,
    classes: list[str] | None,
) -> PreTrainedModel:
    """The model to train (seeded): from its folder — a language model given ``classes``
    becomes a classifier with a new head (fine-tuning) — else a fresh preset."""
    seed_everything(cfg.train.seed)
    if cfg.model.path is not None:
        return load_pretrained(cfg.model.path, "student", cfg.data.task, classes=classes)
    return build_model(
        cfg.model.preset or "",
        vocab,
        cfg.model.overrides,
        num_labels=len(classes) if classes is not None else None,
        task=cfg.data.task,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


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
    env = init_distributed(resolve_device(cfg.train.device).type)
    ok = False
    try:
        device = resolve_device(cfg.train.device, env)
        once_per_job(
            env,
            lambda: prepare_out_dir(out, resume=resume, overwrite=overwrite),
            everyone=False,
        )

        # Models given as folders: the teacher(s) (frozen) and perhaps the student.
        teacher_paths = cfg.teacher_paths
        task = cfg.data.task
        teacher_models = [load_pretrained(p, "teacher", task) for p in teacher_paths]
        teacher_model = teacher_models[0] if teacher_models else None
        tokenizer_dir = teacher_paths[0] if teacher_paths else cfg.model.path
        # Encoders read texts as cls + tokens + sep (decoders: tokens + eos).
        encoder = any(is_bidirectional(m.config) for m in teacher_models) or (
            folder_is_encoder(cfg.model.path)
            if cfg.model.path
            else is_encoder(cfg.model.preset or "")
        )
        tokenizer, train_data, val_data = prepare_data(
            cfg.data, env, tokenizer_dir, encoder=encoder, seed=cfg.train.seed
        )
        # Every teacher (and a student folder) must use the tokenizer the data was cut with.
        others = teacher_paths[1:] if cfg.data.tokenizer is None else teacher_paths
        for folder in [*others, *([cfg.model.path] if teacher_paths and cfg.model.path else [])]:
            if has_tokenizer(folder):
                check_same_tokenizer(load_tokenizer(folder), tokenizer)

        # The student: its vocabulary is the teacher's (same output rows) or the tokenizer's.
        # A classifier's outputs are the training split's classes; logits are cut to ``cut``.
        classes = getattr(train_data, "classes", None)
        cut = len(classes) if classes is not None else len(tokenizer)
        head = teacher_model.get_output_embeddings() if teacher_model else None
        vocab = head.weight.shape[0] if head is not None else None
        model = _student(cfg, vocab or len(tokenizer), tokenizer, classes)
        check_fits_data(model, tokenizer, cfg.data.seq_len, "model")
        for role, m in [("model", model)] + [("teacher", t) for t in teacher_models]:
            # Same tokenizer (checked above); embedding tables padded to different sizes are
            # reconciled by cutting both sides' logits to the tokenizer's real tokens.
            check_fits_data(m, tokenizer, cfg.data.seq_len, role)
            if classes is not None:
                check_classes(m, classes, role)
        if classes is not None:
            model.config.id2label = dict(enumerate(classes))  # saved with the model
            model.config.label2id = {c: i for i, c in enumerate(classes)}
        if cfg.model.init_from_teacher is not None and teacher_model is not None:
            layer_map = (
                every_other(teacher_model.config.num_hidden_layers, model.config.num_hidden_layers)
                if cfg.model.init_from_teacher == "every_other"
                else list(cfg.model.init_from_teacher)
            )
            init_from_teacher(model, teacher_model, layer_map)
        if cfg.model.grow is not None:
            grow = cfg.model.grow
            if grow.kind == "stack":
                stack_layers(model)
            else:
                grow_layers(model, grow.layers or 0, where=grow.kind, identity=grow.identity)
        add_residual_dropout(model, cfg.model.dropout)

        # Objectives and the teacher signal; compute charged per trained token.
        # With a teacher cache the live teacher is only for the final evaluation: it waits on
        # the CPU meanwhile.
        cached = cfg.teacher_cache is not None
        members = [LiveTeacher(m if cached else m.to(device)) for m in teacher_models]
        teacher: TeacherSignal | None = members[0] if members else None
        if len(members) > 1:
            teacher = EnsembleTeacher(
                members, vocab=cut, weights=cfg.teacher_weights, combine=cfg.ensemble
            )
        if cfg.teacher_mc_samples is not None:
            teacher = MCDropoutTeacher(members[0], cfg.teacher_mc_samples, vocab=cut)
        live_teacher = teacher  # the final evaluation always asks the real teacher
        if cfg.teacher_cache is not None:
            expect = cache_key(teacher_paths[0], tokenizer, train_data)
            teacher = CachedTeacher(cfg.teacher_cache, train_data, expect)
            check_cache_objectives(cfg.objectives, teacher.temperature, cfg.teacher_cache)
        chunk = cfg.train.logit_chunk_size
        if chunk:
            check_plain_head(model, "model")
        seed_everything(cfg.train.seed)  # the objectives' projections start the same each run
        loss = LossMix(
            terms_from_config(cfg.objectives),
            teacher,
            student=model,
            vocab=cut,
            chunk_size=chunk,
            states_on="labels" if task == "lm" else "tokens",
            pad_token_id=tokenizer.pad_token_id,
        )
        n_student = compute_params(model)
        flops_per_token = (
            6.0 * n_student
            + loss.teacher_flops_per_token()
            + loss.interchange_flops_per_token(n_student)
        )
        train_cfg = steps_for_budget(
            cfg.train, flops_per_token * cfg.train.batch_size * cfg.data.seq_len
        )

        def eval_fn(m: Any) -> dict[str, float]:
            return evaluate_model(
                m, val_data, device=device, max_batches=cfg.train.eval_batches, vocab=cut
            )

        engine = Engine(
            model,
            loss,
            train_data,
            train_cfg,
            out,
            device=device,
            env=env,
            flops_per_token=flops_per_token,
            eval_fn=eval_fn,
            name=name,
        )
        if env.is_main and classes is not None and train_data.truncated:
            print(
                f"[distillery] {train_data.truncated} of {train_data.num_blocks} training texts "
                f"are longer than data.seq_len={cfg.data.seq_len} tokens: each is cut to its "
                "first tokens",
                flush=True,
            )
        if env.is_main:  # written once everything above has been checked
            atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
        progress = engine.fit(resume=resume, stop_after=stop_after)
        summary: dict[str, Any] = {"step": progress.step, "finished": False}
        if progress.step == train_cfg.steps and env.is_main:
            export_model(model, tokenizer, out / "model")
            # One full evaluation (fp32, whole validation split), logged and summarised.
            if isinstance(teacher, CachedTeacher) and isinstance(live_teacher, LiveTeacher):
                live_teacher.model.to(device)
            metrics = evaluate_model(
                model, val_data, device=device, teacher=live_teacher, vocab=cut
            )
            if loss.interchange_terms and isinstance(live_teacher, LiveTeacher):
                term = loss.interchange_terms[0]
                assert term.interchange is not None
                metrics |= interchange_agreement(
                    model,
                    live_teacher.model,
                    val_data,
                    term.pairs,
                    device=device,
                    positions=term.interchange["positions"],
                    fraction=term.interchange["fraction"],
                    vocab=cut,
                )
            engine.log({"step": progress.step, **metrics, "final": True})
            summary = {
                "name": name,
                "params": num_params(model),
                "compute_params": compute_params(model),
                "layers": model.config.num_hidden_layers,
                **metrics,
                "steps": progress.step,
                "flops": progress.flops,
                **(
                    {"teacher_cache_flops": teacher.meta["teacher_flops"]}
                    if isinstance(teacher, CachedTeacher)
                    else {}
                ),
                "tokens": progress.tokens,
                "train_seconds": progress.seconds,
                "tokens_per_s": progress.tokens / max(progress.seconds, 1e-9),
                "size_on_disk": folder_size(out / "model"),
                **(
                    {"classes": classes, "truncated_train_texts": train_data.truncated}
                    if classes is not None
                    else {
                        "generation_tokens_per_s": generation_speed(model, tokenizer, device=device)
                    }
                    if task == "lm"
                    else {}
                ),
                "device": str(device),
                "world_size": env.world_size,
                "finished": True,
            }
            write_json(out / "summary.json", summary)
        ok = True
        return summary
    finally:
        shutdown_distributed(clean=ok)
