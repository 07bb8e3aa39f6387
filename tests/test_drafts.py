"""A student as its teacher's draft model: acceptance lengths and assisted generation."""

from __future__ import annotations

import copy

import torch

from distillery.eval.drafts import acceptance_lengths, assisted_speedup, greedy_tokens
from tests.conftest import tiny_llama

V = 96


def prompts(n: int = 6, length: int = 5) -> torch.Tensor:
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(3))


def test_greedy_tokens_match_generate():
    model = tiny_llama(V, seed=1).eval()
    p = prompts()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(p, attention_mask=torch.ones_like(p), **kw)
    assert torch.equal(greedy_tokens(model, p, 8), out[:, p.shape[1] :])


def test_acceptance_is_k_for_the_teacher_itself_and_lower_for_a_stranger():
    teacher = tiny_llama(V, seed=1)
    same = acceptance_lengths(copy.deepcopy(teacher), teacher, prompts())
    assert same["acceptance_length"] == {str(k): float(k) for k in range(1, 9)}
    stranger = tiny_llama(V, seed=2)
    other = acceptance_lengths(stranger, teacher, prompts())["acceptance_length"]
    # Written another way: walk each prompt's two continuations until they differ.
    p = prompts()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    kw["attention_mask"] = torch.ones_like(p)
    drafts = stranger.generate(p, **kw)[:, 5:].tolist()
    targets = teacher.generate(p, **kw)[:, 5:].tolist()
    for k in range(1, 9):
        accepted = []
        for d, t in zip(drafts, targets, strict=True):
            n = 0
            while n < k and d[n] == t[n]:
                n += 1
            accepted.append(n)
        assert other[str(k)] == sum(accepted) / len(accepted)
    assert other["8"] < 8


def test_assisted_generation_keeps_the_teachers_tokens():
    teacher, student = tiny_llama(V, hidden=64, seed=1), tiny_llama(V, seed=2)
    result = assisted_speedup(teacher, student, prompts(2), new_tokens=12)
    assert result["assisted_same_tokens"] is True
    assert result["teacher_tokens_per_s"] > 0 and result["assisted_tokens_per_s"] > 0
    assert result["assisted_speedup"] > 0 and result["assisted_new_tokens"] == 12
