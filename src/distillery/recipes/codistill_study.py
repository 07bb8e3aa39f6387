"""``distillery experiment codistill``: does codistillation reach the solo loss in fewer steps,
and how does it compare with one model on all the data and with synchronous data-parallel?

Per seed and pool size N (``peers``: 2 by default, or a list such as ``[2, 4]``), every pool has
N peers, each on its own 1/N of the training blocks:

- ``solo``: each peer trained alone (``exchange.mode: none``), one process per peer: the
  baselines (``model`` on every shard, and ``small`` on shards 1..N-1);
- ``predictions``: N ``model`` peers exchanging top-k predictions every
  ``prediction_every`` steps (lockstep, under torchrun);
- ``checkpoints``: N ``model`` peers exchanging weights every ``exchange.every`` steps;
- ``unequal``: ``model`` with N-1 ``small`` peers, exchanging weights;
- ``all-data`` and ``data-parallel``: one model on all the data, alone or under DDP with the
  pool's global batch (``recipes/codistill_baselines``).

For each peer: the final validation loss; the first evaluated step (and its FLOPs) at which it
reaches the final validation loss of the same peer trained alone (the speed-up is the solo's
steps over those); bytes exchanged and time waiting. Churn: the share of held-out next-token
predictions on which a pool's peers 0 and 1 disagree (top-1), against two peers trained alone.
With a baseline arm, also steps and seconds to a target loss with paired differences against
data-parallel. Writes ``codistill.{md,json}`` and ``codistill.png`` (validation loss per step,
mean over seeds). Pools of 2 keep their folder names (``seedS/ARM``); others ``seedS/ARM-N``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

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
from distillery.recipes.codistill_baselines import (
    baselines_markdown,
    baselines_summary,
    check_baselines,
    finished_in,
    free_port,
    reach,
    run_baselines,
    threads_per_process,
    timed_curve,
)
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.study import SeededStudy, hardware, mean_std, write_study
from distillery.report import LOSS_UNIT, plot_seed_band, read_metrics
from distillery.teachers import LiveTeacher

CODISTILL_ARMS = ("predictions", "checkpoints", "unequal")


class CodistillStudyConfig(SeededStudy):
    """``distillery experiment codistill``: pools against each peer trained alone
    (``recipes/codistill_study``): ``predictions`` and ``checkpoints`` exchange between equal
    peers, and ``unequal`` (``model`` with ``small`` ones, checkpoints); ``all-data`` and
    ``data-parallel``: one model on all the data (``recipes/codistill_baselines``)."""

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
    arms: list[Literal["predictions", "checkpoints", "unequal", "all-data", "data-parallel"]] = (
        Field(default_factory=lambda: list(CODISTILL_ARMS), min_length=1)
    )
    # Pool sizes: each pool arm (and data-parallel, with as many processes) runs once per size.
    peers: list[Annotated[int, Field(ge=2, le=64)]] = Field(
        default_factory=lambda: [2], min_length=1
    )
    # The loss whose steps and seconds to reach are reported; None: the seed's all-data loss.
    target_loss: float | None = Field(None, gt=0.0)
    out: Path = Path("runs/codistill-study")

    @field_validator("peers", mode="before")
    @classmethod
    def _one_size(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @model_validator(mode="after")
    def _evaluated(self) -> CodistillStudyConfig:
        if not self.train.eval_every:
            raise ValueError("train.eval_every: the study needs validation curves (set it > 0)")
        if len(set(self.peers)) != len(self.peers):
            raise ValueError("peers: give each pool size once")
        # What each pool's CodistillConfig checks, refused here before any run starts.
        for n in self.peers:
            _pool_config(self, "predictions", 0, Path("."), n)
        check_baselines(self)
        return self


def _label(arm: str, n: int) -> str:
    """An arm's name and folder for pools of ``n`` (pools of 2 keep the plain name)."""
    return arm if n == 2 else f"{arm}-{n}"


def _pool_config(
    cfg: CodistillStudyConfig, arm: str, seed: int, out: Path, n: int = 2
) -> CodistillConfig:
    other = cfg.small if arm in ("unequal", "solo-small") else cfg.model
    peers = [cfg.model] + [other] * (n - 1)
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
    return finished_in(pool, [Path(pool.out) / f"peer{i}" for i in peers])


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
             "--master-port", str(free_port()), *base]
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


def _churn(cfg: CodistillStudyConfig, a: Path, b: Path) -> float:
    """Share of validation next-token predictions where the two models' top-1 differ."""
    device = resolve_device(cfg.train.device)
    tokenizer, val = prepare_data(cfg.data, DistEnv(), splits=("val",))
    model_a = load_pretrained(a, "peer").to(device)
    other = LiveTeacher(load_pretrained(b, "peer").to(device))
    metrics = evaluate_model(model_a, val, device=device, teacher=other, vocab=len(tokenizer))
    return 1.0 - metrics["agreement"]


def _peer_result(
    pool: CodistillConfig, i: int, kind: str, base_dir: Path, n: int
) -> dict[str, Any]:
    """Peer ``i`` of a finished pool of ``n``, beside the same peer trained alone."""
    folder = Path(pool.out) / f"peer{i}"
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    base = json.loads((base_dir / "summary.json").read_text(encoding="utf-8"))
    step, flops = reach(_curve(folder), base["val_loss"])
    timed = timed_curve(folder)
    return {
        "peer": i,
        "model": kind,
        "layers": summary["layers"],
        "pool": n,
        "processes": n,
        "threads": threads_per_process(n, torchrun=True),
        "batch": pool.train.batch_size,
        "val_loss": summary["val_loss"],
        "solo_val_loss": base["val_loss"],
        "solo_steps": base["steps"],
        "solo_flops": base["flops"],
        "steps_to_solo": step,
        "flops_to_solo": flops,
        "flops": summary["flops"],
        "bytes": summary["bytes_sent"] + summary["bytes_received"],
        "wait_seconds": summary["wait_seconds"],
        "seconds": timed[-1][1] if timed else None,
        "curve": _curve(folder),
        "timed": timed,
        "solo_curve": _curve(base_dir),
    }


def _pools(
    cfg: CodistillStudyConfig, seed: int, root: Path, n: int, churn: dict[str, float]
) -> dict[str, list[dict[str, Any]]]:
    """The seed's pools of ``n`` (each pool arm, after each peer alone), by arm label; the
    churn of each equal pool (and of peers 0 and 1 alone) goes into ``churn``."""
    arms = [a for a in cfg.arms if a in CODISTILL_ARMS]
    solo = _pool_config(cfg, "solo", seed, root / _label("solo", n), n)
    _launch(solo, list(range(n)), f"s{seed}-{_label('solo', n)}")
    alone = {("model", i): Path(solo.out) / f"peer{i}" for i in range(n)}
    if "unequal" in arms:
        small = _pool_config(cfg, "solo-small", seed, root / _label("solo-small", n), n)
        _launch(small, list(range(1, n)), f"s{seed}-{_label('solo-small', n)}")
        alone |= {("small", i): Path(small.out) / f"peer{i}" for i in range(1, n)}
    churn[_label("solo", n)] = _churn(cfg, *(alone[("model", i)] / "model" for i in (0, 1)))
    found = {}
    for arm in arms:
        label = _label(arm, n)
        pool = _pool_config(cfg, arm, seed, root / label, n)
        _launch(pool, None, f"s{seed}-{label}")
        kinds = ["small" if arm == "unequal" and i else "model" for i in range(n)]
        found[label] = [
            _peer_result(pool, i, kind, alone[(kind, i)], n) for i, kind in enumerate(kinds)
        ]
        if arm != "unequal":
            dirs = (Path(pool.out) / f"peer{i}" / "model" for i in (0, 1))
            churn[label] = _churn(cfg, *dirs)
    return found


def codistill_study(cfg: CodistillStudyConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every arm, pool size and seed; return the table's data."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    prepare_data(cfg.data, DistEnv())  # the token cache, once, before processes start
    per_seed: list[dict[str, Any]] = []
    with_pools = any(a in CODISTILL_ARMS for a in cfg.arms)
    for seed in cfg.seeds:
        root = out / f"seed{seed}"
        result: dict[str, Any] = {"seed": seed, "churn": {}, "arms": {}}
        for n in cfg.peers if with_pools else []:
            result["arms"] |= _pools(cfg, seed, root, n, result["churn"])
        result["baselines"] = run_baselines(cfg, seed, root)
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
    for label, first in per_seed[0]["arms"].items():
        for i in range(len(first)):
            peers = [s["arms"][label][i] for s in per_seed]
            loss = mean_std([p["val_loss"] for p in peers])
            solo = mean_std([p["solo_val_loss"] for p in peers])
            reached = [p for p in peers if p["steps_to_solo"] is not None]
            speedups = [p["solo_steps"] / p["steps_to_solo"] for p in reached]
            flops_ratio = [p["solo_flops"] / p["flops_to_solo"] for p in reached]
            rows.append(
                {
                    "arm": label,
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
        "pool_sizes": cfg.peers,
        "rows": rows,
        "churn": churn,
        "baselines": baselines_summary(cfg, per_seed),
        "per_seed": per_seed,
        "config": cfg.model_dump(mode="json"),
    }


def codistill_markdown(result: dict[str, Any]) -> str:
    """The tables and a plain answer."""
    seeds = result["seeds"]
    lines = [f"# Codistillation ({result['hardware']}, seeds {seeds})", ""]
    if result["rows"]:
        sizes = " or ".join(str(n) for n in result.get("pool_sizes", [2]))
        lines += [
            f"{sizes} peers per pool (arm-N: pools of N), each on its own 1/N of the training "
            f"blocks, {result['steps']} steps; validation loss every {result['eval_every']} "
            "steps. 'Steps to solo loss': the first evaluated step at which the peer reaches "
            "the final validation loss of the same peer trained alone (per seed); speed-up = "
            "solo steps / those steps, and the same in FLOPs (a pool's FLOPs include its "
            "teacher-side forwards), averaged over the seeds that reached it. Bytes: sent + "
            "received per peer. Mean ± sample std over seeds.",
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
    if churn := result["churn"]:
        lines += [
            "",
            "Churn (top-1 disagreement between peers 0 and 1 on validation tokens): "
            + "; ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in churn.items())
            + ".",
        ]
    if result.get("baselines"):
        lines += ["", baselines_markdown(result["baselines"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot_codistill(result: dict[str, Any], dest: Path) -> None:
    """Validation loss per step of peer 0 in each arm, alone, and of the all-data and
    data-parallel models where the study ran them (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    per_seed = result["per_seed"]
    arms = list(per_seed[0]["arms"])
    curves = {"alone": [s["arms"][arms[0]][0]["solo_curve"] for s in per_seed]} if arms else {}
    for arm in arms:
        curves[arm] = [s["arms"][arm][0]["curve"] for s in per_seed]
    for key in per_seed[0].get("baselines", {}):  # older studies ran none
        curves[key] = [s["baselines"][key]["timed"] for s in per_seed]
    for name, runs in curves.items():
        steps = [[(step, loss) for step, _, loss in c] for c in runs]  # FLOPs or seconds dropped
        style = "-" if name in arms else "--"
        plot_seed_band(ax, steps, marker=".", label=name, linestyle=style)
    ax.set(xlabel="step", ylabel=f"validation loss of peer 0 ({LOSS_UNIT})",
           title="codistillation vs baselines (mean ± std over seeds)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
