"""``distillery ablate``: every arm × seed runs, the table is written, finished runs are reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.config import build_config
from distillery.recipes.ablate import AblationConfig, ablate
from distillery.recipes.study import teacher_check
from tests.conftest import run_cli, tiny_recipe


def _config(corpus, cache_dir, tmp_path, *extra: str) -> AblationConfig:
    small = "{steps: %d, batch_size: 4, eval_batches: 1, tensorboard: false, log_every: 1}"
    return build_config(
        AblationConfig,
        overrides=[
            *tiny_recipe(corpus, cache_dir),
            "student_layers=1",
            f"teacher_train={small % 4}",
            f"student_train={small % 2}",
            "seeds=[0, 1]",
            "arms={full: {}, no-cosine: {drop: [hidden_cosine]}, random-init: "
            "{init_from_teacher: false}}",
            f"out={tmp_path / 'abl'}",
            f"results={tmp_path / 'results'}",
            *extra,
        ],
    )


def test_ablate_runs_every_arm_and_seed_then_reuses_them(corpus, cache_dir, tmp_path, capsys):
    cfg = _config(corpus, cache_dir, tmp_path)
    result = ablate(cfg)
    assert list(result["arms"]) == ["full", "no-cosine", "random-init"]
    arms = result["arms"]
    assert arms["full"]["objectives"] == "5·forward_kl(T=2) + 2·ce + 1·hidden_cosine"
    assert arms["no-cosine"]["objectives"] == "5·forward_kl(T=2) + 2·ce"
    assert arms["random-init"]["init"] == "random"
    for name, arm in arms.items():
        assert [r["seed"] for r in arm["runs"]] == [0, 1]
        ppls = [r["val_ppl"] for r in arm["runs"]]
        assert ppls[0] != ppls[1], name  # the seed changes the data order
        assert arm["val_ppl"]["std"] > 0
        assert 0.0 <= arm["agreement"]["mean"] <= 1.0
    # Each arm really trained with its own mix: the logged terms are the arm's objectives.
    first = json.loads((tmp_path / "abl/no-cosine/seed-0/metrics.jsonl").read_text().split("\n")[0])
    assert {"forward_kl", "ce"} <= set(first) and "hidden_cosine" not in first
    # Each arm minus "full", paired by seed: with 2 seeds the 95% interval is the mean
    # difference ± t(0.975, 1) · |d0 − d1| / 2, t(0.975, 1) = 12.706.
    full = [r["val_ppl"] for r in arms["full"]["runs"]]
    d = [r["val_ppl"] - f for r, f in zip(arms["random-init"]["runs"], full, strict=True)]
    vs = arms["random-init"]["vs_comparison"]["val_ppl"]
    assert vs["mean"] == pytest.approx((d[0] + d[1]) / 2)
    assert vs["high"] - vs["mean"] == pytest.approx(12.706 * abs(d[0] - d[1]) / 2, rel=1e-4)
    assert vs["verdict"] in ("better", "worse", "no difference detected at 2 seeds")
    assert arms["full"]["vs_comparison"]["val_ppl"]["mean"] == 0.0
    table = (tmp_path / "results" / "ablation.md").read_text()
    assert table.count("\n| ") == 4 and "± " in table and "Δ ppl vs full [95% CI]" in table
    assert "not converged" in table and "no no-teacher arm" in table
    saved = json.loads((tmp_path / "results" / "ablation.json").read_text())
    assert saved["arms"]["full"]["runs"] == arms["full"]["runs"]

    # A second call (an interrupted ablation continued) reuses every finished run.
    model = tmp_path / "abl/full/seed-1/model/model.safetensors"
    stamp = model.stat().st_mtime_ns
    capsys.readouterr()
    again = ablate(cfg)
    assert capsys.readouterr().out.count("reusing") == 7  # the teacher and 6 students
    assert model.stat().st_mtime_ns == stamp
    assert again["arms"] == result["arms"]


def test_ablate_config_errors_are_one_line(tmp_path):
    proc = run_cli(
        "ablate",
        f"--out={tmp_path}",
        "arms={full: {}, odd: {drop: [attention_kl]}}",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distillery: error: invalid config: arms.odd.drop: ['attention_kl'] not among the "
        "objectives ['forward_kl', 'ce', 'hidden_cosine']"
    ]


def test_ablate_with_converged_teachers_pairs_seeds_with_teachers(
    corpus, cache_dir, tmp_path, capsys
):
    stage = f"{{seeds: [0, 1], eval_every: 2, patience: 1, max_steps: 4, root: {tmp_path / 't'}}}"
    cfg = _config(
        corpus,
        cache_dir,
        tmp_path,
        f"teacher_stage={stage}",
        "arms={scratch: {objectives: [{kind: ce}], init_from_teacher: false}, full: {}}",
    )
    result = ablate(cfg)
    teachers = result["teacher"]["teachers"]
    assert result["teacher"]["converged"] and [t["seed"] for t in teachers] == [0, 1]
    assert not (tmp_path / "abl" / "teacher").exists()  # the stage's folders, not the study's
    for arm in result["arms"].values():  # student seed i learns from teacher i
        assert [Path(r["teacher"]) for r in arm["runs"]] == [Path(t["model"]) for t in teachers]
    assert result["arms"]["scratch"]["no_teacher"] and not result["arms"]["full"]["no_teacher"]
    table = (tmp_path / "results" / "ablation.md").read_text()
    assert "over 2 teacher seeds; best no-teacher student" in table
    worst = max(t["val_ppl"] for t in teachers)
    best = min(r["val_ppl"] for r in result["arms"]["scratch"]["runs"])
    assert ("the teacher is clearly better" in table) == (worst < best)
    assert ("**not clearly better" in table) == (worst >= best)
    capsys.readouterr()
    again = ablate(cfg)  # both teachers and all four students reused
    out = capsys.readouterr().out
    assert out.count("converged before, reusing") == 2 and out.count("reusing") == 6
    assert again["arms"] == result["arms"]


def test_teacher_check_says_when_the_teacher_is_not_clearly_better():
    teacher = {
        "val_ppl": 150.0,
        "val_ppl_std": 7.1,
        "teachers": [{"val_ppl": 145.0}, {"val_ppl": 155.0}],
    }
    said = teacher_check(teacher, [{"val_ppl": 160.0}, {"val_ppl": 170.0}])
    assert "150.0 ± 7.1 over 2 teacher seeds; best no-teacher student 160.0" in said
    assert "the teacher is clearly better" in said
    # The worse teacher seed (155) is above the best no-teacher seed (154): not clearly better.
    assert "**not clearly better" in teacher_check(
        teacher, [{"val_ppl": 154.0}, {"val_ppl": 190.0}]
    )
    alone = teacher_check({"val_ppl": 150.0, "teachers": [{"val_ppl": 150.0}]}, None)
    assert "one teacher seed: no teacher spread" in alone and "no no-teacher arm" in alone


def test_each_arm_is_tuned_on_its_own_grid_before_its_seeds_run(corpus, cache_dir, tmp_path):
    import yaml

    cfg = _config(
        corpus, cache_dir, tmp_path, "seeds=[0]", "arms={full: {}}",
        "tune={lrs: [0.0001, 0.001, 0.01], warmups: [0, 1], seed: 7}",
    )  # fmt: skip
    arm = ablate(cfg)["arms"]["full"]
    grid = arm["tuning"]["grid"]
    assert [(g["lr"], g["warmup_steps"]) for g in grid] == [
        (lr, w) for lr in (0.0001, 0.001, 0.01) for w in (0, 1)
    ]
    best = min(grid, key=lambda g: g["val_loss"])
    assert (arm["lr"], arm["warmup_steps"]) == (best["lr"], best["warmup_steps"])
    assert arm["tuning"]["lr_at_edge"] == (best["lr"] in (0.0001, 0.01))
    assert len({g["val_loss"] for g in grid}) > 1  # the settings really differ
    point = yaml.safe_load((tmp_path / "abl/full/tune/lr-0.01-warmup-1/config.yaml").read_text())
    assert (point["train"]["seed"], point["train"]["lr"]) == (7, 0.01)
    run = yaml.safe_load((tmp_path / "abl/full/seed-0/config.yaml").read_text())
    assert (run["train"]["seed"], run["train"]["lr"]) == (0, best["lr"])
    assert "(tuned" in (tmp_path / "results" / "ablation.md").read_text()
