"""``distillery prune``: a student cut out of a teacher, ready to distil (Minitron's recipe).

Protocol: config → teacher folder → calibration blocks (the teacher's tokenizer, its
special-token convention) → importance with hooks (``models.pruning_rank``) → cut to the
target shape (``models.pruning``) → optionally its vocabulary trimmed to the tokens a corpus
uses (``vocab``: ``models.vocab_trim``; the trimmed and untrimmed students timed side by side)
→ an HF folder with the teacher's tokenizer (trimmed, with ``vocab_map.json``) → summary.json.
"""

from __future__ import annotations

import shutil
import statistics
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
from distillery.eval import folder_size
from distillery.files import write_json
from distillery.models import check_fits_data, compute_params, load_pretrained, num_params
from distillery.models.pruning import Shape, prune_model
from distillery.models.pruning_rank import measure_importance
from distillery.models.vocab_trim import kept_tokens, save_vocab_map, trim_model, trim_tokenizer
from distillery.recipes.common import check_inputs_outside, export_model, prepare_out_dir


class PruneTarget(Strict):
    """The student's shape; a field left out keeps the teacher's (all left out: no cut, for a
    prune that only trims the vocabulary)."""

    layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)

    @property
    def empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())


class VocabTrim(Strict):
    """Keep the teacher's tokens that occur ``min_count`` times in a corpus (plus specials, the
    BPE alphabet and the merges' inputs), and the most frequent others up to a multiple of
    ``multiple_of`` tokens; ``source``/``text_field`` default to the calibration data's.
    ``repeats``: timed forwards of each student (trimmed and not), interleaved."""

    source: str | None = None
    text_field: str | None = None
    min_count: int = Field(1, ge=1, le=1 << 30)
    multiple_of: int = Field(64, ge=1, le=1 << 16)
    repeats: int = Field(5, gt=0, le=1000)


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
    target: PruneTarget = Field(default_factory=PruneTarget)
    data: CalibrationData = Field(default_factory=CalibrationData)
    vocab: VocabTrim | None = None  # None: the teacher's whole vocabulary

    @model_validator(mode="after")
    def _something(self) -> PruneConfig:
        if self.target.empty and self.vocab is None:
            raise ValueError(
                "give at least one of layers, hidden_size, num_attention_heads, intermediate_size "
                "(target), or a vocab block"
            )
        return self


def _calibration(cfg: CalibrationData, tokenizer: Any) -> list[torch.Tensor]:
    docs = load_documents(cfg.source, cfg.text_field)
    folder = build_token_cache({"calibration": docs}, tokenizer, cfg.cache_dir)
    blocks = PackedTokens(folder, "calibration", cfg.seq_len)
    return list(sequential_batches(blocks, cfg.batch_size, max_batches=cfg.batches))


def _calibration_or_fail(cfg: CalibrationData, tokenizer: Any) -> list[torch.Tensor]:
    try:
        return _calibration(cfg, tokenizer)
    except OSError as exc:
        raise DistilleryError(
            f"cannot write the token cache under data.cache_dir={cfg.cache_dir} "
            f"({exc.strerror or exc}); give a writable folder"
        ) from None


def _timing_batch(tokenizer: Any, docs: list[str], rows: int, cols: int) -> torch.Tensor:
    """``(rows, cols)`` token ids of the corpus's first text (repeated if it is shorter)."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False).input_ids
        if len(stream) >= rows * cols:
            break
    if not stream:
        raise DistilleryError("vocab.source has no text to keep tokens of: give another corpus")
    ids = torch.tensor(stream, dtype=torch.long)
    return ids.repeat(-(-rows * cols // len(ids)))[: rows * cols].reshape(rows, cols)


@torch.no_grad()
def _forward_seconds(models: list[Any], batches: list[torch.Tensor], repeats: int) -> list[float]:
    """The median seconds of one full forward (logits included) of each model on its batch,
    timed in turn (one warm-up each, then ``repeats`` rounds), so load changes hit all alike."""
    for model, batch in zip(models, batches, strict=True):
        model.eval()(input_ids=batch, use_cache=False)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, (model, batch) in enumerate(zip(models, batches, strict=True)):
            start = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _trim_vocab(cfg: PruneConfig, student: Any, tokenizer: Any) -> tuple[Any, Any, list[int], dict]:
    """(trimmed student, trimmed tokenizer, kept teacher ids, what the summary reports): the
    untrimmed and trimmed students timed side by side on the same text."""
    assert cfg.vocab is not None
    spec = cfg.vocab
    source = spec.source or cfg.data.source
    docs = load_documents(source, spec.text_field or cfg.data.text_field)
    start = time.perf_counter()
    kept = kept_tokens(tokenizer, docs, spec.min_count, multiple_of=spec.multiple_of)
    trimmed, trimmed_tok = trim_model(student, kept), trim_tokenizer(tokenizer, kept)
    seconds = time.perf_counter() - start
    batch = _timing_batch(trimmed_tok, docs, cfg.data.batch_size, cfg.data.seq_len)
    lookup = torch.tensor(kept, dtype=torch.long)
    before, after = _forward_seconds([student, trimmed], [lookup[batch], batch], spec.repeats)
    report = {
        "source": source,
        "min_count": spec.min_count,
        "multiple_of": spec.multiple_of,
        "teacher_tokenizer_size": len(tokenizer),
        "vocab_size_before": student.get_input_embeddings().weight.shape[0],
        "vocab_size_after": len(kept),
        "params_before": num_params(student),
        "params_after": num_params(trimmed),
        "compute_params_before": compute_params(student),
        "compute_params_after": compute_params(trimmed),
        "forward_seconds_before": before,
        "forward_seconds_after": after,
        # the same student untrimmed vs trimmed, same text and batch, interleaved; median
        "trim_speedup": before / max(after, 1e-12),
        "timing": {"batch": list(batch.shape), "repeats": spec.repeats,
                   "threads": torch.get_num_threads(), "device": "cpu"},
        "seconds": seconds,
    }  # fmt: skip
    return trimmed, trimmed_tok, kept, report


def _untrimmed_size(student: Any, tokenizer: Any, out: Path) -> int:
    """Bytes the student would take on disk untrimmed (written aside, measured, removed)."""
    probe = out / ".untrimmed-size"
    try:
        return folder_size(export_model(student, tokenizer, probe))
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def prune(cfg: PruneConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Cut ``cfg.teacher`` to ``cfg.target`` and trim its vocabulary to ``cfg.vocab`` (either
    may be left out); write ``out/model`` and ``out/summary.json``."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False, clear=False)
    check_inputs_outside(out, [cfg.teacher])
    teacher = load_pretrained(cfg.teacher, "teacher", "lm")
    tokenizer = load_tokenizer(cfg.teacher)
    check_fits_data(teacher, tokenizer, cfg.data.seq_len, "teacher")
    student, plan, importance = teacher, None, None
    start = time.perf_counter()
    if not cfg.target.empty:
        batches = _calibration_or_fail(cfg.data, tokenizer)
        start = time.perf_counter()
        importance = measure_importance(teacher, batches)
        student, plan = prune_model(teacher, importance, Shape(**cfg.target.model_dump()))
    seconds = time.perf_counter() - start
    trim: dict[str, Any] = {}
    if cfg.vocab is not None:
        untrimmed = student
        student, student_tok, kept, trim = _trim_vocab(cfg, untrimmed, tokenizer)
        trim["size_on_disk_before"] = _untrimmed_size(untrimmed, tokenizer, out)
        export_model(student, student_tok, out / "model")
        save_vocab_map(out / "model", kept, len(tokenizer))
        trim["size_on_disk_after"] = folder_size(out / "model")
    else:
        export_model(student, tokenizer, out / "model")
    tokens = importance.tokens if importance is not None else 0
    summary = {
        "teacher": str(cfg.teacher),
        "target": cfg.target.model_dump(),
        "params": num_params(student),
        "compute_params": compute_params(student),
        "teacher_params": num_params(teacher),
        "teacher_compute_params": compute_params(teacher),
        "kept_layers": plan.layers if plan is not None else None,
        "kept_heads": plan.heads if plan is not None else None,
        "calibration_tokens": tokens,
        # one forward of the teacher over the calibration tokens, counted as 2·N per token
        "calibration_flops": 2.0 * compute_params(teacher) * tokens,
        "importance": importance.to_json() if importance is not None else None,
        "seconds": seconds,
        **({"vocab_trim": trim} if trim else {}),
        "finished": True,
    }
    write_json(out / "summary.json", summary)
    return summary
