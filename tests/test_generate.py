"""Seeded, batched, KV-cached sampling and ``distillery generate`` (sequence-level KD data)."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.data import load_prompt_records
from distillery.errors import DistilleryError
from distillery.models.generation import Sampling, next_tokens, row_generator, sample
from distillery.recipes.generate import GenerateConfig, generate
from tests.conftest import run_cli, tiny_llama
from tests.test_prompts import write_prompt_file

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [3, 1, 4, 1, 5, 9, 2, 6], [42]]


def greedy_without_cache(model, prompt: list[int], steps: int) -> list[int]:
    """The reference: the whole sequence re-run at every step, no padding, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def gens(seed: int, n: int = len(PROMPTS), step: int = 0) -> list[torch.Generator]:
    return [row_generator(seed, step, i) for i in range(n)]


def test_batched_greedy_equals_row_by_row_and_the_uncached_reference():
    model = tiny_llama(64, seed=1)
    greedy = Sampling(temperature=0.0, max_new_tokens=7)
    batched = sample(model, PROMPTS, greedy, gens(0), pad_token_id=0)
    for prompt, got in zip(PROMPTS, batched, strict=True):
        alone = sample(model, [prompt], greedy, gens(0, 1), pad_token_id=0)[0]
        assert got == alone == greedy_without_cache(model, prompt, 7)
    assert model.training  # put back as it was


def test_sampling_is_reproducible_per_row_and_seed():
    model = tiny_llama(64, seed=2)
    hot = Sampling(temperature=1.5, top_p=0.95, max_new_tokens=6)
    a = sample(model, PROMPTS, hot, gens(3), pad_token_id=0)
    torch.manual_seed(123)  # the global RNG plays no part
    b = sample(model, PROMPTS, hot, gens(3), pad_token_id=0)
    assert a == b
    assert a != sample(model, PROMPTS, hot, gens(4), pad_token_id=0)
    assert a != sample(model, PROMPTS, hot, gens(3, step=1), pad_token_id=0)
    # a row's sample depends on its own prompt and generator, not on its batch-mates
    for i, prompt in enumerate(PROMPTS):
        alone = sample(model, [prompt], hot, [row_generator(3, 0, i)], pad_token_id=0)[0]
        assert alone == a[i]


def test_stop_tokens_and_per_row_caps():
    model = tiny_llama(64, seed=1)
    greedy = Sampling(temperature=0.0, max_new_tokens=7)
    free = sample(model, PROMPTS, greedy, gens(0), pad_token_id=0)
    stop = free[0][2]
    stopped = sample(model, PROMPTS, greedy, gens(0), pad_token_id=0, stop_ids=[stop],
                     max_new=[7, 3, 7, 0])  # fmt: skip
    for got, full, cap in zip(stopped, free, [7, 3, 7, 0], strict=True):
        end = next((i + 1 for i, t in enumerate(full[:cap]) if t == stop), cap)
        assert got == full[:end]


def test_temperature_and_top_p_draw_the_distribution_they_say():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = 6000

    def frequencies(sampling: Sampling) -> torch.Tensor:
        g = [torch.Generator().manual_seed(0)]
        counts = torch.zeros(3)
        for _ in range(draws):
            counts[next_tokens(logits, sampling, g)] += 1
        return counts / draws

    plain = frequencies(Sampling(temperature=1.0))
    assert torch.allclose(plain, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    # top-p 0.7: tokens 0 and 1 (0.5 + 0.3 reaches it), renormalised to 0.625 / 0.375
    nucleus = frequencies(Sampling(temperature=1.0, top_p=0.7))
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0.0]), atol=0.03)
    # T = 2: p ∝ p^(1/2)
    soft = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    assert torch.allclose(frequencies(Sampling(temperature=2.0)), soft / soft.sum(), atol=0.03)
    with pytest.raises(DistilleryError):
        Sampling(top_p=0.0)


def test_generate_writes_resumable_shards_usable_as_data(teacher_dir, corpus, cache_dir,
                                                         tmp_path):  # fmt: skip
    data = write_prompt_file(corpus, tmp_path / "prompts.jsonl")
    cfg = GenerateConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(data), "seq_len": 48, "cache_dir": str(cache_dir)},
        "max_new_tokens": 8, "top_p": 0.9, "batch_size": 5, "shard_size": 8, "limit": 20,
        "device": "cpu", "out": str(tmp_path / "gen"),
    })  # fmt: skip
    manifest = generate(cfg)
    shards = sorted((tmp_path / "gen").glob("shard-*.jsonl"))
    assert [s.name for s in shards] == ["shard-00000.jsonl", "shard-00001.jsonl",
                                        "shard-00002.jsonl"]  # fmt: skip
    lines = [json.loads(x) for s in shards for x in s.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(20))
    assert {x["generator"] for x in lines} == {manifest["key"]["generator"]}
    assert all(0 < x["new_tokens"] <= 8 for x in lines)
    assert manifest["flops_now"] > 0 and manifest["flops"] == manifest["flops_now"]
    # interrupted: the last shard lost, the first kept as it is; another batch size
    first = shards[0].stat().st_mtime_ns
    before = shards[2].read_text()
    shards[2].unlink()
    again = generate(cfg.model_copy(update={"batch_size": 3}))
    assert again["made_now"] == 1 and shards[0].stat().st_mtime_ns == first
    # the whole set's cost is counted again from the shards, not only what this call made
    assert again["flops"] == manifest["flops"] > again["flops_now"] > 0
    assert shards[2].read_text() == before
    with pytest.raises(DistilleryError, match="other settings"):
        generate(cfg.model_copy(update={"seed": 1}))
    records = load_prompt_records(tmp_path / "gen")  # sequence-level KD data for a later run
    assert [r.completion for r in records] == [x["completion"] for x in lines]


def test_generate_command(teacher_dir, corpus, cache_dir, tmp_path):
    data = write_prompt_file(corpus, tmp_path / "prompts.jsonl")
    out = tmp_path / "gen"
    proc = run_cli("generate", "--teacher", str(teacher_dir), "--data", str(data), "--out",
                   str(out), f"data.cache_dir={cache_dir}", "limit=2", "max_new_tokens=4",
                   "temperature=0", "device=cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shard-00000.jsonl: 2 completions" in proc.stdout
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["made_now"] == 1
    lines = (out / "shard-00000.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["new_tokens"] <= 4 for x in lines)
    again = run_cli("generate", "--teacher", str(teacher_dir), "--data", str(data), "--out",
                    str(out), f"data.cache_dir={cache_dir}", "limit=2", "max_new_tokens=5",
                    "device=cpu")  # fmt: skip
    assert again.returncode == 2 and "other settings" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
