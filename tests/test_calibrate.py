"""``distillery calibrate`` end to end on tiny models: every predictor, its cost, the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.recipes.calibrate import PREDICTORS, CalibrateConfig, calibrate
from tests.conftest import run_cli


def tiny_calibrate(corpus: Path, cache_dir: Path, tmp_path: Path, task: str) -> dict:
    return {
        "name": f"tiny-{task}",
        "seeds": [0],
        "members": 2,
        "mc_samples": 2,
        "data": {
            "task": task,
            "source": str(corpus),
            "seq_len": 32,
            "vocab_size": 512,
            "val_fraction": 0.15,
            "test_fraction": 0.15,
            "cache_dir": str(cache_dir),
        },
        "model": {"preset": "tiny", "dropout": 0.1},
        "train": {"steps": 4, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1},
        "eval_batches": 3,
        "temperature_batches": 2,
        "out": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
    }


def test_calibrate_classification_end_to_end(corpus: Path, cache_dir: Path, tmp_path: Path, capsys):
    cfg = CalibrateConfig.model_validate(tiny_calibrate(corpus, cache_dir, tmp_path, "classify"))
    result = calibrate(cfg)
    rows = result["rows"]
    assert list(rows) == list(PREDICTORS)
    assert [rows[n]["passes"] for n in PREDICTORS] == [1, 1, 2, 2, 1, 1]
    for name, row in rows.items():
        for key in ("accuracy", "ece", "ece_mass", "mce", "macro_f1"):
            assert 0.0 <= row[key]["mean"] <= 1.0, (name, key)
        assert row["nll"]["mean"] > 0 and 0 <= row["brier"]["mean"] <= 2
    # Temperature scaling changes confidence, never the top-1 prediction.
    assert rows["single + temperature"]["accuracy"] == rows["single"]["accuracy"]
    assert rows["single + temperature"]["temperatures"][0] > 0
    # Training compute: the ensemble is both members; its student adds its own run on top.
    members = [
        json.loads((tmp_path / "runs" / "seed0" / f"member{i}" / "summary.json").read_text())
        for i in range(2)
    ]
    assert rows["deep ensemble"]["train_flops"]["mean"] == pytest.approx(
        sum(m["flops"] for m in members)
    )
    assert (
        rows["student ← ensemble"]["train_flops"]["mean"]
        > rows["deep ensemble"]["train_flops"]["mean"]
    )
    # Every prediction of the test split is counted for each predictor, pooled for the plots.
    for stats in result["reliability"].values():
        assert sum(b["count"] for b in stats["width"]) == result["test_predictions"]
    for folder in (tmp_path / "runs", tmp_path / "results"):
        assert (folder / "tiny-classify.md").read_text().count("\n| ") == 1 + len(PREDICTORS)
        assert (folder / "tiny-classify-reliability.png").stat().st_size > 10_000
        assert json.loads((folder / "tiny-classify.json").read_text())["task"] == "classify"
    # A second call reuses every finished run.
    capsys.readouterr()
    again = calibrate(cfg)
    assert capsys.readouterr().out.count("finished before, reusing") == 4
    assert again["rows"]["single"]["accuracy"] == rows["single"]["accuracy"]


def test_calibrate_next_tokens_through_the_cli(corpus: Path, cache_dir: Path, tmp_path: Path):
    import yaml

    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(tiny_calibrate(corpus, cache_dir, tmp_path, "lm")))
    result = run_cli("calibrate", "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "results" / "tiny-lm.json").read_text())
    assert saved["test_predictions"] == 3 * 16 * 31  # eval_batches × 16 blocks × 31 next tokens
    assert "macro_f1" not in saved["rows"]["single"]
    assert "| deep ensemble | 2 |" in (tmp_path / "results" / "tiny-lm.md").read_text()


def test_calibrate_config_errors_are_one_line(tmp_path: Path):
    result = run_cli("calibrate", "model.dropout=0", f"--out={tmp_path / 'x'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "distillery: error: invalid config: model.dropout: MC dropout needs a model trained with "
        "dropout (> 0)"
    ]
