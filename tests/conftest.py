"""Shared fixtures: a small real corpus, a tiny trained teacher, helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distillery.config import RunConfig


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL corpus of 300 real BBC articles (small, so tokenizing and epochs are quick)."""
    import json

    from distillery.data import bbc_news_labelled

    path = tmp_path_factory.mktemp("corpus") / "news.jsonl"
    articles = bbc_news_labelled()[::7][:300]
    with path.open("w", encoding="utf-8") as f:
        for text, label in articles:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def stage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``teacher_stage.root`` for converged tiny teachers: their folders are keyed by content,
    so the tests naming the same stage train them once and reuse them."""
    return tmp_path_factory.mktemp("stage")


def tiny_run(
    corpus: Path, cache_dir: Path, out: Path, *, teacher: Path | None = None, **train: object
) -> RunConfig:
    """A RunConfig for the tiny preset on the test corpus (train fields overridable)."""
    fields = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, eval_batches=2)
    fields |= {"generation_tokens": 8, "draft_prompts": 4}  # the final report's extras, small
    fields.update(train)
    return RunConfig.model_validate(
        {
            "data": {
                "source": str(corpus),
                "seq_len": 32,
                "vocab_size": 512,
                "cache_dir": str(cache_dir),
            },
            "model": {"preset": "tiny"},
            "teacher": str(teacher) if teacher else None,
            "objectives": [{"kind": "ce"}],
            "train": fields,
            "out": str(out),
        }
    )


@pytest.fixture(scope="session")
def teacher_dir(corpus: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained for a few steps on the corpus, exported in HF format."""
    from distillery.recipes.run import run

    out = tmp_path_factory.mktemp("teacher")
    cfg = tiny_run(corpus, cache_dir, out, steps=20)
    cfg.model.overrides = {"num_hidden_layers": 4}
    run(cfg, name="teacher")
    return out / "model"


def tiny_llama(
    vocab: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0
) -> Any:
    """A small random Llama (seeded) for loss and teacher tests that need a real HF model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
    )
    return LlamaForCausalLM(config)


def tiny_recipe(corpus: Path, cache_dir: Path) -> list[str]:
    """Overrides that point a recipe's config at the test corpus with the tiny preset."""
    return [
        f"data.source={corpus}",
        "data.seq_len=32",
        "data.vocab_size=512",
        f"data.cache_dir={cache_dir}",
        "teacher.preset=tiny",
    ]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m distillery ARGS`` in a fresh process; returns the completed process (the
    generous timeout: a shared CI machine can be several times slower than an idle one)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distillery", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def bucketed_kl_rows(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """The float64 reference for a teacher kept as its top-k plus one bucket for the rest:
    per row, Σ_{top-k of p} p·log(p/q) + r·log(r/q_rest), r and q_rest the mass outside the
    top-k. ``p`` and ``q`` ``(N, V)`` are probabilities; the teacher cache and the
    codistillation pool are both checked against it."""
    top = p.topk(k, dim=-1).indices
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(1, top, True)
    r, q_rest = (p * ~in_top).sum(-1), (q * ~in_top).sum(-1)
    inside = torch.where(in_top, p * (p.log() - q.log()), 0.0).sum(-1)
    return inside + r * (r / q_rest).log()
