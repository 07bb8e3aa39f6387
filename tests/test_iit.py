"""Interchange intervention training wired into the mix, the meter, runs and the evaluation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from distillery.config import RunConfig
from distillery.data import PackedTokens, shift_labels
from distillery.errors import DistilleryError
from distillery.eval import interchange_agreement
from distillery.recipes.study import teacher_regime
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import EnsembleTeacher, LiveTeacher
from tests.conftest import tiny_llama, tiny_run

IIT = {"kind": "iit", "layers": [[1, 1]], "positions": "span", "fraction": 0.5}


def test_iit_config_reads_its_divergence_and_refuses_unknown_parameters():
    terms = terms_from_config([{**IIT, "divergence": "jsd", "beta": 0.3, "weight": 2.0}])
    (term,) = terms
    assert term.reads == "interchange" and term.objective.name == "jsd"
    assert term.params == {"beta": 0.3} and term.weight == 2.0
    assert term.interchange == {"positions": "span", "fraction": 0.5, "probability": 1.0}
    with pytest.raises(DistilleryError, match=r"'iit' has no parameter\(s\) \['heads'\]"):
        terms_from_config([{**IIT, "heads": "map"}])
    cfg = RunConfig.model_validate({"teacher": "t", "objectives": [{"kind": "iit"}]})
    assert cfg.objectives[0].layers == "uniform"


def _batch(vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    return ids, shift_labels(ids)


def test_a_student_equal_to_its_teacher_has_zero_iit_loss_and_others_get_gradients():
    teacher = tiny_llama(97, layers=2)
    student = copy.deepcopy(teacher)
    mix = DistillStep(terms_from_config([IIT]), LiveTeacher(teacher), student=student, vocab=97)
    ids, labels = _batch()
    torch.manual_seed(0)
    total, terms = mix(student, ids, labels)
    assert abs(total.item()) < 1e-5 and abs(terms["iit"].item()) < 1e-5
    other = tiny_llama(97, layers=2, seed=3)
    mix = DistillStep(terms_from_config([IIT]), LiveTeacher(teacher), student=other, vocab=97)
    total, _ = mix(other, ids, labels)
    assert total.item() > 1e-3
    total.backward()
    assert all(p.grad is not None for p in other.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teacher_runs_only_for_counterfactuals_and_the_meter_counts_them():
    teacher, student = tiny_llama(97, layers=4), tiny_llama(97, layers=2, seed=1)
    live = LiveTeacher(teacher)
    mix = DistillStep(terms_from_config([{"kind": "ce"}, IIT]), live, student=student, vocab=97)
    assert mix.teacher_forward is False and mix.teacher_flops_per_token() == 0.0
    n = 1000
    assert mix.interchange_flops_per_token(n) == 4.0 * live.compute_params + 12.0 * n
    half = DistillStep(
        terms_from_config([{**IIT, "probability": 0.5}, {"kind": "forward_kl"}]),
        live,
        student=student,
        vocab=97,
    )
    assert half.teacher_forward is True
    assert half.interchange_flops_per_token(n) == 0.5 * (4.0 * live.compute_params + 12.0 * n)
    # With probability 0.5 some batches get no intervention: their iit term is exactly zero.
    ids, labels = _batch()
    values = []
    for seed in range(8):
        torch.manual_seed(seed)
        values.append(half(student, ids, labels)[1]["iit"].item())
    assert 0 < sum(v == 0.0 for v in values) < len(values)


def test_iit_needs_one_live_teacher_and_layers_in_range():
    teacher, student = tiny_llama(97, layers=2), tiny_llama(97, layers=2)
    ensemble = EnsembleTeacher([LiveTeacher(teacher), LiveTeacher(tiny_llama(97))], vocab=97)
    with pytest.raises(DistilleryError, match="single teacher, not an ensemble"):
        DistillStep(terms_from_config([IIT]), ensemble, student=student, vocab=97)
    with pytest.raises(DistilleryError, match=r"layer pair \[1, 5\] is out of range"):
        DistillStep(
            terms_from_config([{**IIT, "layers": [[1, 5]]}]),
            LiveTeacher(teacher),
            student=student,
            vocab=97,
        )


def test_distil_with_iit_end_to_end(corpus: Path, cache_dir: Path, teacher_dir: Path, tmp_path):
    from distillery.models import load_pretrained
    from distillery.recipes.run import run

    cfg = tiny_run(corpus, cache_dir, tmp_path / "iit", teacher=teacher_dir, steps=4)
    cfg = cfg.model_copy(
        update={
            "objectives": RunConfig.model_validate(
                {"teacher": "t", "objectives": [{"kind": "ce"}, {**IIT, "layers": [[1, 2]]}]}
            ).objectives
        }
    )
    summary = run(cfg)
    assert 0.0 <= summary["interchange_agreement"] <= 1.0
    assert 0.0 <= summary["interchange_agreement_swapped"] <= 1.0
    logged = [json.loads(x) for x in (tmp_path / "iit" / "metrics.jsonl").open()]
    assert all("iit" in r for r in logged if "loss" in r and not r.get("final"))
    # The meter: 6·N_s per token plus the counterfactual runs, every step.
    n_s, n_t = summary["compute_params"], LiveTeacher(load_pretrained(teacher_dir)).compute_params
    tokens = 4 * 32 * 4
    assert summary["flops"] == pytest.approx(tokens * (6.0 * n_s + 4.0 * n_t + 12.0 * n_s))


def test_a_model_agrees_with_itself_under_interventions(corpus: Path, cache_dir: Path, tmp_path):
    from distillery.distributed import DistEnv
    from distillery.recipes.common import prepare_data

    cfg = tiny_run(corpus, cache_dir, tmp_path / "x")
    _, _, val = prepare_data(cfg.data, DistEnv())
    assert isinstance(val, PackedTokens)
    teacher = tiny_llama(val.vocab_size, layers=2)
    same = interchange_agreement(
        copy.deepcopy(teacher), teacher, val, [(1, 1)], device=torch.device("cpu"), max_batches=2
    )
    changed = same.pop("interchange_changed_fraction")
    assert 0.0 < changed < 1.0  # the intervention moves some of the teacher's predictions
    assert same == {"interchange_agreement": 1.0, "interchange_agreement_swapped": 1.0,
                    "interchange_agreement_changed": 1.0}  # fmt: skip
    other = interchange_agreement(
        tiny_llama(val.vocab_size, layers=2, seed=5),
        teacher,
        val,
        [(1, 1), (2, 2)],
        device=torch.device("cpu"),
        max_batches=2,
    )
    assert other["interchange_agreement"] < 0.5


def test_iit_experiment_at_equal_flops(corpus: Path, cache_dir: Path, tmp_path: Path):
    from tests.conftest import run_cli, tiny_recipe

    result = run_cli(
        "experiment",
        "iit",
        "--quick",
        f"--out={tmp_path / 'runs'}",
        *tiny_recipe(corpus, cache_dir),
        "teacher.overrides.num_hidden_layers=4",
        "teacher_train.steps=6",
        "student_train.steps=4",
        "student_train.batch_size=4",
        "iit.layers=[[1, 2]]",
        "eval_batches=2",
        f"results={tmp_path / 'results'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "results" / "iit.json").read_text())
    rows = saved["rows"]
    standard, equal, same = (
        rows[k] for k in ("standard", "standard + IIT", "standard + IIT, same steps")
    )
    # Equal FLOPs: IIT's counterfactual runs leave it fewer steps, within one step of the budget.
    assert equal["steps"]["mean"] < standard["steps"]["mean"] == same["steps"]["mean"] == 4
    per_step = same["flops"]["mean"] / 4
    assert (
        standard["flops"]["mean"] - per_step < equal["flops"]["mean"] <= standard["flops"]["mean"]
    )
    for row in rows.values():
        assert 0.0 <= row["interchange_agreement"]["mean"] <= 1.0
    assert "At equal FLOPs, adding IIT" in (tmp_path / "results" / "iit.md").read_text()


def _staged_study(corpus: Path, cache_dir: Path, stage_root: Path, tmp_path: Path, *extra: str):
    from distillery.config import build_config
    from distillery.recipes.iit import IITStudyConfig
    from tests.conftest import tiny_recipe

    # no final-report extras; the teachers are those of tests/test_modes.py (the same stage)
    small = "{steps: 4, batch_size: 4, eval_batches: 1, tensorboard: false, checkpoint_every: 0, "
    small += "generation_tokens: 0, draft_prompts: 0}"
    stage = f"{{seeds: [0, 1], eval_every: 2, patience: 1, max_steps: 4, root: {stage_root}}}"
    return build_config(
        IITStudyConfig,
        overrides=[
            *tiny_recipe(corpus, cache_dir),
            "data.val_fraction=0.01",  # every run ends with a whole-split evaluation
            "teacher.overrides.num_hidden_layers=4",
            f"teacher_train={small}",
            f"student_train={small}",
            f"teacher_stage={stage}",
            "iit.layers=[[1, 2]]",
            "eval_batches=1",
            "seeds=[0, 1]",
            f"out={tmp_path / 'runs'}",
            f"results={tmp_path / 'results'}",
            *extra,
        ],
    )


def test_iit_study_reads_converged_teachers_and_checks_them(
    corpus: Path, cache_dir: Path, stage_root: Path, tmp_path: Path
):
    from distillery.recipes.iit import iit_study

    cfg = _staged_study(corpus, cache_dir, stage_root, tmp_path)
    result = iit_study(cfg)
    teacher = result["teacher"]
    assert teacher["converged"] and [t["seed"] for t in teacher["teachers"]] == [0, 1]
    assert not (tmp_path / "runs" / "teacher").exists()  # the stage's folders, not the study's
    models = [Path(t["model"]) for t in teacher["teachers"]]
    for row in result["rows"].values():  # student seed index i learns from teacher i mod 2
        assert [Path(r["teacher"]) for r in row["runs"]] == [models[i % 2] for i in range(2)]
    saved = json.loads((tmp_path / "results" / "iit.json").read_text())
    assert saved["teacher"]["teachers"] == teacher["teachers"]
    table = (tmp_path / "results" / "iit.md").read_text()
    assert f"4 layers, {teacher_regime(saved['teacher'])}" in table
    assert "teacher stage:" in table or "early-stopped by patience" in table
    assert "over 2 teacher seeds; best distilled student" in table
    worst = max(t["val_ppl"] for t in teacher["teachers"])
    best = min(r["val_ppl"] for row in result["rows"].values() for r in row["runs"])
    assert ("the teacher is clearly better" in table) == (worst < best)
    assert ("**not clearly better" in table) == (worst >= best)


def test_tuned_iit_arms_run_at_their_own_best_grid_point(
    corpus: Path, cache_dir: Path, stage_root: Path, tmp_path: Path
):
    from distillery.recipes.iit import FOLDERS, iit_study

    tune = "tune={lrs: [0.001, 0.01, 0.1], warmups: [0, 2], seed: 9}"
    result = iit_study(_staged_study(corpus, cache_dir, stage_root, tmp_path, tune, "seeds=[0]"))
    runs = tmp_path / "runs"
    for arm, row in result["rows"].items():
        record = result["tuning"][arm]
        losses = {  # the chosen point is the grid's lowest validation loss, read back from disk
            (g["lr"], g["warmup_steps"]): json.loads(
                (runs / FOLDERS[arm] / "tune" / f"lr-{g['lr']:g}-warmup-{g['warmup_steps']}"
                 / "summary.json").read_text()
            )["val_loss"]
            for g in record["grid"]
        }  # fmt: skip
        best = min(losses, key=losses.get)
        assert (record["lr"], record["warmup_steps"]) == best == (row["lr"], row["warmup_steps"])
        # The reported seed trains at the arm's own chosen point.
        folder = runs / FOLDERS[arm] / f"lr-{best[0]:g}-warmup-{best[1]}" / "seed-0"
        train = yaml.safe_load((folder / "config.yaml").read_text())["train"]
        assert (train["lr"], train["warmup_steps"], train["seed"]) == (*best, 0)
    # Equal FLOPs still holds: on the tuning seed (every grid point of the equal-FLOPs arm spends
    # what standard spent at its chosen point) and on the reported one.
    chosen = result["tuning"]["standard"]
    point = f"lr-{chosen['lr']:g}-warmup-{chosen['warmup_steps']}"
    spent = json.loads((runs / "standard/tune" / point / "summary.json").read_text())["flops"]
    for arm, budget in (("iit-equal-flops", spent), ("iit-same-steps", None)):
        for folder in (runs / arm / "tune").iterdir():
            train = yaml.safe_load((folder / "config.yaml").read_text())["train"]
            assert train["flops_budget"] == budget
    rows = result["rows"]
    standard = {r["seed"]: r["flops"] for r in rows["standard"]["runs"]}
    for r in rows["standard + IIT"]["runs"]:
        assert r["flops"] <= standard[r["seed"]] and r["steps"] < 4
    assert "Tuning (validation loss on seed 9" in (tmp_path / "results" / "iit.md").read_text()
    with pytest.raises(DistilleryError, match="seed 0 is a reported seed"):
        _staged_study(corpus, cache_dir, stage_root, tmp_path, tune.replace("seed: 9", "seed: 0"))
