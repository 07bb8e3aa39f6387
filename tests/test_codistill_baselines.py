"""The codistillation study's baselines: one model on all the data, synchronous data-parallel
(DDP under torchrun, gloo), and steps and seconds to a target loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from distillery.config import RunConfig, build_config
from distillery.recipes.codistill_baselines import (
    all_data_config,
    baselines_markdown,
    baselines_summary,
    data_parallel_config,
    reach,
    timed_curve,
)
from distillery.recipes.codistill_study import CodistillStudyConfig, _pool_config
from tests.conftest import run_cli


def study(corpus: Path, cache_dir: Path, tmp_path: Path, *overrides: str) -> CodistillStudyConfig:
    base = {
        "data": {"source": str(corpus), "seq_len": 32, "vocab_size": 512,
                 "cache_dir": str(cache_dir)},
        "model": {"preset": "tiny"},
        "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3,
                  "eval_batches": 2, "log_every": 1, "checkpoint_every": 0, "tensorboard": False},
        "arms": ["all-data", "data-parallel"],
        "out": str(tmp_path / "runs"),
    }  # fmt: skip
    return build_config(CodistillStudyConfig, None, list(overrides), base=base)


def test_seconds_and_steps_to_target_on_a_hand_made_curve(tmp_path: Path):
    records = [
        {"step": 2, "loss": 6.0, "tokens": 256, "tokens_per_s": 128.0},  # 2 s
        {"step": 2, "val_loss": 5.0},
        {"step": 4, "loss": 5.0, "tokens": 512, "tokens_per_s": 64.0},  # +4 s
        {"step": 4, "val_loss": 4.0},
        {"step": 6, "loss": 4.0, "tokens": 768, "tokens_per_s": 256.0},  # +1 s
        {"step": 6, "val_loss": 3.5, "final": True},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = timed_curve(tmp_path)
    assert curve == [(2, 2.0, 5.0), (4, 6.0, 4.0), (6, 7.0, 3.5)]
    assert reach(curve, 4.0) == (4, 6.0)  # at or below
    assert reach(curve, 4.5) == (4, 6.0)
    assert reach(curve, 9.0) == (2, 2.0)
    assert reach(curve, 3.5) == (6, 7.0)
    assert reach(curve, 3.0) == (None, None)


def test_rows_against_the_target_and_paired_with_data_parallel(corpus, cache_dir, tmp_path):
    cfg = study(corpus, cache_dir, tmp_path, "arms=[all-data,data-parallel,checkpoints]")

    def run(loss: float, curve: list, pool: int, batch: int, **peer: int) -> dict:
        """A finished run's record as the study keeps it: (step, seconds, loss) curve."""
        return {"model": "model", "layers": 2, "pool": pool, "processes": pool, "threads": 1,
                "batch": batch, "val_loss": loss, "seconds": curve[-1][1], "timed": curve,
                **peer}  # fmt: skip

    per_seed = []
    for seed, shift in ((0, 0.0), (1, 0.1), (2, 0.05)):
        alone = run(4.0 + shift, [(2, 5.0, 4.5 + shift), (4, 10.0, 4.0 + shift)], 1, 4)
        dp = run(3.8 + shift, [(2, 8.0, 3.9 + shift), (4, 16.0, 3.8 + shift)], 2, 8)
        peers = [run(4.2 + shift, [(2, 6.0, 4.4 + shift), (4, 12.0, 4.2 + shift)], 2, 4, peer=i)
                 for i in (0, 1)]  # fmt: skip
        baselines = {"all-data": alone, "data-parallel-2": dp}
        per_seed.append({"seed": seed, "baselines": baselines, "arms": {"checkpoints": peers}})
    result = baselines_summary(cfg, per_seed)
    assert result is not None
    assert result["targets"] == {0: 4.0, 1: 4.1, 2: 4.05}  # each seed's all-data final loss
    rows = {(r["arm"], r["peer"]): r for r in result["rows"]}
    assert rows[("all-data", None)]["steps_to_target"] == [4, 4, 4]
    assert rows[("all-data", None)]["seconds_to_target"] == [10.0, 10.0, 10.0]
    assert rows[("data-parallel-2", None)]["steps_to_target"] == [2, 2, 2]
    assert rows[("data-parallel-2", None)]["seconds_to_target"] == [8.0, 8.0, 8.0]
    assert rows[("data-parallel-2", None)]["against"] is None
    assert rows[("checkpoints", 0)]["steps_to_target"] == [None, None, None]
    assert rows[("checkpoints", 0)]["reached"] == 0
    # Paired by seed against data-parallel ×2: the peer is worse by 0.4 at every seed.
    delta = rows[("checkpoints", 0)]["delta_val_loss"]
    assert delta["interval"]["n"] == 3 and delta["interval"]["mean"] == pytest.approx(0.4)
    assert delta["text"].startswith("worse")
    assert rows[("checkpoints", 0)]["delta_seconds_to_target"] is None  # never reached it
    seconds = rows[("all-data", None)]["delta_seconds_to_target"]
    assert seconds["interval"]["mean"] == pytest.approx(2.0) and seconds["interval"]["n"] == 3
    table = baselines_markdown(result)
    assert "1 process × 1 thread, 2 processes × 1 thread on" in table
    assert "| data-parallel-2 | – | 2 × 1 | 8 |" in table


def test_pool_size_four_and_data_parallel_batch(corpus, cache_dir, tmp_path):
    cfg = study(corpus, cache_dir, tmp_path, "peers=[2,4]", "arms=[all-data,data-parallel,unequal]")
    assert cfg.peers == [2, 4]
    pool = _pool_config(cfg, "unequal", 0, tmp_path / "p", 4)
    assert len(pool.peers) == 4 and pool.peers[0] == cfg.model and pool.peers[3] == cfg.small
    for n in cfg.peers:
        dp = data_parallel_config(cfg, n, 1, tmp_path / "dp")
        assert dp.train.batch_size == n * cfg.train.batch_size and dp.train.parallel == "ddp"
        assert dp.train.seed == 1 and dp.data == cfg.data and dp.train.steps == 3
    assert all_data_config(cfg, 1, tmp_path / "a").train.batch_size == cfg.train.batch_size


def test_all_data_arm_reads_every_training_block(corpus, cache_dir, tmp_path, monkeypatch):
    from distillery.data import PackedTokens, global_batch_indices
    from distillery.distributed import DistEnv
    from distillery.recipes.common import prepare_data
    from distillery.recipes.run import run

    cfg = study(corpus, cache_dir, tmp_path)
    _, train, _ = prepare_data(cfg.data, DistEnv())
    read: list[np.ndarray] = []
    original = PackedTokens.examples

    def spy(self, indices, draw=0):
        if self._split == "train":
            read.append(np.asarray(indices))
        return original(self, indices, draw)

    monkeypatch.setattr(PackedTokens, "examples", spy)
    run(all_data_config(cfg, 0, tmp_path / "all-data"))
    # The engine's global batches over the whole split, not a peer's shard (every n-th block).
    expected = [global_batch_indices(train.num_blocks, s, 4, 0) for s in range(3)]
    assert [r.tolist() for r in read] == [e.tolist() for e in expected]
    seen = np.concatenate(read)
    assert len(set((seen % 2).tolist())) == 2 and seen.max() >= train.num_blocks // 2


def test_study_with_baselines_under_torchrun(corpus, cache_dir, tmp_path):
    """all-data, data-parallel ×2 (gloo) and a checkpoints pool through the CLI; the
    data-parallel run is one process's run on the same global batch and data order."""
    from distillery.recipes.run import run

    result = run_cli(
        "experiment", "codistill", "--quick", f"--out={tmp_path / 'runs'}",
        f"data.source={corpus}", "data.seq_len=32", "data.vocab_size=512",
        f"data.cache_dir={cache_dir}", "model.preset=tiny", "train.steps=4",
        "train.batch_size=4", "train.eval_every=2", "train.log_every=1", "train.eval_batches=2",
        "train.tensorboard=false", "exchange.every=2", "arms=[all-data,data-parallel,checkpoints]",
        f"results={tmp_path / 'results'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "results" / "codistill.json").read_text())
    rows = {(r["arm"], r["peer"]): r for r in saved["baselines"]["rows"]}
    assert set(rows) == {("all-data", None), ("data-parallel-2", None), ("checkpoints", 0),
                         ("checkpoints", 1)}  # fmt: skip
    alone = saved["per_seed"][0]["baselines"]["all-data"]["timed"]
    target = saved["baselines"]["targets"]["0"]  # the all-data model's final loss
    assert alone[-1][2] == target and rows[("all-data", None)]["steps_to_target"][0] is not None
    assert rows[("data-parallel-2", None)]["batch"] == 8
    assert rows[("checkpoints", 0)]["delta_val_loss"]["interval"]["n"] == 1
    seed = saved["per_seed"][0]
    for run_ in [*seed["baselines"].values(), *seed["arms"]["checkpoints"]]:
        secs = [p[1] for p in run_["timed"]]
        assert [p[0] for p in run_["timed"]] == [2, 4] and 0 < secs[0] < secs[1]
    table = (tmp_path / "results" / "codistill.md").read_text()
    assert (
        "## Against one model on all the data" in table and "| checkpoints | 0 (model) |" in table
    )
    # data-parallel: 2 processes, global batch 2 × 4; the same as one process on that batch.
    folder = tmp_path / "runs" / "seed0" / "data-parallel-2"
    dp = RunConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    assert dp.train.batch_size == 8 and dp.train.parallel == "ddp"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["world_size"] == 2
    one = run(dp.model_copy(update={"out": tmp_path / "one"}))
    records = [
        [json.loads(x) for x in (d / "metrics.jsonl").open()] for d in (folder, tmp_path / "one")
    ]
    losses = [[r["loss"] for r in run_records if "loss" in r] for run_records in records]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert summary["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
