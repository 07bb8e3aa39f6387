"""``distillery mode``: each mode's chain of runs on tiny models, equal-compute budgets, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from distillery.config import build_config
from distillery.engine import steps_for_budget
from distillery.errors import DistilleryError
from distillery.recipes.modes import compare_modes, plan
from distillery.recipes.modes_config import ModesConfig
from distillery.recipes.run import run
from tests.conftest import run_cli, tiny_recipe, tiny_run

SMALL = "{steps: %d, batch_size: 4, eval_batches: 1, tensorboard: false, checkpoint_every: 0}"


def _config(corpus, cache_dir, tmp_path, mode: str, *extra: str) -> ModesConfig:
    return build_config(
        ModesConfig,
        overrides=[
            *tiny_recipe(corpus, cache_dir),
            "teacher.overrides={num_hidden_layers: 4}",
            "student_layers=1",
            f"teacher_train={SMALL % 4}",
            f"student_train={SMALL % 4}",
            "seeds=[0]",
            f"mode.kind={mode}",
            f"out={tmp_path / mode}",
            f"results={tmp_path / 'results'}",
            *extra,
        ],
    )


def _run_config(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


def _flops_per_step(arm_stage: dict) -> float:
    run_ = arm_stage["runs"][0]
    return run_["flops"] / run_["steps"]


def _equal_compute(result: dict, mode_arm: str, base_arm: str) -> None:
    """The comparison arm spent the mode arm's FLOPs, less than one of its own steps short."""
    spent = result["arms"][mode_arm]["stages"][-1]["runs"][0]["arm_flops"]
    base = result["arms"][base_arm]["stages"][-1]
    assert spent - _flops_per_step(base) < base["runs"][0]["arm_flops"] <= spent


def test_self_distill_chains_generations_and_matches_the_chains_flops(corpus, cache_dir, tmp_path):
    cfg = _config(corpus, cache_dir, tmp_path, "self-distill", "mode.generations=2")
    result = compare_modes(cfg)
    out = tmp_path / "self-distill"
    gens = result["arms"]["born-again"]["stages"]
    assert [g["name"] for g in gens] == ["gen-1", "gen-2"]
    # Each generation: the teacher's architecture, random init, taught by the one before.
    assert _run_config(out / "born-again/gen-1/seed-0")["teacher"]["path"] == str(
        out / "teacher/model"
    )
    second = _run_config(out / "born-again/gen-2/seed-0")
    assert second["teacher"]["path"] == str(out / "born-again/gen-1/seed-0/model")
    assert second["model"]["init_from_teacher"] is None
    assert all(g["layers"] == 4 for g in gens)
    # Generation 0 (the teacher's training) is charged to the chain, and the plain run spends it.
    teacher_flops = result["teachers"][0]["flops"]
    gen1 = gens[0]["runs"][0]
    assert gen1["arm_flops"] == pytest.approx(teacher_flops + gen1["flops"])
    _equal_compute(result, "born-again", "plain")
    assert result["arms"]["plain"]["stages"][0]["runs"][0]["steps"] > 3 * 4
    table = (tmp_path / "results" / "self-distill.md").read_text()
    for row in ("gen-0 (teacher)", "gen-1", "gen-2", "| plain |"):
        assert row in table


def test_rounds_distil_through_the_assistant_and_direct_gets_the_same_flops(
    corpus, cache_dir, tmp_path
):
    cfg = _config(corpus, cache_dir, tmp_path, "rounds", "mode.assistants=[2]")
    result = compare_modes(cfg)
    out = tmp_path / "rounds"
    assert [s["layers"] for s in result["arms"]["assistants"]["stages"]] == [2, 1]
    assistant = out / "assistants/2-layers/seed-0/model"
    student = _run_config(out / "assistants/1-layers/seed-0")
    assert student["teacher"]["path"] == str(assistant)
    assert student["model"]["init_from_teacher"] == "every_other"
    # The student starts from the assistant's layer 0, which started from the teacher's layer 0
    # but was then trained: the student's untrained start differs from the direct student's.
    direct = _run_config(out / "direct/1-layers/seed-0")
    assert direct["teacher"]["path"] == str(out / "teacher/model")
    _equal_compute(result, "assistants", "direct")
    assert result["arms"]["direct"]["stages"][0]["runs"][0]["steps"] > 4


def test_two_step_fine_tunes_the_task_trained_student(corpus, cache_dir, tmp_path):
    cfg = _config(corpus, cache_dir, tmp_path, "two-step", "mode.first_fraction=0.5")
    result = compare_modes(cfg)
    out = tmp_path / "two-step"
    task, soft = result["arms"]["two-step"]["stages"]
    assert (task["runs"][0]["steps"], soft["runs"][0]["steps"]) == (2, 2)
    # Step 1 runs no teacher: it is charged 6·N per token only, a third of what step 2 costs
    # per step at most (step 2 adds the 4-layer teacher's forwards).
    assert _flops_per_step(task) < _flops_per_step(soft)
    second = _run_config(out / "two-step/soft-targets/seed-0")
    assert second["model"]["path"] == str(out / "two-step/task/seed-0/model")
    assert [o["kind"] for o in second["objectives"]] == ["forward_kl"]
    assert [o["kind"] for o in _run_config(out / "two-step/task/seed-0")["objectives"]] == ["ce"]
    _equal_compute(result, "two-step", "from-start")


def test_multi_teacher_trains_distinct_teachers_and_reuses_finished_runs(
    corpus, cache_dir, tmp_path, capsys
):
    cfg = _config(
        corpus, cache_dir, tmp_path, "multi-teacher", "mode.teachers=2", "mode.weights=[2, 1]"
    )
    result = compare_modes(cfg)
    out = tmp_path / "multi-teacher"
    a = load_file(out / "teacher/model/model.safetensors")
    b = load_file(out / "teacher-1/model/model.safetensors")
    assert any(not (a[k] == b[k]).all() for k in a)  # different seeds, different teachers
    ensemble = _run_config(out / "ensemble/student/seed-0")
    teacher = ensemble["teacher"]
    assert teacher["path"] == [str(out / "teacher/model"), str(out / "teacher-1/model")]
    assert teacher["weights"] == [2.0, 1.0]
    _equal_compute(result, "ensemble", "single")
    # Two teachers' forwards per step: the single-teacher student gets more steps.
    assert result["arms"]["single"]["stages"][0]["runs"][0]["steps"] > 4
    saved = json.loads((tmp_path / "results" / "multi-teacher.json").read_text())
    assert (
        saved["arms"]["ensemble"]["stages"][0]["runs"]
        == (result["arms"]["ensemble"]["stages"][0]["runs"])
    )

    stamp = (out / "single/student/seed-0/summary.json").stat().st_mtime_ns
    capsys.readouterr()
    again = compare_modes(cfg)
    assert "reusing" in capsys.readouterr().out
    assert (out / "single/student/seed-0/summary.json").stat().st_mtime_ns == stamp
    assert again["arms"] == result["arms"]


def test_plans_of_every_mode():
    base = ["teacher.overrides={num_hidden_layers: 8}"]
    for kind, arms in (
        ("multi-teacher", ["ensemble", "single", "single-same-steps"]),
        ("self-distill", ["born-again", "plain"]),
        ("rounds", ["assistants", "direct"]),
        ("two-step", ["two-step", "from-start"]),
    ):
        planned = plan(build_config(ModesConfig, overrides=[*base, f"mode.kind={kind}"]))
        assert list(planned) == arms
        # The second arm is the comparison: one run, budgeted by the first arm's FLOPs.
        assert [s.match for s in planned[arms[1]].stages] == [arms[0]]
        assert all(s.match is None for s in planned[arms[0]].stages)
    same_steps = plan(build_config(ModesConfig, overrides=[*base, "mode.kind=multi-teacher"]))
    assert same_steps["single-same-steps"].stages[0].match is None
    rounds = build_config(ModesConfig, overrides=[*base, "mode={kind: rounds, assistants: [4]}"])
    assert [s.layers for s in plan(rounds)["assistants"].stages] == [4, 2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode={kind: rounds, assistants: [2]}"], "2 → 2 layers"),  # the student has 2
        (["mode={kind: rounds, assistants: [1]}"], "1 → 2 layers"),
        (["mode={kind: multi-teacher, teachers: 2, weights: [1]}"], "one weight per teacher"),
        (["mode={kind: self-distill, generations: 0}"], "mode.self-distill.generations"),
        (["objectives=[{kind: ce}]"], "at least one teacher objective"),
        (["mode={kind: two-step, first_fraction: 1.0}"], "mode.two-step.first_fraction"),
    ],
)
def test_bad_mode_configs_are_one_line(overrides, message):
    with pytest.raises(DistilleryError, match=message) as err:
        build_config(ModesConfig, overrides=overrides)
    assert "\n" not in str(err.value)


def test_flops_budget_sets_the_step_count(corpus, cache_dir, tmp_path):
    cfg = tiny_run(corpus, cache_dir, tmp_path / "a", steps=3)
    first = run(cfg)
    per_step = first["flops"] / 3
    budget = 5.5 * per_step
    cfg.train.flops_budget = budget
    cfg.out = tmp_path / "b"
    second = run(cfg)
    assert second["steps"] == 5 and second["flops"] == pytest.approx(5 * per_step)
    with pytest.raises(DistilleryError, match="less than one step"):
        steps_for_budget(cfg.train.model_copy(update={"flops_budget": 0.5 * per_step}), per_step)


def test_mode_cli_errors(tmp_path):
    config = tmp_path / "rounds.yaml"
    config.write_text("mode: {kind: rounds}\n")
    wrong = run_cli("mode", "two-step", "--config", str(config))
    assert wrong.returncode == 2 and "is for mode 'rounds'" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    gens = run_cli("mode", "rounds", "--generations", "3")
    assert gens.returncode == 2 and "--generations is for" in gens.stderr
    bad = run_cli("mode", "self-distill", "--generations", "0", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "generations" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_a_finished_run_is_reused_when_its_config_reads_back_equal(corpus, cache_dir, tmp_path):
    """A run saved before a field existed (here ``train.data_offset``) is still reused; one
    whose settings differ is not."""
    from distillery.config import config_to_yaml
    from distillery.recipes.study import run_or_reuse

    cfg = tiny_run(corpus, cache_dir, tmp_path / "old", steps=2)
    saved = yaml.safe_load(config_to_yaml(cfg))
    del saved["train"]["data_offset"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "old" / "summary.json").write_text('{"finished": true, "val_ppl": 1.0}')
    summary, reused = run_or_reuse(cfg, "old")
    assert reused and summary["val_ppl"] == 1.0
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})})
    summary, reused = run_or_reuse(changed, "old")
    assert not reused and summary["steps"] == 3 and summary["val_ppl"] != 1.0
