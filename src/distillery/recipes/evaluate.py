"""``distillery eval``: quality, calibration, agreement with a teacher, size and speed of a model
folder (a causal LM, or a classifier with ``data.task=classify``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.config import DataConfig, build_config
from distillery.data import has_tokenizer, load_tokenizer
from distillery.distributed import DistEnv, resolve_device
from distillery.errors import DistilleryError
from distillery.eval import evaluate_model, folder_size, generation_speed
from distillery.eval.drafts import draft_metrics
from distillery.files import write_json
from distillery.models import (
    check_classes,
    check_fits_data,
    check_same_tokenizer,
    compute_params,
    load_pretrained,
    num_params,
)
from distillery.models.loading import is_bidirectional
from distillery.recipes.common import prepare_data
from distillery.teachers import LiveTeacher


def evaluate_folder(
    model_dir: Path,
    *,
    teacher: Path | None = None,
    data: str = "bbc-news",
    overrides: list[str] | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Metrics of the model in ``model_dir`` on ``data``'s validation split (its own tokenizer)."""
    data_overrides = [o.removeprefix("data.") for o in overrides or []]
    data_cfg = build_config(DataConfig, None, data_overrides, base={"source": data})
    if out is not None and out.is_dir():
        raise DistilleryError(f"--out {out} must be a JSON file path, not a folder")
    device = resolve_device("auto")
    task = data_cfg.task
    model = load_pretrained(model_dir, "model", task).to(device)
    tokenizer, _, val = prepare_data(
        data_cfg, DistEnv(), tokenizer_dir=model_dir, encoder=is_bidirectional(model.config)
    )
    classes = getattr(val, "classes", None)
    cut = len(classes) if classes is not None else len(tokenizer)
    check_fits_data(model, tokenizer, data_cfg.seq_len, "model")
    if classes is not None:
        check_classes(model, classes, "model")
    signal = None
    if teacher is not None:
        if has_tokenizer(teacher):
            check_same_tokenizer(load_tokenizer(teacher), tokenizer)
        teacher_model = load_pretrained(teacher, "teacher", task)
        check_fits_data(teacher_model, tokenizer, data_cfg.seq_len, "teacher")
        if classes is not None:
            check_classes(teacher_model, classes, "teacher")
        signal = LiveTeacher(teacher_model.to(device))
    result: dict[str, Any] = {
        "model": str(model_dir),
        "params": num_params(model),
        "compute_params": compute_params(model),
        **evaluate_model(model, val, device=device, teacher=signal, vocab=cut),
        "size_on_disk": folder_size(model_dir),
        **(
            {"generation_tokens_per_s": generation_speed(model, tokenizer, device=device)}
            if task == "lm"
            else {"classes": classes}
            if classes is not None
            else {}
        ),
        "device": str(device),
    }
    if signal is not None and task == "lm" and not is_bidirectional(model.config):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        result |= draft_metrics(
            model, signal.model, val, vocab=cut, device=device, assisted=True, pad_token_id=pad
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
    return result
