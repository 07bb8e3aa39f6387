"""AdamW moments carried between runs: exact continuation, origins through surgery, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from distillery.config import ModelSpec, TrainConfig
from distillery.engine.moments import MOMENTS_FILE, carry_moments, load_moments, save_moments
from distillery.errors import DistilleryError
from distillery.models.growth import grow_layers, layer_sources
from distillery.models.surgery import init_from_teacher
from distillery.recipes.run import run
from tests.conftest import tiny_llama, tiny_run


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 12), generator=g) for _ in range(n)]


def test_layer_sources_of_each_growth():
    assert layer_sources(2, 2, "top") == [0, 1, None, None]
    assert layer_sources(3, 2, "interleave") == [0, None, 1, None, 2]
    assert layer_sources(2, 2, "stack") == [0, 1, 0, 1]


def test_carried_moments_continue_training_exactly(tmp_path: Path):
    """k steps, save, a fresh optimizer loading the moments, k more steps: the same weights as
    2k uninterrupted steps; zero moments instead give other weights."""
    model = tiny_llama(97, layers=2, seed=1)
    opt = _adamw(model)
    _steps(model, opt, _batches(3, 0))
    save_moments(opt, model, tmp_path)
    resumed, fresh = copy.deepcopy(model), copy.deepcopy(model)
    _steps(model, opt, _batches(2, 1))

    opt_resumed = _adamw(resumed)
    carried, new = load_moments(opt_resumed, resumed, tmp_path)
    assert (carried, new) == (len(list(resumed.parameters())), 0)
    _steps(resumed, opt_resumed, _batches(2, 1))
    _steps(fresh, _adamw(fresh), _batches(2, 1))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    pairs = zip(model.parameters(), fresh.parameters(), strict=True)
    assert any(not torch.equal(a, c) for a, c in pairs)


def test_moments_follow_init_from_teacher_and_growth(tmp_path: Path):
    """A 2-layer student made from teacher layers 0 and 2, grown by 2 on top: its blocks take
    the moments of teacher blocks 0 and 2, the grown blocks none, embeddings and head theirs."""
    teacher = tiny_llama(97, layers=4, seed=2)
    t_opt = _adamw(teacher)
    _steps(teacher, t_opt, _batches(2, 0))
    save_moments(t_opt, teacher, tmp_path)
    student = tiny_llama(97, layers=2, seed=3)
    init_from_teacher(student, teacher, [0, 2])
    grow_layers(student, 2, where="top")
    opt = _adamw(student)
    carried, fresh = carry_moments(opt, student, tmp_path, init="every_other", grow=("top", 2))
    per_block = len(list(student.model.layers[0].parameters()))
    assert fresh == 2 * per_block and carried == len(list(student.parameters())) - fresh
    for s, t in ((0, 0), (1, 2)):
        got = opt.state[student.model.layers[s].self_attn.q_proj.weight]
        want = t_opt.state[teacher.model.layers[t].self_attn.q_proj.weight]
        assert torch.equal(got["exp_avg"], want["exp_avg"])
        assert torch.equal(got["exp_avg_sq"], want["exp_avg_sq"]) and float(got["step"]) == 2
    assert all(p not in opt.state for p in student.model.layers[2].parameters())
    embed = student.model.embed_tokens.weight
    assert torch.equal(
        opt.state[embed]["exp_avg"], t_opt.state[teacher.model.embed_tokens.weight]["exp_avg"]
    )
    _steps(student, opt, _batches(1, 5))  # a mixed state still steps (grown blocks start at 0)
    assert float(opt.state[student.model.layers[2].mlp.up_proj.weight]["step"]) == 1


def test_wrong_sources_are_one_clear_error(tmp_path: Path):
    with pytest.raises(DistilleryError, match=r"does not exist.*save_moments"):
        load_moments(_adamw(m := tiny_llama(97)), m, tmp_path)
    model = tiny_llama(97, layers=2)
    opt = _adamw(model)
    _steps(model, opt, _batches(1, 0))
    save_moments(opt, model, tmp_path)
    wide = tiny_llama(97, hidden=48, layers=2)
    with pytest.raises(DistilleryError, match="has shape"):
        load_moments(_adamw(wide), wide, tmp_path)
    deeper = tiny_llama(97, layers=3)
    with pytest.raises(DistilleryError, match="holds the moments of 2 blocks"):
        carry_moments(_adamw(deeper), deeper, tmp_path)
    with pytest.raises(ValidationError, match="fsdp"):
        TrainConfig(parallel="fsdp", save_moments=True)


def test_a_run_saves_and_the_next_reads_its_moments(corpus: Path, cache_dir: Path, tmp_path: Path):
    """Through the engine: run A writes its moments beside its model; run B continues A's
    model with them; a run pointed at a folder without moments is refused before it clears
    its output folder."""
    first = tiny_run(corpus, cache_dir, tmp_path / "a", steps=3, save_moments=True)
    run(first)
    with safe_open(str(tmp_path / "a" / MOMENTS_FILE), framework="pt") as f:
        steps = {float(f.get_tensor(k)) for k in f.keys() if k.startswith("step/")}  # noqa: SIM118
    assert steps == {3.0}
    second = tiny_run(corpus, cache_dir, tmp_path / "b", steps=2, moments_from=tmp_path / "a")
    second.model = ModelSpec(path=tmp_path / "a" / "model", preset=None)
    assert run(second)["finished"]
    kept = sorted(p.name for p in (tmp_path / "a").iterdir())
    orphan = tiny_run(corpus, cache_dir, tmp_path / "a", steps=2, moments_from=tmp_path / "b")
    with pytest.raises(DistilleryError, match="does not exist"):
        run(orphan, overwrite=True)  # refused before it clears the finished run in a/
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == kept
