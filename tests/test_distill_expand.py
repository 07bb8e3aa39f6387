"""``distillery experiment distill-expand`` end to end on tiny models: budgets, data stream,
growth, shared phases, the table and plots."""

from __future__ import annotations

import itertools

import yaml

from distillery.config import build_config
from distillery.recipes.distill_expand import DistillExpandConfig, distill_expand
from tests.conftest import run_cli, tiny_recipe

TRAIN = (
    "train={batch_size: 4, lr: 0.003, warmup_steps: 1, eval_every: 2, eval_batches: 1, "
    "checkpoint_every: 0, tensorboard: false}"
)


def _config(corpus, cache_dir, tmp_path, budget: float) -> DistillExpandConfig:
    data = [o for o in tiny_recipe(corpus, cache_dir) if not o.startswith("teacher.")]
    return build_config(
        DistillExpandConfig,
        overrides=[
            *data,
            "model={preset: tiny, overrides: {num_hidden_layers: 4}}",
            f"budget_flops={budget}",
            TRAIN,
            "sweep=[[0.25, 0.25]]",
            "seeds=[0]",
            "baseline_lrs=[0.001]",
            "arms=[baseline, distill-expand, shrink-expand, stacking, restart-only,"
            " reset-in-place]",
            f"out={tmp_path / 'dx'}",
            f"results={tmp_path / 'results'}",
        ],
    )


def test_every_arm_spends_the_budget_on_one_data_stream(corpus, cache_dir, tmp_path, capsys):
    from distillery.models import build_model, compute_params

    step_flops = 6 * compute_params(build_model("tiny", 512, {"num_hidden_layers": 4})) * 4 * 32
    budget = 12 * step_flops
    result = distill_expand(_config(corpus, cache_dir, tmp_path, budget))
    rows = result["rows"]
    assert list(rows) == [
        "baseline",
        "baseline-lr0.001",
        "distill-expand-0.25-0.25",
        "shrink-expand-0.25",
        "stacking",
        "restart-only-0.25-0.25",
        "reset-in-place-0.25",
    ]
    assert (rows["baseline"]["lr"], rows["baseline-lr0.001"]["lr"]) == (0.003, 0.001)
    assert rows["baseline"]["val_loss"] != rows["baseline-lr0.001"]["val_loss"]
    flops = rows["baseline"]["flops"]
    assert rows["baseline"]["phases"] == [
        {"name": "train-2n", "layers": 4, "steps": 12, "flops": flops, "flops_per_step": flops / 12}
    ]
    for label, row in rows.items():
        # The budget is spent, never exceeded, and each arm ends in the 2n-layer model.
        assert budget - step_flops < row["flops"] <= budget * (1 + 1e-9), label
        assert row["phases"][-1]["layers"] == 4, label
    assert [p["layers"] for p in rows["distill-expand-0.25-0.25"]["phases"]] == [4, 2, 4]
    assert [p["layers"] for p in rows["stacking"]["phases"]] == [2, 4]
    # The restart-only control: distill-expand's phase boundaries, 2n layers throughout.
    restart, dx_phases = (
        rows["restart-only-0.25-0.25"]["phases"],
        rows["distill-expand-0.25-0.25"]["phases"],
    )
    assert [p["layers"] for p in restart] == [4, 4, 4]
    assert restart[0] == dx_phases[0]
    assert restart[1]["flops_per_step"] == restart[0]["flops_per_step"] == flops / 12
    assert dx_phases[1]["flops_per_step"] != restart[1]["flops_per_step"]
    # Each phase starts where the previous one stopped in the seed's data order.
    dx = tmp_path / "dx" / "seed-0"
    steps = [p["steps"] for p in rows["distill-expand-0.25-0.25"]["phases"]]
    offsets = [
        yaml.safe_load((folder / "config.yaml").read_text())["train"]["data_offset"]
        for folder in (
            dx / "train-2n-0.25",
            dx / "distill-expand-0.25-0.25" / "distill-n",
            dx / "distill-expand-0.25-0.25" / "train-2n",
        )
    ]
    assert offsets == [0, steps[0], steps[0] + steps[1]]
    # The 2n-layer phase of f_train = 0.25 is one run shared by distill- and shrink-expand.
    assert "shrink-expand-0.25/train-2n/seed-0: finished before, reusing" in capsys.readouterr().out
    shrink = yaml.safe_load((dx / "shrink-expand-0.25" / "train-2n" / "config.yaml").read_text())
    assert shrink["teacher"]["path"] == str(dx / "train-2n-0.25" / "model")
    assert shrink["model"]["grow"] == {"kind": "top", "layers": 2, "identity": True}
    # Its control re-initialises the dropped layers in place: kept 0, 2 with new ones between.
    reset = yaml.safe_load((dx / "reset-in-place-0.25" / "train-2n" / "config.yaml").read_text())
    assert reset["model"]["grow"] == {"kind": "interleave", "layers": 2, "identity": True}
    assert reset["model"]["init_from_teacher"] == shrink["model"]["init_from_teacher"]
    assert [p["layers"] for p in rows["reset-in-place-0.25"]["phases"]] == [4, 4]
    curve = rows["baseline"]["runs"][0]["curve"]
    assert [round(x / step_flops) for x, _ in curve] == [2, 4, 6, 8, 10, 12]
    for name in ("distill-expand.md", "distill-expand.json", "final_loss.png", "loss_vs_flops.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    table = (tmp_path / "results" / "distill-expand.md").read_text()
    assert "Best at B" in table and "| 1.00 → " in table  # each phase's step cost vs 2n


def test_bad_distill_expand_configs_are_one_line(tmp_path):
    config = tmp_path / "dx.yaml"
    config.write_text(
        "budget_flops: 1.0e12\nmodel: {preset: tiny, overrides: {num_hidden_layers: 3}}\n"
    )
    odd = run_cli("experiment", "distill-expand", "--config", str(config))
    assert odd.returncode == 2 and "even number of layers" in odd.stderr
    config.write_text("budget_flops: 1.0e12\nsweep: [[0.6, 0.5]]\n")
    over = run_cli("experiment", "distill-expand", "--config", str(config))
    assert over.returncode == 2 and "f_train + f_distill" in over.stderr
    assert len(over.stderr.strip().splitlines()) == 1


def test_continued_schedule_and_no_distillation_point(corpus, cache_dir, tmp_path):
    from distillery.models import build_model, compute_params

    step_flops = 6 * compute_params(build_model("tiny", 512, {"num_hidden_layers": 4})) * 4 * 32
    cfg = _config(corpus, cache_dir, tmp_path, 8 * step_flops).model_copy(
        update={
            "arms": ["distill-expand", "restart-only"],
            "sweep": [(0.25, 0.0), (0.25, 0.25)],
            "continue_schedule": True,
            "baseline_lrs": [],
        }
    )
    rows = distill_expand(cfg)["rows"]
    # f_distill = 0: distill-expand is shrink-expand (2n, then n grown), restart-only one restart
    assert [p["layers"] for p in rows["distill-expand-0.25-0"]["phases"]] == [4, 4]
    assert [p["layers"] for p in rows["restart-only-0.25-0"]["phases"]] == [4, 4]
    dx = tmp_path / "dx" / "seed-0"
    assert (dx / "shrink-expand-0.25" / "train-2n" / "summary.json").is_file()

    def window(folder):
        return yaml.safe_load((folder / "config.yaml").read_text())["train"]["schedule_slice"]

    # Each phase is its slice of one schedule over B: they tile [0, 1] in order.
    phases = [dx / "train-2n-0.25", dx / "distill-expand-0.25-0.25" / "distill-n",
              dx / "distill-expand-0.25-0.25" / "train-2n"]  # fmt: skip
    slices = [window(f) for f in phases]
    assert slices[0] == [0.0, 0.25] and slices[-1][1] == 1.0
    assert all(a[1] >= b[0] > a[0] for a, b in itertools.pairwise(slices))
    table = (tmp_path / "results" / "distill-expand.md").read_text()
    grow_only = table.split("against growing without distilling")[1].splitlines()
    assert [r for r in grow_only if r.startswith("| 0.25 | 0.25 | restart |")]  # the paired row


def test_carried_moments_make_restart_only_plain_training(corpus, cache_dir, tmp_path):
    """With one schedule over B and AdamW's moments carried, restart-only's phases are one
    uninterrupted run: its final loss is the baseline's; restarting the moments changes it.
    Distill-expand carries through the shrink and the growth (each phase but the last leaves
    its moments for the next)."""
    from distillery.engine.moments import MOMENTS_FILE
    from distillery.models import build_model, compute_params

    step_flops = 6 * compute_params(build_model("tiny", 512, {"num_hidden_layers": 4})) * 4 * 32
    cfg = _config(corpus, cache_dir, tmp_path, 8 * step_flops).model_copy(
        update={
            "arms": ["baseline", "distill-expand", "restart-only"],
            "continue_schedule": True,
            "baseline_lrs": [0.001],
            "swept_lrs": [0.001],  # the swept arms at the other baseline's lr only
            "optimizer": ["restart", "carry"],
        }
    )
    result = distill_expand(cfg)
    rows = result["rows"]
    assert sorted(rows) == sorted(
        ["baseline", "baseline-lr0.001"]
        + [f"{arm}-0.25-0.25-lr0.001{tail}" for arm in ("distill-expand", "restart-only")
           for tail in ("", "-carry")]
    )  # fmt: skip
    base = rows["baseline-lr0.001"]["val_loss"]["mean"]
    carried_gap = abs(rows["restart-only-0.25-0.25-lr0.001-carry"]["val_loss"]["mean"] - base)
    restarted_gap = abs(rows["restart-only-0.25-0.25-lr0.001"]["val_loss"]["mean"] - base)
    print(f"gap to the baseline: carried {carried_gap:.2e}, restarted {restarted_gap:.2e}")
    assert carried_gap < 1e-5 and restarted_gap > 1e-4
    assert rows["distill-expand-0.25-0.25-lr0.001-carry"]["optimizer"] == "carry"
    dx = tmp_path / "dx" / "seed-0"
    carried = dx / "distill-expand-0.25-0.25-lr0.001-carry"
    assert (dx / "train-2n-0.25-lr0.001-carry" / MOMENTS_FILE).is_file()
    assert (carried / "distill-n" / MOMENTS_FILE).is_file()
    assert not (carried / "train-2n" / MOMENTS_FILE).exists()
    assert not (dx / "train-2n-0.25-lr0.001" / MOMENTS_FILE).exists()  # restarted: none
    table = (tmp_path / "results" / "distill-expand.md").read_text()
    assert "AdamW's moments carried across the phase boundaries" in table


def test_tuned_rows_each_run_at_their_own_best_grid_point(corpus, cache_dir, tmp_path):
    """``tune``: every row trains the lr × warmup grid on the tuning seed, then runs its
    reported seeds at the point with the lowest validation loss, in that setting's folder
    (the baseline only: every arm goes through the same ``_tuned``; 7 runs)."""
    import json

    import pytest
    from pydantic import ValidationError

    from distillery.models import build_model, compute_params
    from distillery.recipes.tuning import Tuning

    step_flops = 6 * compute_params(build_model("tiny", 512, {"num_hidden_layers": 4})) * 4 * 32
    tune = Tuning(lrs=[1e-4, 1e-3, 1e-2], warmups=[1, 3], seed=7)
    cfg = _config(corpus, cache_dir, tmp_path, 8 * step_flops).model_copy(
        update={
            "arms": ["baseline"],
            "continue_schedule": True,
            "baseline_lrs": [],
            "tune": tune,
            "optimizer": ["carry"],
        }
    )
    rows = distill_expand(cfg)["rows"]
    assert list(rows) == ["baseline"]
    dx = tmp_path / "dx"
    for label, row in rows.items():
        grid = row["tuning"]["grid"]
        assert [(g["lr"], g["warmup_steps"]) for g in grid] == [
            (lr, w) for lr in tune.lrs for w in tune.warmups
        ]
        best = min(grid, key=lambda g: g["val_loss"])
        assert (row["lr"], row["warmup_steps"]) == (best["lr"], best["warmup_steps"])
        setting = f"lr-{best['lr']:g}-warmup-{best['warmup_steps']}"
        tuning_run = dx / "tune" / setting / "seed-7" / label
        summary = json.loads((tuning_run / "summary.json").read_text())
        assert summary["val_loss"] == best["val_loss"]  # the grid is the tuning runs' own loss
        config = (dx / setting / "seed-0" / label / "config.yaml").read_text()
        train = yaml.safe_load(config)["train"]
        assert (train["lr"], train["warmup_steps"], train["seed"]) == (
            best["lr"], best["warmup_steps"], 0,
        )  # fmt: skip
    table = (tmp_path / "results" / "distill-expand.md").read_text()
    assert "Tuning (validation loss at B on seed 7" in table
    chosen = [line for line in table.splitlines() if line.startswith("| baseline")][-1]
    assert chosen.count("**") == 2 and f"**{best['val_loss']:.3f}**" in chosen  # tuning table
    with pytest.raises(ValidationError, match="replaces baseline_lrs"):
        DistillExpandConfig.model_validate({**cfg.model_dump(), "baseline_lrs": [1e-3]})
    with pytest.raises(ValidationError, match="is a reported seed"):
        DistillExpandConfig.model_validate({**cfg.model_dump(), "seeds": [0, 7]})
    with pytest.raises(ValidationError, match="first 6 significant digits"):
        Tuning(lrs=[1e-3, 1.0000001e-3, 2e-3], warmups=[1, 3])


def test_tuned_rows_pair_across_their_own_lrs():
    """The report pairs tuned rows whatever lr each chose: distill-expand against its
    grow-only control and the best baseline, the lr column saying "tuned"."""
    from distillery.recipes.distill_expand_report import expand_markdown

    def row(arm, f_distill, lr, warmup, losses):
        grid = [{"lr": lr, "warmup_steps": warmup, "val_loss": 3.0},
                {"lr": 2 * lr, "warmup_steps": warmup, "val_loss": 3.1},
                {"lr": 4 * lr, "warmup_steps": warmup, "val_loss": 3.2}]  # fmt: skip
        mean = sum(losses) / len(losses)
        return {
            "arm": arm, "lr": lr, "warmup_steps": warmup, "optimizer": "carry",
            "f_train": None if arm == "baseline" else 0.1, "f_distill": f_distill,
            "val_loss": {"mean": mean, "std": 0.01}, "val_ppl": {"mean": 40.0, "std": 0.1},
            "flops": 1.0, "phases": [{"layers": 4, "steps": 10, "flops_per_step": 0.1}],
            "tuning": {"grid": grid, "lr": lr, "warmup_steps": warmup, "lr_at_edge": True,
                       "seed": 1000},
            "runs": [{"seed": s, "val_loss": v} for s, v in enumerate(losses)],
        }  # fmt: skip

    rows = {
        "baseline": row("baseline", None, 4e-3, 300, [3.50, 3.52, 3.54]),
        "distill-expand-0.1-0.15-carry": row("distill-expand", 0.15, 2e-3, 150, [3.40, 3.43, 3.43]),
        "shrink-expand-0.1-carry": row("distill-expand", 0.0, 1e-3, 300, [3.45, 3.46, 3.49]),
        "reset-in-place-0.1-carry": row("reset-in-place", None, 4e-3, 150, [3.47, 3.50, 3.50]),
    }
    result = {"hardware": "cpu", "seeds": [0, 1, 2], "budget_flops": 1.0, "layers": 4,
              "rows": rows, "config": {"train": {"warmup_steps": 20}}}  # fmt: skip
    table = expand_markdown(result)
    # Δ to the grow-only control: −0.05, −0.03, −0.06 (mean −0.047), paired across lrs
    assert "| 0.1 | 0.15 | carry | tuned | -0.047 [" in table
    assert "| distill-expand-0.1-0.15-carry | 0.002 | 150 |" in table
    # Grown on top − reset in place: −0.02, −0.04, −0.01 (mean −0.023), paired across lrs
    on_top = table.split("re-initialised in place")[1]
    assert "| 0.1 | 0 | carry | tuned | -0.023 [" in on_top
    assert "| baseline † | **3.000** | 3.100 | 3.200 |" in table
