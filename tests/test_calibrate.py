"""``distillery calibrate`` end to end on tiny models: every predictor, its cost, the files."""

from __future__ import annotations

import json
import re
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
        # Two tables (mean ± std over seeds; bootstrap intervals), a header and a row each.
        table = (folder / "tiny-classify.md").read_text()
        assert table.count("\n| ") == 2 * (1 + len(PREDICTORS))
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


def transfer_study(corpus: Path, cache_dir: Path, tmp_path: Path) -> dict:
    """Held-out transfer set, students at T ∈ {1, 4}, early-stopped members: all tiny."""
    raw = tiny_calibrate(corpus, cache_dir, tmp_path, "classify")
    raw["data"] |= {"val_fraction": 0.1, "test_fraction": 0.1, "transfer_fraction": 0.2}
    raw |= {
        "name": "tiny-transfer",
        "transfer": "heldout",
        "distill_temperatures": [1.0, 4.0],
        "member_stage": {"eval_every": 1, "patience": 1, "max_steps": 3, "eval_batches": 1},
        "train": {
            "steps": 2,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 1,
            "eval_batches": 2,
            "generation_tokens": 0,
            "draft_prompts": 0,
        },
        "eval_batches": 1,
        "temperature_batches": 1,
        "bootstrap_samples": 200,
        "results": None,  # the tables and plots once, in out
    }
    return raw


def test_transfer_windows_are_not_the_members_training_windows(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    from distillery.data import load_documents, split_documents
    from distillery.distributed import DistEnv
    from distillery.recipes.calibrate import run_configs
    from distillery.recipes.common import prepare_data

    raw = transfer_study(corpus, cache_dir, tmp_path)
    raw["data"]["task"] = "lm"
    cfg = CalibrateConfig.model_validate(raw)
    configs = run_configs(cfg, 0)
    member, student = configs["member1"].data, configs["student-ensemble-T4"].data
    assert (member.train_split, student.train_split) == ("train", "transfer")
    # Articles: the transfer split is carved from the training articles; val and test stay.
    docs = load_documents(str(corpus))
    plain = split_documents(docs, 0.1, 0.1)
    held = split_documents(docs, 0.1, 0.1, transfer_fraction=0.2)
    assert held["val"] == plain["val"] and held["test"] == plain["test"]
    assert held["transfer"] and not set(held["transfer"]) & set(held["train"])
    assert sorted(held["train"] + held["transfer"]) == sorted(plain["train"])
    # Windows: what the members train on and what the students are distilled on.
    _, members = prepare_data(member, DistEnv(), splits=("train",))
    _, students = prepare_data(student, DistEnv(), splits=("train",))
    assert members.identity != students.identity
    windows = {tuple(b) for b in members.blocks(range(members.num_blocks)).tolist()}
    transfer = {tuple(b) for b in students.blocks(range(students.num_blocks)).tolist()}
    assert students.num_blocks > 0 and not windows & transfer


def test_calibrate_transfer_temperatures_and_early_stopped_members(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    cfg = CalibrateConfig.model_validate(transfer_study(corpus, cache_dir, tmp_path))
    result = calibrate(cfg)
    rows = result["rows"]
    students = [f"student ← {t} (T={k})" for t in ("ensemble", "MC dropout") for k in ("1", "4")]
    assert list(rows) == [*PREDICTORS[:4], *students]
    # The temperature arms are separate students with separate predictions.
    for teacher in ("ensemble", "MC dropout"):
        cold, hot = rows[f"student ← {teacher} (T=1)"], rows[f"student ← {teacher} (T=4)"]
        assert cold["nll"]["mean"] != hot["nll"]["mean"]
    saved = tmp_path / "runs" / "seed0" / "student-ensemble-T4" / "config.yaml"
    assert "temperature: 4.0" in saved.read_text()
    # Early-stopped members record where they stopped; students read the held-out blocks.
    for i in range(2):
        member = result["training"]["0"][f"member{i}"]
        assert member["best_step"] in (1, 2, 3) and member["stopped"] in ("patience", "cap")
        assert member["steps_trained"] >= member["best_step"]
    assert 0 < result["train_blocks"]["students"] < result["train_blocks"]["members"]
    # Bootstrap: the interval holds the point estimate (the seed mean of the plain metric).
    for name, row in rows.items():
        for metric in ("ece", "nll", "brier"):
            iv = row["bootstrap"][metric]
            assert iv["mean"] == pytest.approx(row[metric]["mean"])
            assert iv["low"] <= iv["mean"] <= iv["high"], (name, metric)
            if name != "single":
                paired = row["bootstrap_vs_single"][metric]
                assert paired["mean"] == pytest.approx(row[f"{metric}_vs_single"]["mean"])
    table = (tmp_path / "runs" / "tiny-transfer.md").read_text()
    assert "| student ← ensemble (T=4) |" in table and "Desai & Durrett" in table
    assert "held out of the training articles" in table


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"transfer": "heldout"}, "transfer: heldout needs data.transfer_fraction > 0"),
        ({"data": {"transfer_fraction": 0.2}}, "transfer: heldout needs data.transfer_fraction"),
        ({"data": {"train_split": "transfer", "transfer_fraction": 0.2}}, "data.train_split:"),
        ({"data": {"train_split": "transfer"}}, "train_split=transfer needs transfer_fraction"),
        ({"member_stage": {"seeds": [0]}}, "member_stage.seeds: the members' seeds come from"),
        ({"distill_temperatures": [2.0, 2.0]}, "give each temperature once"),
        (
            {"distill_temperatures": [2.0], "distill_objectives": [{"kind": "ce"}]},
            "no objective in distill_objectives has one",
        ),
    ],
)
def test_transfer_temperature_and_stage_config_errors(override: dict, message: str):
    from pydantic import ValidationError

    raw = {"data": {"val_fraction": 0.1, "test_fraction": 0.1}}
    raw["data"] |= override.pop("data", {})
    with pytest.raises(ValidationError, match=re.escape(message)):
        CalibrateConfig.model_validate(raw | override)


def test_a_heldout_transfer_without_a_fraction_is_a_one_line_error(tmp_path: Path):
    result = run_cli("calibrate", "transfer=heldout", f"--out={tmp_path / 'x'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "distillery: error: invalid config: transfer: heldout needs data.transfer_fraction > 0, "
        "and only it uses one"
    ]
