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


def test_tuned_arms_each_run_their_chain_at_their_own_best_grid_point(corpus, cache_dir, tmp_path):
    tune = "tune={lrs: [0.001, 0.01, 0.1], warmups: [0, 2], seed: 7}"
    cfg = _config(corpus, cache_dir, tmp_path, "two-step", tune)
    result = compare_modes(cfg)
    out = tmp_path / "two-step"
    for arm, last in (("two-step", "soft-targets"), ("from-start", "distill")):
        record = result["tuning"][arm]
        # The chosen point is the grid's lowest final validation loss, read back from disk.
        losses = {
            (g["lr"], g["warmup_steps"]): json.loads(
                (out / "tune" / arm / f"lr-{g['lr']:g}-warmup-{g['warmup_steps']}" / last
                 / "seed-7" / "summary.json").read_text()
            )["val_loss"]
            for g in record["grid"]
        }  # fmt: skip
        assert len(losses) == 6
        best = min(losses, key=losses.get)
        assert (record["lr"], record["warmup_steps"]) == best
        assert record["lr_at_edge"] == (best[0] in (0.001, 0.1))
        # Every run of the arm's chain, for the reported seed, trains at the chosen point.
        root = out / arm / f"lr-{best[0]:g}-warmup-{best[1]}"
        for stage in result["arms"][arm]["stages"]:
            assert (stage["lr"], stage["warmup_steps"]) == best
            train = _run_config(root / stage["name"] / "seed-0")["train"]
            assert (train["lr"], train["warmup_steps"], train["seed"]) == (*best, 0)
    # The fine-tune starts from the task run of its own setting; budgets still match, on the
    # reported seed and, for every grid point of from-start, the chosen two-step chain's FLOPs
    # on the tuning seed.
    chosen = result["tuning"]["two-step"]
    point = f"lr-{chosen['lr']:g}-warmup-{chosen['warmup_steps']}"
    root = out / "two-step" / point
    fine_tune = _run_config(root / "soft-targets/seed-0")
    assert fine_tune["model"]["path"] == str(root / "task/seed-0/model")
    _equal_compute(result, "two-step", "from-start")
    spent = sum(
        json.loads((out / "tune/two-step" / point / stage / "seed-7/summary.json").read_text())[
            "flops"
        ]
        for stage in ("task", "soft-targets")
    )
    for folder in (out / "tune/from-start").iterdir():
        budget = _run_config(folder / "distill/seed-7")["train"]["flops_budget"]
        assert budget == pytest.approx(spent)
    table = (tmp_path / "results" / "two-step.md").read_text()
    assert "Tuning (the arm's final validation loss on seed 7" in table
    with pytest.raises(DistilleryError, match="seed 0 is a reported seed"):
        _config(corpus, cache_dir, tmp_path, "two-step", tune.replace("seed: 7", "seed: 0"))


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


STAGE = "teacher_stage={seeds: [0, 1], eval_every: 2, patience: 1, max_steps: 4, root: %s}"
# no final-report extras (generation speed, drafting) and a small validation split (every run
# ends with a whole-split evaluation): these tests check pairing and accounting
FAST = SMALL.replace("}", ", generation_tokens: 0, draft_prompts: 0}")


def _staged(corpus, cache_dir, tmp_path, mode: str, root: Path, *extra: str) -> ModesConfig:
    """A mode reading the converged tiny teachers in ``root``."""
    return _config(corpus, cache_dir, tmp_path, mode, STAGE % root, "data.val_fraction=0.01",
                   f"teacher_train={FAST % 4}", f"student_train={FAST % 4}", *extra)  # fmt: skip


def _teacher_check_agrees(result: dict, table: str) -> None:
    """The table says the teacher is clearly better exactly when its worst seed beats every
    final model."""
    worst = max(t["val_ppl"] for t in result["teacher"]["teachers"])
    finals = [r["val_ppl"] for arm in result["arms"].values() for r in arm["stages"][-1]["runs"]]
    assert ("the teacher is clearly better" in table) == (worst < min(finals))
    assert ("**not clearly better" in table) == (worst >= min(finals))


def test_two_step_with_a_teacher_stage_pairs_seed_i_with_teacher_i_mod_n(
    corpus, cache_dir, tmp_path, stage_root
):
    cfg = _staged(corpus, cache_dir, tmp_path, "two-step", stage_root, "seeds=[0, 1, 2]")
    result = compare_modes(cfg)
    out = tmp_path / "two-step"
    stage = result["teacher"]
    assert stage["converged"] and [t["seed"] for t in stage["teachers"]] == [0, 1]
    assert not (out / "teacher").exists()  # the stage's folders, not the mode's own
    assert result["seed_teachers"] == [0, 1, 0]
    models = [Path(t["model"]) for t in result["teachers"]]
    assert models == [Path(t["model"]) for t in stage["teachers"]]
    for seed, own in zip((0, 1, 2), (0, 1, 0), strict=True):
        for run_ in ("two-step/task", "two-step/soft-targets", "from-start/distill"):
            assert Path(_run_config(out / run_ / f"seed-{seed}")["teacher"]["path"]) == models[own]
    table = (tmp_path / "results" / "two-step.md").read_text()
    assert "teacher stage:" in table or "early-stopped by patience" in table
    assert "learns from teacher i mod 2" in table
    assert "over 2 teacher seeds; best distilled student" in table
    _teacher_check_agrees(result, table)
    saved = json.loads((tmp_path / "results" / "two-step.json").read_text())
    assert saved["teacher"]["teachers"] == stage["teachers"]


def test_multi_teacher_distils_the_distinct_stage_teachers(corpus, cache_dir, tmp_path, stage_root):
    with pytest.raises(DistilleryError, match=r"mode.teachers: .*set mode.teachers=2") as err:
        _staged(corpus, cache_dir, tmp_path, "multi-teacher", stage_root)  # 3 by default
    assert "\n" not in str(err.value)
    cfg = _staged(corpus, cache_dir, tmp_path, "multi-teacher", stage_root, "mode.teachers=2",
                  "seeds=[0, 1]")  # fmt: skip
    result = compare_modes(cfg)
    out = tmp_path / "multi-teacher"
    models = [t["model"] for t in result["teachers"]]
    assert len(set(models)) == 2 and not (out / "teacher-1").exists()
    for seed in (0, 1):  # the ensemble: both stage teachers; single arms: the seed's own
        assert _run_config(out / "ensemble/student" / f"seed-{seed}")["teacher"]["path"] == models
        for arm in ("single", "single-same-steps"):
            config = _run_config(out / arm / "student" / f"seed-{seed}")
            assert config["teacher"]["path"] == models[seed]


def test_born_again_starts_from_the_stage_teacher_and_is_charged_its_cost(
    corpus, cache_dir, tmp_path, stage_root
):
    cfg = _staged(corpus, cache_dir, tmp_path, "self-distill", stage_root, "mode.generations=1",
                  "mode.steps=2", "seeds=[0, 1]")  # fmt: skip
    result = compare_modes(cfg)
    out = tmp_path / "self-distill"
    gen1 = result["arms"]["born-again"]["stages"][0]
    assert [r["steps"] for r in gen1["runs"]] == [2, 2]  # mode.steps, not the stage's cap
    for seed, run_ in zip((0, 1), gen1["runs"], strict=True):
        teacher = result["teachers"][seed]  # generation 0: the seed's own stage teacher
        config = _run_config(out / "born-again/gen-1" / f"seed-{seed}")
        assert config["teacher"]["path"] == teacher["model"]
        # generation 0 is charged at what its stage spent, patience included
        spent = json.loads((Path(teacher["model"]).parent / "summary.json").read_text())
        assert teacher["flops"] == spent["flops_trained"]
        assert run_["arm_flops"] == pytest.approx(teacher["flops"] + run_["flops"])
    _equal_compute(result, "born-again", "plain")
    table = (tmp_path / "results" / "self-distill.md").read_text()
    assert "best no-teacher student" in table  # the plain arm learns nothing from a teacher
