"""Held-out metrics of a causal LM or a classifier (or any teacher signal), alone or against a
teacher, calibration included; size and generation speed."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillery.data import IGNORE_INDEX, Examples, LabelledExamples
from distillery.eval.calibration import CalibrationStats
from distillery.models.heads import chunk_rows, chunks, cut_vocab, has_plain_head, hidden_and_head
from distillery.objectives.logits import forward_kl
from distillery.teachers import TeacherSignal

Predictor = nn.Module | TeacherSignal  # a model, or any teacher signal (ensemble, MC dropout, …)


def _signal_chunks(
    signal: TeacherSignal, ids: torch.Tensor, vocab: int | None
) -> Iterator[tuple[slice, torch.Tensor]]:
    out = signal.run(ids, logits=False)
    assert out.chunk_logits is not None
    for part in chunks(ids.numel(), chunk_rows(vocab or 1)):
        yield part, cut_vocab(out.chunk_logits(part, None), vocab).float()


def _logits_by_chunk(
    model: Predictor, ids: torch.Tensor, teacher: TeacherSignal | None, vocab: int | None
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
    """(positions, predictor logits, teacher logits) a chunk of flattened positions at a time,
    float32, cut to ``vocab`` — never a whole batch of full-vocabulary logits when the output
    projections are plain linear layers (else one chunk: the model's own logits)."""
    n = ids.numel()
    t_chunks = teacher.run(ids, logits=False).chunk_logits if teacher is not None else None

    def teacher_part(part: slice, logits: torch.Tensor) -> torch.Tensor | None:
        return None if t_chunks is None else cut_vocab(t_chunks(part, logits), vocab).float()

    if not isinstance(model, nn.Module):  # a teacher signal evaluated as a predictor
        for part, logits in _signal_chunks(model, ids, vocab):
            yield part, logits, teacher_part(part, logits)
        return
    if not has_plain_head(model):
        logits = cut_vocab(model(input_ids=ids).logits, vocab).float().reshape(n, -1)
        yield slice(0, n), logits, teacher_part(slice(0, n), logits)
        return
    _, hidden = hidden_and_head(model, ids)  # (N, H)
    head = model.get_output_embeddings()
    for part in chunks(n, chunk_rows(vocab or head.weight.shape[0])):
        logits = cut_vocab(head(hidden[part]), vocab).float()  # (C, V)
        yield part, logits, teacher_part(part, logits)


def predictions(
    model: Predictor,
    data: Examples,
    *,
    device: torch.device,
    batch_size: int = 16,
    max_batches: int | None = None,
    teacher: TeacherSignal | None = None,
    vocab: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(logits ``(N, V)``, labels ``(N,)``, teacher logits or None) over ``data`` in order, a
    chunk at a time, valid positions only: next tokens of token blocks, masked tokens of
    masked-LM blocks, or one class per labelled example (whose logits are ``(B, C)``)."""
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    try:
        if isinstance(data, LabelledExamples):
            for count, (ids, labels) in enumerate(data.batches(batch_size)):
                if max_batches is not None and count >= max_batches:
                    break
                ids = ids.to(device)
                if isinstance(model, nn.Module):
                    logits = model(input_ids=ids).logits.float()
                else:
                    logits = model.logits(ids).float()
                t_logits = teacher.logits(ids).float() if teacher is not None else None
                yield logits, labels.to(device), t_logits
            return
        # Token blocks: next tokens (causal LM) or the fixed masks of masked-LM data.
        for count, start in enumerate(range(0, data.num_blocks, batch_size)):
            if max_batches is not None and count >= max_batches:
                break
            rows = np.arange(start, min(start + batch_size, data.num_blocks))
            ids, all_labels = data.examples(rows)
            ids, all_labels = ids.to(device), all_labels.to(device).reshape(-1)  # (N,)
            for part, logits, t_logits in _logits_by_chunk(model, ids, teacher, vocab):
                labels = all_labels[part]
                mask = labels != IGNORE_INDEX
                yield logits[mask], labels[mask], None if t_logits is None else t_logits[mask]
    finally:
        if isinstance(model, nn.Module) and was_training is not None:
            model.train(was_training)


def prediction_groups(
    data: Examples, *, batch_size: int = 16, max_batches: int | None = None
) -> np.ndarray:
    """``(N,)``: the example (token block, or labelled example) each prediction that
    ``predictions`` yields over ``data`` comes from, in the same order — the units a bootstrap
    resamples, since the next tokens of one block are not independent."""
    if isinstance(data, LabelledExamples):
        n = data.num_blocks
        if max_batches is not None:
            n = min(n, max_batches * batch_size)
        return np.arange(n, dtype=np.int64)
    groups = []
    for count, start in enumerate(range(0, data.num_blocks, batch_size)):
        if max_batches is not None and count >= max_batches:
            break
        rows = np.arange(start, min(start + batch_size, data.num_blocks))
        _, labels = data.examples(rows)
        valid = (labels.reshape(len(rows), -1) != IGNORE_INDEX).numpy()  # (B, T)
        groups.append(np.repeat(rows, valid.sum(axis=1)))
    return np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)


def macro_f1(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class never predicted nor present counts 0)."""
    scores = []
    for c in range(n_classes):
        tp = float(((predicted == c) & (labels == c)).sum())
        fp = float(((predicted == c) & (labels != c)).sum())
        fn = float(((predicted != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / n_classes


@torch.no_grad()
def evaluate_model(
    model: Predictor,
    data: Examples,
    *,
    device: torch.device,
    batch_size: int = 16,
    max_batches: int | None = None,
    teacher: TeacherSignal | None = None,
    vocab: int | None = None,
    n_bins: int = 10,
    stats: CalibrationStats | None = None,
) -> dict[str, float]:
    """Held-out quality and calibration of ``model`` (or of any teacher signal) over ``data``.

    Mean loss (NLL), top-1 accuracy, ECE/MCE over ``n_bins`` equal-width bins, Brier score;
    for token blocks the perplexity, for labelled examples the macro-F1. With a teacher also:
    agreement (top-1 equal to the teacher's) and KL(teacher ‖ model) at temperature 1. Logits
    are cut to the first ``vocab`` columns (the tokenizer's real tokens; embedding tables may be
    padded) and made a chunk of positions at a time, so big vocabularies fit in memory. Pass
    ``stats`` to keep the per-prediction numbers (e.g. for reliability diagrams).
    """
    stats = stats if stats is not None else CalibrationStats()
    agree, kl, count = 0.0, 0.0, 0
    predicted, gold = [], []
    for logits, labels, t_logits in predictions(
        model,
        data,
        device=device,
        batch_size=batch_size,
        max_batches=max_batches,
        teacher=teacher,
        vocab=vocab,
    ):
        stats.add_logits(logits, labels)
        top1 = logits.argmax(-1)
        if isinstance(data, LabelledExamples):
            predicted.append(top1.cpu())
            gold.append(labels.cpu())
        if t_logits is not None:
            agree += float((top1 == t_logits.argmax(-1)).sum())
            mask = torch.ones_like(labels, dtype=torch.bool)
            kl += float(forward_kl(logits, t_logits, mask, temperature=1.0))
        count += labels.numel()
    cal = stats.metrics(n_bins)
    n = max(count, 1)
    out = {"val_loss": cal["nll"], "accuracy": cal["accuracy"]}
    if isinstance(data, LabelledExamples):
        out["macro_f1"] = macro_f1(torch.cat(predicted), torch.cat(gold), len(data.classes))
        out["eval_examples"] = float(count)
    else:
        out["val_ppl"] = math.exp(min(cal["nll"], 50.0))
        out["eval_tokens"] = float(count)
    out |= {"ece": cal["ece"], "mce": cal["mce"], "brier": cal["brier"]}
    if teacher is not None:
        out["agreement"] = agree / n
        out["kl_teacher_student"] = kl / n
    return out


TIMING_BATCHES, TIMING_REPEATS = 8, 3


@torch.inference_mode()
def inference_seconds(
    predictor: Predictor, data: Examples, device: torch.device, vocab: int | None = None
) -> float:
    """Fastest of ``TIMING_REPEATS`` passes over the first ``TIMING_BATCHES`` batches of
    ``data`` (logits only; a first pass warms up). Compare predictors timed in one process."""
    best = float("inf")
    for _ in range(TIMING_REPEATS + 1):
        start = time.perf_counter()
        for _ in predictions(
            predictor, data, device=device, max_batches=TIMING_BATCHES, vocab=vocab
        ):
            pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def generation_speed(
    model: nn.Module,
    tokenizer: Any,
    *,
    device: torch.device,
    prompt: str = "The government said",
    new_tokens: int = 64,
    repeats: int = 2,
) -> float:
    """Greedy generation throughput in new tokens per second (batch 1, KV cache on)."""
    was_training = model.training
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    model.generate(ids, **kwargs, max_length=None)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.generate(ids, **kwargs, max_length=None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.train(was_training)
    return repeats * new_tokens / (time.perf_counter() - start)


def folder_size(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
