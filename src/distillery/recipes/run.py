"""``distillery train`` and ``distillery distill``: one recipe, with or without a teacher.

Protocol: config → output folder → teacher folders → data → student → teacher signal and step →
engine → export → one full evaluation → summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from distillery.config import RunConfig, config_to_yaml
from distillery.data import PackedTokens, global_batch_indices
from distillery.distributed import DistEnv, init_distributed, resolve_device, shutdown_distributed
from distillery.engine import Engine, seed_everything, steps_for_budget
from distillery.engine.moments import carry_run_moments, moments_file, save_moments
from distillery.errors import Diverged
from distillery.eval import evaluate_model, folder_size, generation_speed, interchange_agreement
from distillery.eval.drafts import draft_metrics
from distillery.files import atomic_write_text, write_json
from distillery.models import (
    build_model,
    check_classes,
    check_fits_data,
    compute_params,
    every_other,
    init_from_teacher,
    load_pretrained,
    num_params,
    uses_encoder_layout,
)
from distillery.models.dropout import add_residual_dropout
from distillery.models.generation import Sampling
from distillery.models.growth import grow_layers, stack_layers
from distillery.models.heads import check_plain_head
from distillery.recipes.common import (
    DIVERGED,
    check_inputs_outside,
    clear_out_dir,
    export_model,
    once_per_job,
    prepare_data,
    prepare_out_dir,
    say_truncated,
)
from distillery.recipes.generate import prepare_prompts, stop_ids
from distillery.report import write_run_report
from distillery.report.card import write_model_card
from distillery.step import DistillStep, OnPolicyStep, chunk_options, terms_from_config
from distillery.teachers import LiveTeacher, TeacherSignal
from distillery.teachers.cache import CachedTeacher
from distillery.teachers.cross_tokenizer import check_own_tokenizer, own_tokenizer
from distillery.teachers.factory import build_teacher
from distillery.teachers.vocab_map import check_tokenizers, copy_vocab_map, trimmed_student


def _student(
    cfg: RunConfig, tokenizer: Any, teachers: list[PreTrainedModel], classes: list[str] | None
) -> PreTrainedModel:
    """The model to train (seeded), checked against the data and the teachers: from its folder
    (a language model given ``classes`` becomes a classifier with a new head), else a fresh
    preset with the teacher's output rows; then initialised from the teacher, grown, given
    residual dropout, as the config says."""
    seed_everything(cfg.train.seed)
    if cfg.model.path is not None:
        model = load_pretrained(cfg.model.path, "student", _model_task(cfg), classes=classes)
    else:
        head = teachers[0].get_output_embeddings() if teachers else None
        model = build_model(
            cfg.model.preset or "",
            head.weight.shape[0] if head is not None else len(tokenizer),
            cfg.model.overrides,
            num_labels=len(classes) if classes is not None else None,
            task=_model_task(cfg),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    for role, m in [("model", model)] + [("teacher", t) for t in teachers]:
        # Embedding tables padded to different sizes are reconciled by cutting both sides'
        # logits to the tokenizer's real tokens.
        check_fits_data(m, tokenizer, cfg.data.seq_len, role)
        if classes is not None:
            check_classes(m, classes, role)
    if classes is not None:
        model.config.id2label = dict(enumerate(classes))  # saved with the model
        model.config.label2id = {c: i for i, c in enumerate(classes)}
    init = cfg.model.init_from_teacher
    if init is not None and teachers:
        depth = teachers[0].config.num_hidden_layers
        layers = every_other(depth, model.config.num_hidden_layers)
        init_from_teacher(model, teachers[0], layers if init == "every_other" else list(init))
    if cfg.model.grow is not None:
        grow = cfg.model.grow
        if grow.kind == "stack":
            stack_layers(model)
        else:
            grow_layers(model, grow.layers or 0, where=grow.kind, identity=grow.identity)
    add_residual_dropout(model, cfg.model.dropout)
    return model


def _summary(
    cfg: RunConfig, name: str, model: Any, metrics: dict[str, Any], engine: Engine, data: Any, **kw
) -> dict[str, Any]:
    """What a finished run reports (``summary.json``)."""
    progress, classes = engine.progress, getattr(data, "classes", None)
    teacher = engine.step.teacher  # type: ignore[attr-defined]
    return {
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
        "size_on_disk": folder_size(Path(cfg.out) / "model"),
        **({"classes": classes, "truncated_train_texts": data.truncated} if classes else {}),
        **kw,
        "finished": True,
    }


def _final_metrics(
    model: Any,
    step: DistillStep,
    live: TeacherSignal | None,
    val: Any,
    device: Any,
    vocab: int,
    drafts: int = 0,
) -> dict[str, Any]:
    """One full evaluation (fp32, whole validation split) against the real teacher, and
    interchange agreement for IIT runs; the student as the teacher's draft on ``drafts``
    validation prompts (acceptance lengths)."""
    if isinstance(step.teacher, CachedTeacher) and isinstance(live, LiveTeacher):
        live.model.to(device)
    metrics = evaluate_model(model, val, device=device, teacher=live, vocab=vocab)
    if drafts and isinstance(live, LiveTeacher) and type(val) is PackedTokens:  # causal LM
        metrics |= draft_metrics(model, live.model, val, vocab=vocab, device=device, prompts=drafts)
    iit = [t for t in step.terms if t.reads == "interchange"]
    if iit and isinstance(live, LiveTeacher):
        spec = iit[0].interchange
        assert spec is not None
        metrics |= interchange_agreement(
            model,
            live.model,
            val,
            iit[0].pairs,
            device=device,
            positions=spec["positions"],
            fraction=spec["fraction"],
            vocab=vocab,
        )
    return metrics


@dataclass
class _Parts:
    """What a run is assembled from, once every input has been checked."""

    tokenizer: Any
    train: Any
    val: Any
    model: PreTrainedModel
    step: DistillStep | OnPolicyStep
    live: TeacherSignal | None  # the real teacher, for the final evaluation
    vocab: int  # logits are cut to this many outputs (tokens, or classes)


def _assemble(cfg: RunConfig, env: DistEnv, device: Any) -> _Parts:
    """Teacher folders → data → student → teacher signal → the distillation step."""
    check_own_tokenizer(cfg)
    own = own_tokenizer(cfg)  # the teacher keeps its tokenizer; the data is cut with the student's
    trimmed = trimmed_student(cfg)  # a part of the teacher's vocabulary: so is the data's
    teachers = [load_pretrained(p, "teacher", _model_task(cfg)) for p in cfg.teacher_paths]
    tokenizer_dir = cfg.teacher_paths[0] if teachers and not (own or trimmed) else cfg.model.path
    if cfg.data.task == "prompts":
        tokenizer, train, val = prepare_prompts(cfg.data, env, tokenizer_dir)
    else:
        tokenizer, train, val = prepare_data(
            cfg.data,
            env,
            tokenizer_dir,
            encoder=uses_encoder_layout(teachers, cfg.model),
            seed=cfg.train.seed,
        )
    check_tokenizers(cfg, tokenizer, trimmed)
    classes = getattr(train, "classes", None)
    vocab = len(classes) if classes is not None else len(tokenizer)
    model = _student(cfg, tokenizer, [] if own else teachers, classes)
    teacher = live = None
    if cfg.teacher is not None:
        teacher, live = build_teacher(
            cfg.teacher,
            teachers,
            device=device,
            vocab=trimmed.teacher_vocab_size if trimmed else vocab,
            tokenizer=tokenizer,
            train_data=train,
            objectives=cfg.objectives,
            shard=cfg.train.parallel == "fsdp",  # read sharded while training (torchrun)
        )
        if trimmed is not None:  # the teacher reads and answers in the student's token ids
            teacher, live = trimmed.wrap(teacher), trimmed.wrap(live)
    if cfg.train.logit_chunk_size:
        check_plain_head(model, "model")
    seed_everything(cfg.train.seed)  # the objectives' projections start the same each run
    step = DistillStep(
        terms_from_config(cfg.objectives),
        teacher,
        student=model,
        vocab=vocab,
        **chunk_options(cfg.train, vocab),
        states_on="labels" if cfg.data.task in ("lm", "prompts") else "tokens",
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.on_policy is not None:
        spec = cfg.on_policy
        step = OnPolicyStep(  # type: ignore[assignment]
            step,
            model,
            Sampling(spec.temperature, spec.top_p, spec.max_new_tokens),
            spec.fraction,
            seed=cfg.train.seed,
            batch_size=cfg.train.batch_size,
            pad_token_id=tokenizer.pad_token_id,
            stop_ids=stop_ids(model, tokenizer),
            env=env,
        )
    return _Parts(tokenizer, train, val, model, step, live, vocab)


def _model_task(cfg: RunConfig) -> Any:
    """The kind of model the data asks for (prompt rows are read by a causal LM)."""
    return "lm" if cfg.data.task == "prompts" else cfg.data.task


def _generation_flops(cfg: RunConfig, parts: _Parts, indices: Any) -> float:
    """What sampling completions for the training rows ``indices`` costs (on-policy runs)."""
    assert isinstance(parts.step, OnPolicyStep)
    lengths = parts.train.prompt_lengths[indices].tolist()
    return parts.step.generation_flops(lengths, compute_params(parts.model), cfg.data.seq_len)


def _on_policy_hook(cfg: RunConfig, parts: _Parts, engine: Engine) -> Callable[[int], None]:
    """Before each step of an on-policy run: decide the batch (``OnPolicyStep.start_step``)
    and charge its sampling to the FLOPs meter (the prompts' forwards and every row's budget
    of new tokens, 2·N each; the teacher scoring the rows is in the step's per-token cost)."""
    step, base = parts.step, engine.flops_per_token
    assert isinstance(step, OnPolicyStep)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len

    def hook(index: int) -> None:
        step.start_step(index)
        extra = 0.0
        if step.on_policy:
            rows = global_batch_indices(
                parts.train.num_blocks,
                cfg.train.data_offset + index,
                cfg.train.batch_size,
                cfg.train.seed,
            )
            extra = _generation_flops(cfg, parts, rows)
        engine.flops_per_token = base + extra / tokens_per_step

    return hook


def _engine(cfg: RunConfig, parts: _Parts, env: DistEnv, device: Any, name: str) -> Engine:
    """The engine for these parts; a FLOPs budget becomes the steps it pays for."""
    flops_per_token = parts.step.flops_per_token(compute_params(parts.model))
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    per_step = flops_per_token * tokens_per_step
    if cfg.on_policy is not None:  # a budget pays for the expected sampling, λ of the batches
        mean_row = _generation_flops(cfg, parts, slice(None)) / parts.train.num_blocks
        per_step += cfg.on_policy.fraction * mean_row * cfg.train.batch_size
    return Engine(
        parts.model,
        parts.step,
        parts.train,
        steps_for_budget(cfg.train, per_step),
        Path(cfg.out),
        device=device,
        env=env,
        flops_per_token=flops_per_token,
        eval_fn=lambda m: evaluate_model(
            m, parts.val, device=device, max_batches=cfg.train.eval_batches, vocab=parts.vocab
        ),
        name=name,
    )


def _finish(
    cfg: RunConfig, parts: _Parts, engine: Engine, env: DistEnv, device: Any, name: str
) -> dict[str, Any]:
    """Export the student, evaluate it once in full, write ``summary.json``, the model's card
    (``model/README.md``) and ``report.html``."""
    out, model = Path(cfg.out), parts.model
    export_model(model, parts.tokenizer, out / "model")
    if cfg.train.save_moments:
        save_moments(engine.optimizer, model, out)
    copy_vocab_map(cfg.model.path, out / "model")  # a trimmed student's map goes with it
    metrics = _final_metrics(
        model, parts.step, parts.live, parts.val, device, parts.vocab, cfg.train.draft_prompts
    )
    engine.log({"step": engine.progress.step, **metrics, "final": True})
    speed = {}
    if cfg.data.task in ("lm", "prompts") and (new := cfg.train.generation_tokens):
        speed["generation_tokens_per_s"] = generation_speed(
            model, parts.tokenizer, device=device, new_tokens=new
        )
    summary = _summary(
        cfg, name, model, metrics, engine, parts.train, **speed,
        device=str(device), world_size=env.world_size,
    )  # fmt: skip
    write_json(out / "summary.json", summary)
    write_model_card(out / "model", config=cfg, summary=summary)
    write_run_report(out, config=cfg, summary=summary)
    return summary


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
            lambda: prepare_out_dir(out, resume=resume, overwrite=overwrite, clear=False),
            everyone=False,
        )
        if not resume:
            check_inputs_outside(
                out, [*cfg.teacher_paths, cfg.model.path, _cache_of(cfg), cfg.train.moments_from]
            )
            if cfg.train.moments_from is not None:
                moments_file(cfg.train.moments_from)
        parts = _assemble(cfg, env, device)
        if not resume:  # every input is checked: only now does an earlier run make way
            once_per_job(env, lambda: clear_out_dir(out), everyone=False)
        engine = _engine(cfg, parts, env, device, name)
        if cfg.train.moments_from is not None and not resume:  # a resume has its own state
            carry_run_moments(cfg, engine.optimizer, engine.model)
        say_truncated(env, parts.train, cfg.data.seq_len)
        written: list[bool] = []
        policy = _on_policy_hook(cfg, parts, engine) if cfg.on_policy is not None else None

        def before_step(step: int) -> None:
            """Write the config once everything is checked — a resume included (a refused one
            must not record its settings) — before the first step trains; on-policy runs then
            decide the batch."""
            if not written:
                if env.is_main:
                    atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
                    (out / DIVERGED).unlink(missing_ok=True)  # a resume's new settings
                written.append(True)
            if policy is not None:
                policy(step)

        try:
            progress = engine.fit(resume=resume, stop_after=stop_after, before_step=before_step)
        except Diverged as err:  # recorded before the ranks part: a resumed study skips it
            if env.is_main:
                atomic_write_text(out / DIVERGED, f"{err}\n")
            raise
        summary: dict[str, Any] = {"step": progress.step, "finished": False}
        if progress.step == engine.cfg.steps and env.is_main:
            summary = _finish(cfg, parts, engine, env, device, name)
        ok = True
        return summary
    finally:
        shutdown_distributed(clean=ok)


def _cache_of(cfg: RunConfig) -> Path | None:
    return getattr(cfg.teacher, "cache", None)
