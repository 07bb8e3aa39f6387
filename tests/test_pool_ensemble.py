"""``distillery experiment pool-ensemble`` end to end on tiny pools: the ensembles and metrics
recomputed from the models, finished runs reused, bad configs refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distillery.cli import main
from distillery.config import build_config
from distillery.data import IGNORE_INDEX
from distillery.distributed import DistEnv
from distillery.errors import DistilleryError
from distillery.models import load_pretrained
from distillery.recipes.common import prepare_data
from distillery.recipes.pool_ensemble import (
    PoolEnsembleConfig,
    ensemble,
    load_codistill,
    member_dirs,
    member_pools,
    pool_ensemble,
)

PREDICTORS = ["single", "independent ensemble", "codistilled peer", "pool ensemble",
              "student ← independent (T=1)", "student ← pool (T=1)"]  # fmt: skip


def tiny_codistill(corpus: Path, cache_dir: Path, root: Path) -> Path:
    """A codistillation study of tiny 2-peer pools, seeds 0 and 1, written to a YAML file."""
    study = {
        "data": {"source": str(corpus), "seq_len": 32, "vocab_size": 512, "val_fraction": 0.02,
                 "test_fraction": 0.02, "cache_dir": str(cache_dir)},
        "model": {"preset": "tiny"},
        "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2,
                  "eval_batches": 2, "log_every": 1, "checkpoint_every": 0, "tensorboard": False,
                  "generation_tokens": 4, "draft_prompts": 2},
        "exchange": {"every": 2, "burn_in": 0},
        "arms": ["checkpoints"],
        "seeds": [0, 1],
        "out": str(root / "codistill"),
    }  # fmt: skip
    path = root / "codistill.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def config(path: Path, root: Path, *overrides: str, seeds: list[int] | None = None):
    base = {"codistill": str(path), "distil": {"steps": 3, "lr": 3e-3, "warmup_steps": 1},
            "bootstrap": {"samples": 100}, "out": str(root / "runs"),
            "results": str(root / "results")}  # fmt: skip
    if seeds is not None:
        base["seeds"] = seeds
    return build_config(PoolEnsembleConfig, None, list(overrides), base=base)


@pytest.fixture(scope="module")
def finished(corpus: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The study run once on seed 0 (its members launched, its students trained)."""
    root = tmp_path_factory.mktemp("pool-ensemble")
    cfg = config(tiny_codistill(corpus, cache_dir, root), root, seeds=[0])
    return cfg, pool_ensemble(cfg)


def _test_split(cfg: PoolEnsembleConfig, arm: str):
    """(member models, test ids, labels, vocabulary) of seed 0's ``arm`` pool."""
    study = load_codistill(cfg.codistill)
    dirs = member_dirs(member_pools(cfg, study, 0)[arm])
    tokenizer, test = prepare_data(study.data, DistEnv(), dirs[0], splits=("test",))
    ids, labels = test.examples(np.arange(test.num_blocks))
    return dirs, ids, labels, len(tokenizer)


def _reference(probs: torch.Tensor, gold: torch.Tensor, n_bins: int) -> dict[str, float]:
    """NLL, Brier and equal-width ECE of probabilities ``(N, V)``, written plainly."""
    true = probs.gather(-1, gold[:, None])[:, 0]
    confidence, predicted = probs.max(-1)
    gap = (predicted == gold).double() - confidence
    bins = (torch.ceil(confidence * n_bins) - 1).clamp(0, n_bins - 1).long()
    ece = sum(abs(gap[bins == b].sum().item()) for b in range(n_bins)) / len(gold)
    brier = ((probs**2).sum(-1) - 2 * true + 1).mean().item()
    return {"nll": -true.log().mean().item(), "brier": brier, "ece": ece}


def test_metrics_and_ensembles_match_the_models(finished):
    cfg, result = finished
    seed = result["per_seed"][0]
    assert list(seed["predictors"]) == PREDICTORS
    arms = (("solo", "single", "independent ensemble", "independent"),
            ("checkpoints", "codistilled peer", "pool ensemble", "pool"))  # fmt: skip
    for arm, alone, name, kind in arms:
        dirs, ids, labels, vocab = _test_split(cfg, arm)
        models = [load_pretrained(d, "peer").eval() for d in dirs]
        with torch.no_grad():  # every block at once, float64 softmax: unlike the chunked path
            probs = [torch.softmax(m(input_ids=ids).logits[..., :vocab].double(), -1)
                     for m in models]  # fmt: skip
        mean = sum(probs) / len(probs)  # (B, T, V)
        # The ensemble predictor's probabilities are the members' average, on a batch.
        got = ensemble(dirs, torch.device("cpu"), vocab).logits(ids[:4]).exp().double()
        assert torch.allclose(got, mean[:4], atol=1e-6)
        mask = labels != IGNORE_INDEX
        gold = labels[mask]
        for predictor, p in ((alone, probs[0]), (name, mean)):
            expected = _reference(p[mask], gold, cfg.n_bins)
            for key, value in expected.items():
                tolerance = 1e-4 if key == "ece" else 1e-5  # bins: float32 confidences inside
                assert seed["predictors"][predictor][key] == pytest.approx(value, abs=tolerance)
        differ = (probs[0].argmax(-1) != probs[1].argmax(-1))[mask].double().mean().item()
        assert seed["diversity"][kind] == pytest.approx(differ, abs=2e-3)
        assert seed["test_predictions"] == len(gold)
    # One seed: the mean is the seed's value, the paired bootstrap's centre the plain
    # difference, and there is no t-interval.
    assert (
        result["rows"]["pool ensemble"]["nll"]["mean"] == seed["predictors"]["pool ensemble"]["nll"]
    )
    compared = result["comparisons"][0]
    assert (compared["name"], compared["against"]) == ("pool ensemble", "independent ensemble")
    ece = {n: seed["predictors"][n]["ece"] for n in ("pool ensemble", "independent ensemble")}
    delta = ece["pool ensemble"] - ece["independent ensemble"]
    assert compared["metrics"]["ece"]["bootstrap"]["mean"] == pytest.approx(delta)
    assert compared["metrics"]["ece"]["seeds"]["low"] is None


def test_files_written_and_a_second_run_reuses_everything(finished, capsys):
    cfg, first = finished
    results = Path(cfg.results)
    saved = json.loads((results / "pool-ensemble.json").read_text(encoding="utf-8"))
    assert list(saved["rows"]) == PREDICTORS
    md = (results / "pool-ensemble.md").read_text(encoding="utf-8")
    for said in (saved["hardware"], f"{saved['test_blocks']} blocks", "block bootstrap",
                 "paired t", "## Verdict", "## What this does not show",
                 f"all {saved['train_blocks']} training blocks",
                 f"own 1/2 of the {saved['train_blocks']} training blocks"):  # fmt: skip
        assert said in md, said
    assert sum(saved["shard_blocks"]) == saved["train_blocks"]
    assert (results / "pool-ensemble-reliability.png").stat().st_size > 5000
    models = sorted(Path(cfg.out).rglob("model/model.safetensors"))
    models += sorted(Path(load_codistill(cfg.codistill).out).rglob("model/model.safetensors"))
    assert len(models) == 6  # 2 students, 2 solo peers, 2 pool peers
    before = {p: p.stat().st_mtime_ns for p in models}
    again = pool_ensemble(cfg)
    out = capsys.readouterr().out
    for name in ("s0-solo", "s0-checkpoints", "s0-student-independent-T1", "s0-student-pool-T1"):
        assert f"{name}: finished before, reusing" in out, name
    assert {p: p.stat().st_mtime_ns for p in models} == before
    assert again["rows"] == first["rows"]  # the same models, scored the same way


def test_bad_configs_are_one_clear_error(corpus: Path, cache_dir: Path, tmp_path: Path, capsys):
    path = tiny_codistill(corpus, cache_dir, tmp_path)
    assert config(path, tmp_path).seeds == [0, 1]  # the codistillation study's
    for overrides, match in (
        (["seeds=[0,5]"], r"seeds: \[5\] are not seeds of .*codistill\.yaml \(\[0, 1\]\)"),
        (["peers=3"], r"peers: .* trains pools of \[2\] peers, not 3"),
        ([f"codistill={tmp_path / 'none.yaml'}"], r"codistill: no config file"),
    ):
        with pytest.raises(DistilleryError, match=match):
            config(path, tmp_path, *overrides)
    assert main(["experiment", "pool-ensemble", f"codistill={path}", "peers=4"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "trains pools of [2] peers, not 4" in said[0]
