"""``distillery ablate``: every arm × seed runs, the table is written, finished runs are reused."""

from __future__ import annotations

import json

from distillery.config import build_config
from distillery.recipes.ablate import AblationConfig, ablate
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
    assert arms["full"]["objectives"] == "5·forward_kl + 2·ce + 1·hidden_cosine"
    assert arms["no-cosine"]["objectives"] == "5·forward_kl + 2·ce"
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
    table = (tmp_path / "results" / "ablation.md").read_text()
    assert table.count("\n| ") == 4 and "± " in table
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
