"""Load any HF causal LM, masked LM or sequence classifier from a local folder, or build one
from a preset; count parameters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

from distillery.data import tokenizer_fingerprint
from distillery.errors import DistilleryError
from distillery.models.dropout import restore_residual_dropout
from distillery.models.presets import is_encoder, preset_config

Task = Literal["lm", "mlm", "classify"]
_AUTO = {
    "lm": (AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal language model"),
    "mlm": (AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING_NAMES, "masked language model"),
    "classify": (
        AutoModelForSequenceClassification,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "sequence classifier",
    ),
}


def is_bidirectional(config: Any) -> bool:
    """Whether a model family attends both ways (an encoder such as BERT): its padding must be
    masked out explicitly."""
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )


def folder_is_encoder(folder: Path | None) -> bool:
    """Whether the HF model in ``folder`` is a bidirectional encoder (False if unreadable)."""
    try:
        config = AutoConfig.from_pretrained(
            Path(folder or ""), local_files_only=True, trust_remote_code=False
        )
    except Exception:  # load_pretrained gives the clear error
        return False
    return is_bidirectional(config)


def spec_is_encoder(spec: Any) -> bool:
    """Whether a model spec (``config.ModelSpec``: a folder or a preset) is an encoder."""
    return folder_is_encoder(spec.path) if spec.path else is_encoder(spec.preset or "")


def uses_encoder_layout(teachers: Sequence[PreTrainedModel], spec: Any) -> bool:
    """Whether a run reads texts as an encoder does (cls + tokens + sep): any teacher is
    bidirectional, or the student ``spec`` is an encoder."""
    return any(is_bidirectional(m.config) for m in teachers) or spec_is_encoder(spec)


def mask_padding(model: PreTrainedModel) -> None:
    """Encoders: calls without an ``attention_mask`` get one from ``input_ids != pad`` (a forward
    pre-hook), so every caller — training, teachers, evaluation — ignores padding. Decoders
    need none: right padding never reaches the positions they read."""
    pad = model.config.pad_token_id
    if pad is None or not is_bidirectional(model.config) or getattr(model, "_pad_hook", None):
        return

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and kwargs.get("attention_mask") is None and (ids == pad).any():
            kwargs["attention_mask"] = (ids != pad).long()
        return args, kwargs

    model._pad_hook = model.register_forward_pre_hook(hook, with_kwargs=True)  # type: ignore[assignment]


def load_pretrained(
    folder: Path,
    role: str = "model",
    task: Task = "lm",
    *,
    classes: list[str] | None = None,
) -> PreTrainedModel:
    """A causal LM (``task="lm"``), a masked LM (``"mlm"``) or a sequence classifier from a
    local folder (fp32), with one clear error on any problem; residual dropout it was trained
    with is hooked back on. With ``classes``, a folder holding a language model (not yet a
    classifier) becomes a classifier over them: its body is loaded and a new head initialised
    (seed the RNG first) — fine-tuning a pretrained model."""
    auto, mapping, what = _AUTO[task]
    folder = Path(folder)
    if not folder.is_dir():
        raise DistilleryError(f"{role} folder {folder} not found")
    if not (folder / "config.json").is_file():
        raise DistilleryError(f"{role} folder {folder} has no config.json: not an HF model folder")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds here (custom code included)
        if "trust_remote_code" in str(exc):
            raise DistilleryError(
                f"{role} folder {folder}: its config.json asks to run the folder's own Python "
                "code, which distillery never does; give a model of a transformers architecture"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilleryError(f"{role} folder {folder}: unreadable config.json ({first})") from None
    if config.model_type not in mapping:
        raise DistilleryError(
            f"{role} folder {folder} holds a {config.model_type!r} model, which is not a {what} "
            f"({auto.__name__} cannot load it)"
        )
    architectures = config.architectures or []
    _check_kind(folder, role, task, config, architectures)
    extra: dict[str, Any] = {}
    head_only = not any(a.endswith("ForSequenceClassification") for a in architectures)
    if task == "classify" and head_only and classes is None and architectures:
        raise DistilleryError(
            f"{role} folder {folder} holds a {architectures[0]}, not a classifier: fine-tune it "
            f"first (distillery train --model {folder} --out DIR data.task=classify)"
        )
    if task == "classify" and classes is not None and head_only:
        extra = dict(
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a new head's "missing keys" report is expected here
    try:
        model, info = auto.from_pretrained(
            folder,
            local_files_only=True,
            trust_remote_code=False,
            dtype=torch.float32,
            output_loading_info=True,
            **extra,
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilleryError(
            f"{role} folder {folder}: cannot load the weights ({first})"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_weights(folder, role, info, new_head=bool(extra))
    restore_residual_dropout(model)
    mask_padding(model)
    return model


def _check_kind(folder: Path, role: str, task: Task, config: Any, architectures: list[str]) -> None:
    """Refuse a folder of another kind than ``task`` needs: a masked LM (BERT's config maps to a
    causal-LM class too) or a classifier where a causal LM is needed."""
    if task != "lm":
        return
    if is_bidirectional(config):
        raise DistilleryError(
            f"{role} folder {folder} holds a bidirectional {config.model_type!r} encoder, not a "
            "causal language model: use data.task=mlm or classify"
        )
    heads = [a for a in architectures if a.endswith(("ForSequenceClassification", "ForMaskedLM"))]
    if architectures and len(heads) == len(architectures):
        raise DistilleryError(
            f"{role} folder {folder} holds a {heads[0]}, not a causal language model "
            "(data.task=classify reads classifiers)"
        )


def _check_weights(folder: Path, role: str, info: dict[str, Any], *, new_head: bool) -> None:
    """Every weight the model has must come from the folder (a new classifier head aside), and
    every weight in the folder must be used: otherwise the run would train random layers."""
    missing = list(info.get("missing_keys") or [])
    if new_head:  # a language model becoming a classifier: its head (and pooler) are new
        new = ("score", "classifier", "pooler")
        missing = [k for k in missing if not any(p in new for p in k.split("."))]
    unexpected = list(info.get("unexpected_keys") or [])
    if new_head:  # ... and the language-model head it had is dropped
        unexpected = [k for k in unexpected if k.split(".")[0] not in ("cls", "lm_head")]
    mismatched = [
        str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []
    ]
    for what, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mismatched", mismatched),
    ):
        if keys:
            shown = ", ".join(sorted(keys)[:3]) + (
                f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            )
            raise DistilleryError(
                f"{role} folder {folder}: {len(keys)} {what} weight(s) ({shown}); the folder is "
                "incomplete or from another model"
            )


def build_model(
    preset: str,
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
    *,
    num_labels: int | None = None,
    task: Task = "lm",
    **special: int | None,
) -> PreTrainedModel:
    """A freshly initialised model from a preset (seed the RNG before calling): a causal LM
    (decoders), a masked LM (``bert-*`` encoders), or — given ``num_labels`` — a sequence
    classifier over that many classes."""
    if num_labels is not None:
        task = "classify"
    encoder = is_encoder(preset)
    if (task == "mlm" and not encoder) or (task == "lm" and encoder):
        want = "a bert-* preset" if task == "mlm" else "a decoder preset (tiny, mini, ...)"
        raise DistilleryError(
            f"preset {preset!r} cannot be a {_AUTO[task][2]}: use {want}, or data.task: "
            f"{'lm' if task == 'mlm' else 'mlm'}"
        )
    config = preset_config(preset, vocab_size, overrides, **special)
    try:
        if num_labels is not None:
            config.num_labels = num_labels
        model = _AUTO[task][0].from_config(config, dtype=torch.float32)
    except Exception as exc:  # any failure to build from a user's overrides
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilleryError(f"model.overrides: cannot build the model ({first})") from None
    mask_padding(model)
    return model


def num_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def compute_params(model: PreTrainedModel) -> int:
    """N for FLOPs (6·N per trained token, 2·N per forward token): parameters that do matmuls.

    The input embedding table is a lookup and is excluded; the output projection is a real
    matmul and is counted even when its weight is tied to the input embedding.
    """
    n = num_params(model)
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if inp is not None:
        n -= inp.weight.numel()
        if out is not None and out.weight is inp.weight:
            n += out.weight.numel()
    return n


def check_same_tokenizer(teacher_tok: Any, student_tok: Any) -> None:
    """Refuse, with one line, teacher/student tokenizers that could map text to different ids."""
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
        diff = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise DistilleryError(
            f"teacher and student tokenizers disagree ({len(t_vocab)} vs {len(s_vocab)} tokens, "
            f"{diff} differing vocabulary entries, or different merges/special tokens); "
            "use the teacher's tokenizer for the student"
        )


def check_fits_data(model: PreTrainedModel, tokenizer: Any, seq_len: int, role: str) -> None:
    """The model must embed every token id of the tokenizer and accept ``seq_len`` positions."""
    head = model.get_output_embeddings()
    rows = min(
        model.get_input_embeddings().weight.shape[0],
        head.weight.shape[0] if head is not None else len(tokenizer),
    )
    if rows < len(tokenizer):
        raise DistilleryError(
            f"the {role}'s embedding has {rows} rows but its tokenizer has {len(tokenizer)} tokens"
        )
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if limit is not None and seq_len > limit:
        raise DistilleryError(
            f"data.seq_len={seq_len} exceeds the {role}'s {limit} positions; lower data.seq_len"
        )


def check_classes(model: PreTrainedModel, classes: list[str], role: str) -> None:
    """A classifier must predict the data's classes: as many, and (when it names them, in its
    config's ``id2label``) the same names in the same order."""
    n = model.config.num_labels
    if n != len(classes):
        raise DistilleryError(
            f"the {role} classifies into {n} classes but the data has {len(classes)} "
            f"({', '.join(classes)}); use a {role} made for these labels"
        )
    names = [str(model.config.id2label.get(i, "")) for i in range(n)]
    if names != [f"LABEL_{i}" for i in range(n)] and names != list(classes):
        raise DistilleryError(
            f"the {role}'s classes are {names} but the data's are {list(classes)}: use a {role} "
            "trained on these labels"
        )


def use_eager_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` to the eager attention kernel, the one that can return its maps."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
