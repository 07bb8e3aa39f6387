"""Codistillation pools: real processes on gloo, both exchange modes, unequal peers, faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distillery.config import ExchangeSpec
from distillery.data import PackedTokens
from distillery.objectives import forward_kl
from distillery.pool import PeerTeacher, PoolData, Shard
from distillery.teachers import TopK
from tests.conftest import bucketed_kl_rows, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pool_config(corpus: Path, cache_dir: Path, out: Path, **exchange: object) -> dict:
    return {
        "data": {
            "source": str(corpus),
            "seq_len": 32,
            "vocab_size": 512,
            "cache_dir": str(cache_dir),
        },
        "peers": [
            {"preset": "tiny"},
            {"preset": "tiny", "overrides": {"num_hidden_layers": 1}},  # a smaller, faster peer
            {"preset": "tiny"},
        ],
        "train": {
            "steps": 40,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 2,
            "checkpoint_every": 4,
            "eval_every": 20,
            "eval_batches": 2,
            "log_every": 4,
            "tensorboard": False,
        },
        "exchange": {"mode": "checkpoints", "every": 4, "burn_in": 2, **exchange},
        "out": str(out),
    }


def peer_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun sets for a worker (each peer here is its own process, not supervised by
    one agent, so that one dying leaves the others running)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def summary(out: Path, peer: int) -> dict:
    return json.loads((out / f"peer{peer}" / "summary.json").read_text())


def test_a_dead_peer_does_not_stop_the_pool_and_rejoins_from_its_checkpoint(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    out = tmp_path / "pool"
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump(pool_config(corpus, cache_dir, out)))
    port = free_port()
    cmd = [sys.executable, "-m", "distillery", "codistill", "--config", str(config)]
    procs = [
        subprocess.Popen(
            cmd, env=peer_env(r, 3, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for r in range(3)
    ]
    first_ckpt = out / "peer1" / "checkpoints" / "step-0000004"
    deadline = time.monotonic() + 240
    while not first_ckpt.is_dir():
        assert procs[1].poll() is None, procs[1].stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "peer 1 never wrote a checkpoint"
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    assert procs[1].wait(timeout=30) == -signal.SIGKILL
    for r in (0, 2):  # the others finish without it
        output = procs[r].communicate(timeout=300)[0].decode()
        assert procs[r].returncode == 0, output[-3000:]
        assert summary(out, r)["steps"] == 40 and summary(out, r)["loaded"] >= 2
    assert not (out / "peer1" / "summary.json").exists()
    killed_at = max(
        int(p.name.removeprefix("step-")) for p in (out / "peer1" / "checkpoints").iterdir()
    )
    assert 4 <= killed_at < 40
    # Restarted alone, it resumes from its own checkpoint and uses the others' last weights.
    result = run_cli("codistill", "--config", str(config), "--peer", "1", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    done = summary(out, 1)
    assert done["steps"] == 40 and done["layers"] == 1 and done["loaded"] == 2
    records = [json.loads(x) for x in (out / "peer1" / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step logged twice
    # Peers 0 and 2 published to the end; the dead peer's last file is from before the kill.
    assert len(list((out / "pool" / "peer0").glob("step-*.safetensors"))) == 2


def test_predictions_mode_pool_of_unequal_peers_under_torchrun(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    out = tmp_path / "pool"
    cfg = pool_config(corpus, cache_dir, out, mode="predictions", every=2, top_k=8)
    cfg["peers"] = cfg["peers"][:2]
    cfg["train"] |= {"steps": 8, "checkpoint_every": 4}
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "distillery",
            "codistill",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    big, small = summary(out, 0), summary(out, 1)
    assert (big["layers"], small["layers"]) == (2, 1)
    from distillery.models import load_pretrained

    for i, layers in ((0, 2), (1, 1)):  # every rank exported its own model
        assert load_pretrained(out / f"peer{i}" / "model").config.num_hidden_layers == layers
    # Exchanges at steps 2, 4, 6 (burn-in 2): each sends B·T·(2k + 1) float32 (log-probs, ids,
    # the left-over mass) and gets the other's.
    payload = 4 * 32 * (2 * 8 + 1) * 4
    for s in (big, small):
        assert s["exchanges"] == 3 and s["steps"] == 8
        assert s["bytes_sent"] == 3 * payload and s["bytes_received"] == 3 * payload
        assert s["wait_seconds"] >= 0.0
    # FLOPs: 6·N per trained token, plus 2·N on exchange steps (the forward it shares).
    tokens = 4 * 32
    n = small["compute_params"]
    assert small["flops"] == pytest.approx(tokens * (8 * 6.0 * n + 3 * 2.0 * n))


def test_shards_split_the_blocks_and_shared_steps_agree(corpus: Path, cache_dir: Path, tmp_path):
    from distillery.config import DataConfig
    from distillery.distributed import DistEnv
    from distillery.recipes.common import prepare_data

    data_cfg = DataConfig(source=str(corpus), seq_len=32, vocab_size=512, cache_dir=cache_dir)
    _, train, _ = prepare_data(data_cfg, DistEnv())
    assert isinstance(train, PackedTokens)
    shards = [Shard(train, i, 3) for i in range(3)]
    together = np.sort(np.concatenate([s.blocks for s in shards]))
    assert together.tolist() == list(range(train.num_blocks))  # disjoint, complete
    a, b = PoolData(train, 0, 2, shared_seed=7), PoolData(train, 1, 2, shared_seed=7)
    assert not torch.equal(a.examples([0, 1])[0], b.examples([0, 1])[0])
    a.shared_step = b.shared_step = 3
    assert torch.equal(a.examples([0, 1])[0], b.examples([5, 9])[0])  # the same shared batch


def test_peer_targets_mean_and_each():
    gen = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 3, 11, generator=gen) for _ in range(2)]
    mean = PeerTeacher(ExchangeSpec(target="mean"), None).combine(z)
    expected = torch.log(torch.stack([x.softmax(-1) for x in z]).mean(0))
    assert torch.allclose(mean, expected, atol=1e-6)
    t = 2.0
    each = PeerTeacher(ExchangeSpec(target="each", temperature=t), None).combine(z)
    softened = torch.stack([(x / t).softmax(-1) for x in z]).mean(0)
    assert torch.allclose((each / t).softmax(-1), softened, atol=1e-6)


def test_gathered_peer_top_k_keeps_the_left_over_mass_as_the_cache_does():
    """A peer's shared top-k is completed like the teacher cache's: the forward KL towards it
    equals the bucketed KL Σ_topk p·log(p/q) + r·log(r/q_rest), written here in float64."""
    gen = torch.Generator().manual_seed(3)
    n, v, k, t = 6, 13, 4, 2.0
    peer, student = torch.randn(n, v, generator=gen), torch.randn(n, v, generator=gen)
    teacher = PeerTeacher(ExchangeSpec(target="each", temperature=t), None)
    teacher.gathered = [TopK.of(peer, k, t)]
    out = teacher.run(torch.zeros(2, 3, dtype=torch.long))
    assert out.logits is None and out.chunk_logits is not None
    z = student.clone().requires_grad_(True)
    mask = torch.ones(n, dtype=torch.bool)
    got = forward_kl(z, out.chunk_logits(slice(None), student), mask, temperature=t)
    z64 = student.double().requires_grad_(True)
    p, q = (peer.double() / t).softmax(-1), (z64 / t).softmax(-1)
    expected = bucketed_kl_rows(p, q, k).sum() * t * t
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    (g,) = torch.autograd.grad(got, z)
    (g64,) = torch.autograd.grad(expected, z64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-7)
    # A student equal to the peer has nothing left to learn from it.
    same = teacher.run(torch.zeros(2, 3, dtype=torch.long)).chunk_logits(slice(None), peer)
    assert float(forward_kl(peer, same, mask, temperature=t)) < 1e-5


def test_launch_errors_are_one_line(corpus: Path, cache_dir: Path, tmp_path: Path):
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump(pool_config(corpus, cache_dir, tmp_path / "out")))
    result = run_cli("codistill", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "distillery: error: codistill needs one process per peer: torchrun --nproc-per-node 3 "
        "-m distillery codistill ..., or start each peer with --peer I"
    ]
    result = run_cli("codistill", "--config", str(config), "--peer", "3")
    assert result.returncode == 2 and "the config has peers 0..2" in result.stderr
    result = run_cli(
        "codistill", "--config", str(config), "--peer", "0", "exchange.mode=predictions"
    )
    assert result.returncode == 2 and "launch the pool with torchrun" in result.stderr
    result = run_cli("codistill", "peers=[{preset: tiny}]", "--peer", "0")
    assert result.returncode == 2 and "peers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_codistill_study_of_an_unequal_pool(corpus: Path, cache_dir: Path, tmp_path: Path):
    from tests.conftest import run_cli as cli

    result = cli(
        "experiment",
        "codistill",
        "--quick",
        f"--out={tmp_path / 'runs'}",
        f"data.source={corpus}",
        "data.seq_len=32",
        "data.vocab_size=512",
        f"data.cache_dir={cache_dir}",
        "model.preset=tiny",
        "small.preset=tiny",
        "small.overrides.num_hidden_layers=1",
        "train.steps=8",
        "train.batch_size=4",
        "train.eval_every=2",
        "train.eval_batches=2",
        "exchange.every=2",
        "arms=[unequal]",
        f"results={tmp_path / 'results'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "results" / "codistill.json").read_text())
    rows = {(r["arm"], r["peer"]): r for r in saved["rows"]}
    assert rows[("unequal", 0)]["layers"] == 2 and rows[("unequal", 1)]["layers"] == 1
    seed = saved["per_seed"][0]["arms"]["unequal"]
    for peer in seed:
        assert [p[0] for p in peer["curve"]] == [2, 4, 6, 8]  # every 2 steps, the final one too
        assert peer["bytes"] > 0  # published and loaded weights
        if peer["steps_to_solo"] is not None:
            assert (
                peer["curve"][[p[0] for p in peer["curve"]].index(peer["steps_to_solo"])][2]
                <= peer["solo_val_loss"]
            )
    assert 0.0 <= saved["churn"]["solo"]["mean"] <= 1.0
    assert (tmp_path / "results" / "codistill.png").stat().st_size > 5000
    assert "| unequal | 1 (small) | 1 |" in (tmp_path / "results" / "codistill.md").read_text()
