"""The heterogeneous codistillation study: unequal peers as separate pinned processes, a slowed
worker, a kill-and-rejoin, reuse of finished arms, and the config's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillery.config import CodistillConfig, build_config
from distillery.errors import DistilleryError
from distillery.recipes.codistill_hetero import PIN, CodistillHeteroConfig, codistill_hetero

STEPS, DELAY = 12, 0.2


def study(corpus: Path, cache_dir: Path, tmp_path: Path, *overrides: str) -> CodistillHeteroConfig:
    cores = sorted(os.sched_getaffinity(0))
    base = {
        "data": {"source": str(corpus), "seq_len": 32, "vocab_size": 512,
                 "cache_dir": str(cache_dir)},
        # peer 0: 2 layers, slowed and killed; peer 1: a smaller, undelayed one
        "peers": [{"preset": "tiny"}, {"preset": "tiny", "overrides": {"num_hidden_layers": 1}}],
        "delays": [DELAY, 0.0],
        "cores": [[cores[0]], [cores[-1]]],
        "train": {"steps": STEPS, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 4, "eval_batches": 2, "log_every": 4, "checkpoint_every": 4,
                  "tensorboard": False},
        "exchange": {"mode": "checkpoints", "every": 4, "burn_in": 4},
        "rejoin": {"peer": 0, "at_step": 4, "pause": 0.2},
        "seeds": [0],
        "out": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
    }  # fmt: skip
    return build_config(CodistillHeteroConfig, None, list(overrides), base=base)


def test_a_slowed_killed_peer_rejoins_and_the_study_is_reused(corpus, cache_dir, tmp_path, capsys):
    cfg = study(corpus, cache_dir, tmp_path)
    result = codistill_hetero(cfg)
    runs = tmp_path / "runs" / "seed0"
    arms = {p.name.split("-")[0]: p for p in runs.iterdir()}
    assert set(arms) == {"solo", "pool"}
    for arm in arms.values():
        for i in (0, 1):
            summary = json.loads((arm / f"peer{i}" / "summary.json").read_text())
            assert summary["finished"] and summary["steps"] == STEPS
    assert json.loads((arms["solo"] / "peer0" / "summary.json").read_text())["bytes_sent"] == 0
    # (the fast peer may finish before the slow one publishes; the slow one learns from it)
    assert json.loads((arms["pool"] / "peer0" / "summary.json").read_text())["loaded"] >= 1

    # The kill-and-rejoin: resumed from a checkpoint inside the run, no step logged twice.
    (rejoin,) = result["rejoins"]
    assert rejoin["peer"] == 0 and 0 < rejoin["resumed_from"] < STEPS
    assert rejoin["downtime"] >= 0.2
    records = [json.loads(x) for x in (arms["pool"] / "peer0" / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS

    # The slowed worker: its sleeps are in its wall-clock, pool and alone.
    slow, fast = result["per_seed"][0]["peers"]
    for key in ("seconds", "solo_seconds"):
        assert slow[key] >= 0.8 * STEPS * DELAY
        assert slow[key] - fast[key] >= 0.8 * STEPS * DELAY  # (and it is the larger model)
    assert slow["steps_per_second"] < fast["steps_per_second"]
    assert slow["process_seconds"] > rejoin["downtime"] + slow["seconds"] * 0.8

    # The written table: the paired fields, the setup read from the config.
    for folder in (tmp_path / "runs", tmp_path / "results"):
        saved = json.loads((folder / "codistill-hetero.json").read_text())
        md = (folder / "codistill-hetero.md").read_text()
        assert (folder / "codistill-hetero.png").is_file()
        row = saved["rows"][0]
        assert row["delta_val_loss"]["interval"]["n"] == 1 and row["delta_val_loss"]["text"]
        assert row["val_loss"]["mean"] == pytest.approx(slow["val_loss"])
        assert row["delay"] == DELAY and row["threads"] == 1
        assert "Kill-and-rejoin" in md and "Slowed worker: peer 0" in md
        assert f"resumed from step {rejoin['resumed_from']}" in md

    # A second call reuses both finished arms: nothing relaunched.
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")}
    capsys.readouterr()
    again = codistill_hetero(cfg)
    assert capsys.readouterr().out.count("finished before, reusing") == 2
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")} == stamps
    assert again["rows"][0]["val_loss"] == result["rows"][0]["val_loss"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("delays=[0.1]", r"delays: give one per peer \(2 peers, 1 delays\)"),
        ("delays=[0.1,-1]", r"delays\.1"),
        ("cores=[[0]]", r"cores: give one list per peer"),
        ("train.checkpoint_every=0", r"rejoin needs train\.checkpoint_every > 0"),
        ("rejoin.at_step=6", r"rejoin\.at_step=6: give a multiple of train\.checkpoint_every"),
        ("rejoin.peer=2", r"rejoin\.peer=2: the peers are 0\.\.1"),
        ("exchange.mode=predictions", r"exchange\.mode=predictions: .* published weights"),
    ],
)
def test_the_study_config_refuses_what_it_cannot_run(
    corpus, cache_dir, tmp_path, override, message
):
    with pytest.raises(DistilleryError, match=message):
        study(corpus, cache_dir, tmp_path, override)


def test_cores_not_on_this_machine_are_refused_before_anything_runs(corpus, cache_dir, tmp_path):
    cfg = study(corpus, cache_dir, tmp_path, f"cores=[[0],[{os.cpu_count() + 7}]]")
    with pytest.raises(DistilleryError, match=r"cores\.1: core\(s\) \[\d+\] are not available"):
        codistill_hetero(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_peer_config_checks_its_delays():
    peers = {"peers": [{"preset": "tiny"}, {"preset": "tiny"}]}
    with pytest.raises(DistilleryError, match=r"delays: give one per peer \(2 peers, 3 delays\)"):
        build_config(CodistillConfig, overrides=["delays=[0,0,1]"], base=peers)
    assert build_config(CodistillConfig, overrides=["delays=[0,0.5]"], base=peers).delays == [
        0,
        0.5,
    ]


def test_the_pinning_stub_runs_the_command_on_exactly_its_cores():
    core = max(os.sched_getaffinity(0))
    show = "import os; print(sorted(os.sched_getaffinity(0)))"
    cmd = [sys.executable, "-c", PIN, str(core), sys.executable, "-c", show]
    assert subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip() == (
        f"[{core}]"
    )
