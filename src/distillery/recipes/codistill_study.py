"""``distillery experiment codistill``: does codistillation reach the solo loss in fewer steps?

Per seed, every pool has two peers, each on its own half of the training blocks:

- ``solo``: each peer trained alone (``exchange.mode: none``), one process per peer: the
  baselines (``model`` on shards 0 and 1, and ``small`` on shard 1);
- ``predictions``: two ``model`` peers exchanging top-k predictions every
  ``prediction_every`` steps (lockstep, under torchrun);
- ``checkpoints``: two ``model`` peers exchanging weights every ``exchange.every`` steps;
- ``unequal``: ``model`` and ``small``, exchanging weights.

For each peer: the final validation loss; the first evaluated step (and its FLOPs) at which it
reaches the final validation loss of the same peer trained alone (the speed-up is the solo's
steps over those); bytes exchanged and time waiting. Churn: the share of held-out next-token
predictions on which a pool's two peers disagree (top-1), against two peers trained alone.
Writes ``codistill.{md,json}`` and ``codistill.png`` (validation loss per step, mean over seeds).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, model_validator

from distillery.config import (
    CodistillConfig,
    DataConfig,
    ExchangeSpec,
    ModelSpec,
    TrainConfig,
    config_to_yaml,
)
from distillery.distributed import DistEnv, resolve_device
from distillery.errors import DistilleryError
from distillery.eval import evaluate_model
from distillery.files import atomic_write_text
from distillery.models import load_pretrained
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.study import SeededStudy, hardware, mean_std, write_study
from distillery.report import read_metrics
from distillery.teachers import LiveTeacher

CODISTILL_ARMS = ("predictions", "checkpoints", "unequal")


class CodistillStudyConfig(SeededStudy):
    """``distillery experiment codistill``: two-peer pools against each peer trained alone
    (``recipes/codistill_study``): ``predictions`` and ``checkpoints`` exchange between equal
    peers, and ``unequal`` (``model`` with ``small``, checkpoints)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    small: ModelSpec = Field(
        default_factory=lambda: ModelSpec(preset="mini", overrides={"num_hidden_layers": 2})
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(checkpoint_every=0, eval_every=25, eval_batches=1000)
    )
    exchange: ExchangeSpec = Field(default_factory=ExchangeSpec)  # its mode is set per arm
    prediction_every: int = Field(1, gt=0)  # exchange.every for the predictions arm
    arms: list[Literal["predictions", "checkpoints", "unequal"]] = Field(
        default_factory=lambda: list(CODISTILL_ARMS), min_length=1
    )
    out: Path = Path("runs/codistill-study")

    @model_validator(mode="after")
    def _evaluated(self) -> CodistillStudyConfig:
        if not self.train.eval_every:
            raise ValueError("train.eval_every: the study needs validation curves (set it > 0)")
        # What each pool's CodistillConfig checks, refused here before any run starts.
        _pool_config(self, "predictions", 0, Path("."))
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pool_config(cfg: CodistillStudyConfig, arm: str, seed: int, out: Path) -> CodistillConfig:
    peers = [cfg.model, cfg.small if arm in ("unequal", "solo-small") else cfg.model]
    mode = {"predictions": "predictions", "checkpoints": "checkpoints", "unequal": "checkpoints"}
    exchange = cfg.exchange.model_copy(update={"mode": mode.get(arm, "none")})
    if arm == "predictions":
        exchange = exchange.model_copy(update={"every": cfg.prediction_every})
    return CodistillConfig(
        data=cfg.data,
        peers=peers,
        train=cfg.train.model_copy(update={"seed": seed}),
        exchange=exchange,
        out=out,
    )


def _finished(pool: CodistillConfig, peers: list[int]) -> bool:
    """Whether these peers of ``pool`` finished before with exactly this config."""
    for i in peers:
        folder = Path(pool.out) / f"peer{i}"
        try:
            saved = CodistillConfig.model_validate(
                yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
            )
            done = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["finished"]
        except (OSError, ValueError, KeyError, yaml.YAMLError):
            return False
        if saved != pool or not done:
            return False
    return True


def _launch(pool: CodistillConfig, peers: list[int] | None, name: str) -> None:
    """Run a pool under torchrun (``peers=None``), or the given peers alone, side by side."""
    if _finished(pool, peers if peers is not None else list(range(len(pool.peers)))):
        print(f"[distillery] {name}: finished before, reusing {pool.out}", flush=True)
        return
    Path(pool.out).mkdir(parents=True, exist_ok=True)
    config = Path(pool.out) / "pool.yaml"
    atomic_write_text(config, config_to_yaml(pool))
    base = ["-m", "distillery", "codistill", "--config", str(config), "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if peers is None:
        n = str(len(pool.peers))
        cmds = [
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", n,
             "--master-port", str(_free_port()), *base]
        ]  # fmt: skip
    else:
        cmds = [[sys.executable, *base, "--peer", str(i)] for i in peers]
        threads = max(
            1, (os.cpu_count() or 1) // len(cmds)
        )  # as torchrun does: no oversubscription
        env.setdefault("OMP_NUM_THREADS", str(threads))
    print(f"[distillery] {name}: {len(cmds)} launch(es)", flush=True)
    procs = [subprocess.Popen(c, env=env) for c in cmds]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise DistilleryError(f"{name}: a peer failed (exit codes {codes}); see its output above")


def _curve(folder: Path) -> list[tuple[int, float, float]]:
    """(step, FLOPs, validation loss) of a peer's evaluations, the final one included."""
    flops_at: dict[int, float] = {}
    points = []
    for record in read_metrics(folder):
        if "flops" in record:
            flops_at[record["step"]] = record["flops"]
        if "val_loss" in record:
            points.append((record["step"], record["val_loss"]))
    return [(step, flops_at.get(step, float("nan")), loss) for step, loss in points]


def _reach(curve: list[tuple[int, float, float]], target: float) -> tuple[int | None, float | None]:
    """The first evaluated (step, FLOPs) with validation loss at or below ``target``."""
    for step, flops, loss in curve:
        if loss <= target:
            return step, flops
    return None, None


def _churn(cfg: CodistillStudyConfig, a: Path, b: Path) -> float:
    """Share of validation next-token predictions where the two models' top-1 differ."""
    device = resolve_device(cfg.train.device)
    tokenizer, val = prepare_data(cfg.data, DistEnv(), splits=("val",))
    model_a = load_pretrained(a, "peer").to(device)
    other = LiveTeacher(load_pretrained(b, "peer").to(device))
    metrics = evaluate_model(model_a, val, device=device, teacher=other, vocab=len(tokenizer))
    return 1.0 - metrics["agreement"]


def codistill_study(cfg: CodistillStudyConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every arm and seed; return the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    prepare_data(cfg.data, DistEnv())  # the token cache, once, before processes start
    per_seed: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        root = out / f"seed{seed}"
        solo = _pool_config(cfg, "solo", seed, root / "solo")
        small = _pool_config(cfg, "solo-small", seed, root / "solo-small")
        _launch(solo, [0, 1], f"s{seed}-solo")
        if "unequal" in cfg.arms:
            _launch(small, [1], f"s{seed}-solo-small")
        baselines = {
            ("model", 0): root / "solo" / "peer0",
            ("model", 1): root / "solo" / "peer1",
            ("small", 1): root / "solo-small" / "peer1",
        }
        result: dict[str, Any] = {
            "seed": seed,
            "churn": {"solo": _churn(cfg, *(baselines[("model", i)] / "model" for i in (0, 1)))},
            "arms": {},
        }
        for arm in cfg.arms:
            pool = _pool_config(cfg, arm, seed, root / arm)
            _launch(pool, None, f"s{seed}-{arm}")
            peers = []
            for i in range(2):
                kind = "small" if arm == "unequal" and i == 1 else "model"
                folder = Path(pool.out) / f"peer{i}"
                summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
                base_dir = baselines[(kind, i)]
                base = json.loads((base_dir / "summary.json").read_text(encoding="utf-8"))
                step, flops = _reach(_curve(folder), base["val_loss"])
                peers.append(
                    {
                        "peer": i,
                        "model": kind,
                        "layers": summary["layers"],
                        "val_loss": summary["val_loss"],
                        "solo_val_loss": base["val_loss"],
                        "solo_steps": base["steps"],
                        "solo_flops": base["flops"],
                        "steps_to_solo": step,
                        "flops_to_solo": flops,
                        "flops": summary["flops"],
                        "bytes": summary["bytes_sent"] + summary["bytes_received"],
                        "wait_seconds": summary["wait_seconds"],
                        "curve": _curve(folder),
                        "solo_curve": _curve(base_dir),
                    }
                )
            result["arms"][arm] = peers
            if arm != "unequal":
                dirs = (Path(pool.out) / f"peer{i}" / "model" for i in (0, 1))
                result["churn"][arm] = _churn(cfg, *dirs)
        per_seed.append(result)
    summary = _summarise(cfg, per_seed)
    write_study(
        "codistill",
        summary,
        codistill_markdown(summary),
        [out, cfg.results],
        lambda folder: plot_codistill(summary, folder / "codistill.png"),
    )
    return summary


def _summarise(cfg: CodistillStudyConfig, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for arm in cfg.arms:
        for i in range(2):
            peers = [s["arms"][arm][i] for s in per_seed]
            loss = mean_std([p["val_loss"] for p in peers])
            solo = mean_std([p["solo_val_loss"] for p in peers])
            reached = [p for p in peers if p["steps_to_solo"] is not None]
            speedups = [p["solo_steps"] / p["steps_to_solo"] for p in reached]
            flops_ratio = [p["solo_flops"] / p["flops_to_solo"] for p in reached]
            rows.append(
                {
                    "arm": arm,
                    "peer": i,
                    "model": peers[0]["model"],
                    "layers": peers[0]["layers"],
                    "val_loss": {"mean": loss[0], "std": loss[1]},
                    "solo_val_loss": {"mean": solo[0], "std": solo[1]},
                    "reached": len(reached),
                    "steps_to_solo": [p["steps_to_solo"] for p in peers],
                    "speedup_steps": statistics.fmean(speedups) if speedups else None,
                    "speedup_flops": statistics.fmean(flops_ratio) if flops_ratio else None,
                    "bytes": statistics.fmean(p["bytes"] for p in peers),
                    "wait_seconds": statistics.fmean(p["wait_seconds"] for p in peers),
                }
            )
    churn = {}
    for key in per_seed[0]["churn"]:
        mean, std = mean_std([s["churn"][key] for s in per_seed])
        churn[key] = {"mean": mean, "std": std}
    return {
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "steps": cfg.train.steps,
        "eval_every": cfg.train.eval_every,
        "rows": rows,
        "churn": churn,
        "per_seed": per_seed,
        "config": cfg.model_dump(mode="json"),
    }


def codistill_markdown(result: dict[str, Any]) -> str:
    """The table and a plain answer."""
    seeds = result["seeds"]
    lines = [
        f"# Codistillation ({result['hardware']}, seeds {seeds})",
        "",
        f"Two peers per pool, each on its own half of the training blocks, {result['steps']} "
        f"steps; validation loss every {result['eval_every']} steps. 'Steps to solo loss': the "
        "first evaluated step at which the peer reaches the final validation loss of the same "
        "peer trained alone (per seed); speed-up = solo steps / those steps, and the same in "
        "FLOPs (a pool's FLOPs include its teacher-side forwards), averaged over the seeds that "
        "reached it. Bytes: sent + received per peer. Mean ± sample std over seeds.",
        "",
        "| arm | peer | layers | val loss | alone | steps to solo loss | speed-up (steps) "
        "| speed-up (FLOPs) | bytes | wait s |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        steps = ", ".join("–" if s is None else str(s) for s in row["steps_to_solo"])
        sp = row["speedup_steps"]
        fp = row["speedup_flops"]
        lines.append(
            f"| {row['arm']} | {row['peer']} ({row['model']}) | {row['layers']} | "
            f"{row['val_loss']['mean']:.3f} ± {row['val_loss']['std']:.3f} | "
            f"{row['solo_val_loss']['mean']:.3f} ± {row['solo_val_loss']['std']:.3f} | {steps} | "
            f"{'–' if sp is None else f'{sp:.2f}×'} | {'–' if fp is None else f'{fp:.2f}×'} | "
            f"{row['bytes']:.3g} | {row['wait_seconds']:.1f} |"
        )
    churn = result["churn"]
    lines += [
        "",
        "Churn (top-1 disagreement between the two peers on validation tokens): "
        + "; ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in churn.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def plot_codistill(result: dict[str, Any], dest: Path) -> None:
    """Validation loss per step of peer 0 in each arm and alone (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    per_seed = result["per_seed"]
    arms = list(per_seed[0]["arms"])
    curves = {"alone": [s["arms"][arms[0]][0]["solo_curve"] for s in per_seed]}
    for arm in arms:
        curves[arm] = [s["arms"][arm][0]["curve"] for s in per_seed]
    for name, runs in curves.items():
        length = min(len(c) for c in runs)
        xs = [runs[0][i][0] for i in range(length)]
        ys = [statistics.fmean(c[i][2] for c in runs) for i in range(length)]
        ax.plot(xs, ys, marker=".", label=name, linestyle="--" if name == "alone" else "-")
    ax.set(xlabel="step", ylabel="validation loss (peer 0)", title="codistillation vs alone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
