"""``distillery prune``: a student cut out of a teacher, ready to distil (Minitron's recipe).

Protocol: config → teacher folder → calibration blocks (the teacher's tokenizer, its
special-token convention) → importance with hooks (``models.pruning_rank``) → cut to the
target shape (``models.pruning``) → an HF folder with the teacher's tokenizer → summary.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from distillery.config.loader import Strict
from distillery.data import (
    PackedTokens,
    build_token_cache,
    load_documents,
    load_tokenizer,
    sequential_batches,
)
from distillery.errors import DistilleryError
from distillery.files import write_json
from distillery.models import check_fits_data, compute_params, load_pretrained, num_params
from distillery.models.pruning import Shape, prune_model
from distillery.models.pruning_rank import measure_importance
from distillery.recipes.common import check_inputs_outside, export_model, prepare_out_dir


class PruneTarget(Strict):
    """The student's shape; a field left out keeps the teacher's."""

    layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> PruneTarget:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError(
                "give at least one of layers, hidden_size, num_attention_heads, intermediate_size"
            )
        return self


class CalibrationData(Strict):
    """Calibration text: any source ``load_documents`` reads; its first blocks are used."""

    source: str = "bbc-news"
    text_field: str = "text"
    seq_len: int = Field(128, gt=1, le=1 << 16)
    batch_size: int = Field(8, gt=0, le=1 << 12)
    batches: int = Field(8, gt=0, le=1 << 16)
    cache_dir: Path = Path(".distillery-cache")


class PruneConfig(Strict):
    teacher: Path
    out: Path
    target: PruneTarget
    data: CalibrationData = Field(default_factory=CalibrationData)


def _calibration(cfg: CalibrationData, tokenizer: Any) -> list[torch.Tensor]:
    docs = load_documents(cfg.source, cfg.text_field)
    folder = build_token_cache({"calibration": docs}, tokenizer, cfg.cache_dir)
    blocks = PackedTokens(folder, "calibration", cfg.seq_len)
    return list(sequential_batches(blocks, cfg.batch_size, max_batches=cfg.batches))


def prune(cfg: PruneConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Cut ``cfg.teacher`` to ``cfg.target``; write ``out/model`` and ``out/summary.json``."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False, clear=False)
    check_inputs_outside(out, [cfg.teacher])
    teacher = load_pretrained(cfg.teacher, "teacher", "lm")
    tokenizer = load_tokenizer(cfg.teacher)
    check_fits_data(teacher, tokenizer, cfg.data.seq_len, "teacher")
    try:
        batches = _calibration(cfg.data, tokenizer)
    except OSError as exc:
        raise DistilleryError(
            f"cannot write the token cache under data.cache_dir={cfg.data.cache_dir} "
            f"({exc.strerror or exc}); give a writable folder"
        ) from None
    start = time.perf_counter()
    importance = measure_importance(teacher, batches)
    shape = Shape(**cfg.target.model_dump())
    student, plan = prune_model(teacher, importance, shape)
    seconds = time.perf_counter() - start
    export_model(student, tokenizer, out / "model")
    summary = {
        "teacher": str(cfg.teacher),
        "target": cfg.target.model_dump(),
        "params": num_params(student),
        "compute_params": compute_params(student),
        "teacher_params": num_params(teacher),
        "teacher_compute_params": compute_params(teacher),
        "kept_layers": plan.layers,
        "kept_heads": plan.heads,
        "calibration_tokens": importance.tokens,
        # one forward of the teacher over the calibration tokens, counted as 2·N per token
        "calibration_flops": 2.0 * compute_params(teacher) * importance.tokens,
        "importance": importance.to_json(),
        "seconds": seconds,
        "finished": True,
    }
    write_json(out / "summary.json", summary)
    return summary
