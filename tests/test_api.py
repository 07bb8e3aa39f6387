"""The drop-in loss (``distillery.api.Distiller``) and the ``transformers.Trainer`` that uses it:
the engine's contract in a user's loop, and in the HF Trainer with gradient accumulation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from distillery.api import Distiller, next_token_labels
from distillery.distributed import DistEnv
from distillery.engine import Engine, seed_everything
from distillery.errors import DistilleryError
from distillery.models import load_pretrained
from distillery.recipes.common import prepare_data
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from tests.conftest import tiny_llama, tiny_run

KD = [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}]
VOCAB = 97


def test_distiller_loss_is_the_engines_first_step_loss(corpus, cache_dir, teacher_dir, tmp_path):
    """The same student, teacher, objectives and batch: the Distiller's loss (and terms) equal
    what the engine logs for its first step."""
    cfg = tiny_run(corpus, cache_dir, tmp_path / "e", teacher=teacher_dir)
    tokenizer, train, _ = prepare_data(cfg.data, DistEnv(), teacher_dir)
    teacher = load_pretrained(teacher_dir)
    seed_everything(0)
    student = tiny_llama(teacher.get_output_embeddings().weight.shape[0], seed=3)
    mine = copy.deepcopy(student)
    objectives = [*KD, {"kind": "hidden_cosine", "layers": [[2, 4]]}]
    seed_everything(5)  # the same learned projection on both sides
    step = DistillStep(
        terms_from_config(objectives), LiveTeacher(teacher), student=student, vocab=len(tokenizer)
    )
    engine = Engine(
        student, step, train, cfg.train, tmp_path / "e", device=torch.device("cpu"),
        flops_per_token=1.0,
    )  # fmt: skip
    (ids, _), *_ = engine._step_batches(0)  # one micro-batch: the whole step
    logged = engine.train_step(0)
    seed_everything(5)
    distiller = Distiller(mine, teacher, objectives, vocab=len(tokenizer))
    out = distiller(ids)
    assert out.loss.item() == pytest.approx(logged["loss"], rel=1e-5)
    for name in ("ce", "forward_kl", "hidden_cosine"):
        assert out.terms[name].item() == pytest.approx(logged[name], rel=1e-5), name
    assert int(out.count) == ids.shape[0] * (ids.shape[1] - 1)


def test_labels_follow_the_hugging_face_convention():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = ids.clone()
    labels[0, 1] = -100  # a prompt token: no loss for predicting it
    got = next_token_labels(ids, labels, attn)
    assert got.tolist() == [[-100, 7, 8, -100], [2, 3, -100, -100]]
    assert next_token_labels(ids).tolist() == [[6, 7, 8, -100], [2, 3, 0, -100]]
    with pytest.raises(DistilleryError, match="left padding"):
        next_token_labels(ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))


def test_distiller_micro_batches_with_a_global_count_add_up_to_one_batch():
    """Uneven padding: Σ over micro-batches of loss(num_items = global count) has the value and
    gradient of the whole batch (a mean of per-batch means would not)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 12))
    attn = torch.ones_like(ids)
    attn[0, 3:], attn[1, 9:] = 0, 0
    student, teacher = tiny_llama(VOCAB, seed=1), tiny_llama(VOCAB, seed=2)
    distiller = Distiller(student, teacher, KD, chunk_size=5)
    whole = distiller(ids, attention_mask=attn)
    whole.loss.backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    n = whole.count
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        part = distiller(ids[rows], attention_mask=attn[rows], num_items=n)
        part.loss.backward()
        total += part.loss.item()
    assert total == pytest.approx(whole.loss.item(), rel=1e-5)
    for g, p in zip(expected, student.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    unchunked = Distiller(student, teacher, KD)(ids, attention_mask=attn)
    assert unchunked.loss.item() == pytest.approx(whole.loss.item(), rel=1e-5)


def test_distiller_errors_are_one_line():
    student = tiny_llama(VOCAB)
    with pytest.raises(DistilleryError, match="need a teacher"):
        Distiller(student, None, KD)
    with pytest.raises(DistilleryError, match="unknown objective"):
        Distiller(student, tiny_llama(VOCAB, seed=1), [{"kind": "telepathy"}])
    ce = Distiller(student)  # no teacher: the task loss
    assert set(ce(torch.randint(0, VOCAB, (2, 6))).terms) == {"ce"}


def _examples(n: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (5 * i) % 9  # uneven lengths: padding differs between micro-batches
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right padding; labels -100 on padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], attn[i, :n], labels[i, :n] = (
            torch.tensor(r["input_ids"]),
            1,
            torch.tensor(r["labels"]),
        )
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _trainer(out: Path, student, distiller, data, **args):
    from transformers import TrainingArguments

    from distillery.integrations.trainer import DistillationTrainer

    settings = dict(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=3e-3, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, seed=0, dataloader_drop_last=True,
        disable_tqdm=True,
    )  # fmt: skip
    settings.update(args)
    return DistillationTrainer(
        model=student,
        args=TrainingArguments(**settings),
        train_dataset=data,
        data_collator=_collate,
        distiller=distiller,
    )


def test_trainer_distils_and_logs_each_term(tmp_path):
    pytest.importorskip("accelerate")
    student, teacher = tiny_llama(VOCAB, seed=1), tiny_llama(VOCAB, hidden=64, seed=2)
    objectives = [*KD, {"kind": "hidden_mse", "layers": "last"}]  # widths differ: a projection
    distiller = Distiller(student, teacher, objectives)
    trainer = _trainer(tmp_path, student, distiller, _examples(32, 0), max_steps=8)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 8
    losses = [r["loss"] for r in logged]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert {"ce", "forward_kl", "hidden_mse"} <= set(logged[0])
    projection = distiller.parameters()
    assert projection and any(
        p is q for g in trainer.optimizer.param_groups for p in g["params"] for q in projection
    )


def test_trainer_gradient_accumulation_is_one_big_batch(tmp_path):
    """One optimizer step over 4 unevenly padded examples: 2 micro-batches of 2 (the Trainer's
    num_items_in_batch) give the same weights as one batch of 4."""
    pytest.importorskip("accelerate")
    data = _examples(4, 1)
    results = []
    for batch, accumulate in ((4, 1), (2, 2)):
        student, teacher = tiny_llama(VOCAB, seed=1), tiny_llama(VOCAB, seed=2)
        trainer = _trainer(
            tmp_path / f"b{batch}", student, Distiller(student, teacher, KD), data, max_steps=1,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
            optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=1e9,
            weight_decay=0.0,
        )  # fmt: skip
        trainer.train()
        results.append([p.detach().clone() for p in student.parameters()])
    start = list(tiny_llama(VOCAB, seed=1).parameters())
    assert any((a - s).abs().max() > 1e-4 for a, s in zip(results[0], start, strict=True))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_readme_examples_run(tmp_path, monkeypatch):
    """The two code blocks of the README's "In your own loop" section, run as they are."""
    pytest.importorskip("accelerate")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In your own loop", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(blocks[0], "README-loop", "exec"), scope)
    exec(compile(blocks[1], "README-trainer", "exec"), scope)
    history = [r for r in scope["trainer"].state.log_history if "loss" in r]  # type: ignore[attr-defined]
    assert len(history) == 4 and {"ce", "forward_kl", "hidden_cosine"} <= set(history[0])
    assert all(math.isfinite(r["loss"]) for r in history)
