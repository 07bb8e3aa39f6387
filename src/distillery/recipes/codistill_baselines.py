"""The codistillation study's baselines. Anil et al. 2018 compare a pool with the best
data-parallel model on *all* the data, not with each peer alone on its shard, so the study adds:

- ``all-data``: one ``model`` on every training block with the per-peer batch, the same steps,
  one process (``distillery train``);
- ``data-parallel``: synchronous DDP under ``torchrun --nproc-per-node N`` (N = the pool's
  size, one run per size in ``peers``) with the pool's global batch, N × the per-peer batch, on
  every block, the same steps. The engine splits each global batch over the processes, so this
  is one model trained on that global batch in the same data order.

For every arm and peer: the final validation loss, and the steps *and* wall-clock seconds to a
target loss (the seed's all-data final validation loss, or the configured ``target_loss``), with
differences paired by seed against the data-parallel model as wide as the pool (``eval.stats``
through ``recipes.study``). Seconds are read from the runs' own logs (``timed_curve``).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from distillery.config import RunConfig, TrainConfig, config_to_yaml
from distillery.errors import DistilleryError
from distillery.files import atomic_write_text
from distillery.recipes.study import mean_std, paired_interval, paired_verdict
from distillery.report import read_metrics

if TYPE_CHECKING:
    from distillery.recipes.codistill_study import CodistillStudyConfig

BASELINE_ARMS = ("all-data", "data-parallel")
Curve = list[tuple[int, float, float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finished_in(config: BaseModel, folders: list[Path]) -> bool:
    """Whether every folder holds a finished run of exactly ``config`` (its ``config.yaml``
    read back through today's schema, and a finished ``summary.json``)."""
    for folder in folders:
        try:
            saved = type(config).model_validate(
                yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
            )
            done = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["finished"]
        except (OSError, ValueError, KeyError, yaml.YAMLError):
            return False
        if saved != config or not done:
            return False
    return True


def timed_curve(folder: Path) -> Curve:
    """(step, seconds, validation loss) of a run's evaluations, the final one included.

    Seconds: wall-clock from the start of the first step to the end of the logged step at or
    before the evaluation, summed over the log windows (each record's new tokens over its
    tokens/s), so exchanges, waiting for peers and the earlier evaluations are in, the time to
    start the process and load the data is not. Exact when ``train.log_every`` divides
    ``train.eval_every`` (the study checks it)."""
    seconds, tokens, points = 0.0, 0, []
    for record in read_metrics(folder):
        if "tokens_per_s" in record:
            seconds += (record["tokens"] - tokens) / max(record["tokens_per_s"], 1e-9)
            tokens = record["tokens"]
        if "val_loss" in record:
            points.append((record["step"], seconds, record["val_loss"]))
    return points


def reach(curve: Curve, target: float) -> tuple[int | None, float | None]:
    """The first evaluated (step, x) with validation loss at or below ``target``; x is the
    curve's middle column (FLOPs or seconds). (None, None) when it never gets there."""
    for step, x, loss in curve:
        if loss <= target:
            return step, x
    return None, None


def threads_per_process(processes: int, torchrun: bool) -> int:
    """The threads each process computes with: ``OMP_NUM_THREADS`` when set, else every core
    for one process, 1 under torchrun (its default), the cores shared out for ``--peer``."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    cores = os.cpu_count() or 1
    if processes == 1:
        return cores
    return 1 if torchrun else max(1, cores // processes)


def _train(cfg: CodistillStudyConfig, seed: int, processes: int) -> TrainConfig:
    """The pool's training settings for one model: global batch ``processes`` × the per-peer
    batch, DDP, no generation-speed or draft extras in its final report."""
    return TrainConfig.model_validate(
        cfg.train.model_dump()
        | {
            "seed": seed,
            "batch_size": processes * cfg.train.batch_size,
            "parallel": "ddp",
            "generation_tokens": 0,
            "draft_prompts": 0,
        }
    )


def all_data_config(cfg: CodistillStudyConfig, seed: int, out: Path) -> RunConfig:
    """One ``model`` on every training block, the per-peer batch, the pool's steps."""
    return RunConfig(data=cfg.data, model=cfg.model, train=_train(cfg, seed, 1), out=out)


def data_parallel_config(cfg: CodistillStudyConfig, n: int, seed: int, out: Path) -> RunConfig:
    """One ``model`` on every block, trained by ``n`` DDP processes on a global batch of ``n`` ×
    the per-peer batch (each process computes the per-peer batch), the pool's steps."""
    return RunConfig(data=cfg.data, model=cfg.model, train=_train(cfg, seed, n), out=out)


def check_baselines(cfg: CodistillStudyConfig) -> None:
    """What the baselines need, refused before any run starts (``ValueError``)."""
    wanted = [a for a in cfg.arms if a in BASELINE_ARMS]
    if not wanted and cfg.target_loss is None:
        return
    if cfg.train.eval_every % cfg.train.log_every:
        raise ValueError(
            f"train.log_every ({cfg.train.log_every}) must divide train.eval_every "
            f"({cfg.train.eval_every}): seconds to the target are read at logged steps"
        )
    if "all-data" not in cfg.arms and cfg.target_loss is None:
        raise ValueError("target_loss: set it, or add the all-data arm whose final loss it is")
    all_data_config(cfg, 0, Path("."))
    for n in cfg.peers:
        data_parallel_config(cfg, n, 0, Path("."))


def launch_run(cfg: RunConfig, processes: int, name: str) -> None:
    """``distillery train`` in a fresh process, or under torchrun with ``processes`` (DDP);
    a finished run of exactly this config is reused."""
    out = Path(cfg.out)
    if finished_in(cfg, [out]):
        print(f"[distillery] {name}: finished before, reusing {out}", flush=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"  # beside the run: its folder is cleared
    atomic_write_text(config, config_to_yaml(cfg))
    cmd = ["-m", "distillery", "train", "--config", str(config), "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        cmd = [*launcher, "--master-port", str(free_port()), *cmd]
    else:
        env.setdefault("OMP_NUM_THREADS", str(threads_per_process(1, False)))
    print(f"[distillery] {name}: {processes} process(es)", flush=True)
    code = subprocess.run([sys.executable, *cmd], env=env).returncode
    if code:
        raise DistilleryError(f"{name}: the run failed (exit code {code}); see its output above")


def _baseline(cfg: RunConfig, processes: int, name: str) -> dict[str, Any]:
    launch_run(cfg, processes, name)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text(encoding="utf-8"))
    timed = timed_curve(Path(cfg.out))
    return {
        "model": "model",
        "layers": summary["layers"],
        "pool": processes,
        "processes": processes,
        "threads": threads_per_process(processes, torchrun=processes > 1),
        "batch": cfg.train.batch_size,
        "val_loss": summary["val_loss"],
        "steps": summary["steps"],
        "flops": summary["flops"],
        "train_seconds": summary["train_seconds"],
        "seconds": timed[-1][1] if timed else None,
        "timed": timed,
    }


def run_baselines(cfg: CodistillStudyConfig, seed: int, root: Path) -> dict[str, dict[str, Any]]:
    """The seed's all-data and data-parallel runs (those in ``cfg.arms``), by key."""
    runs: dict[str, dict[str, Any]] = {}
    if "all-data" in cfg.arms:
        run_cfg = all_data_config(cfg, seed, root / "all-data")
        runs["all-data"] = _baseline(run_cfg, 1, f"s{seed}-all-data")
    if "data-parallel" in cfg.arms:
        for n in cfg.peers:
            key = f"data-parallel-{n}"
            runs[key] = _baseline(
                data_parallel_config(cfg, n, seed, root / key), n, f"s{seed}-{key}"
            )
    return runs


def _scored(seed: int, run: dict[str, Any], target: float) -> dict[str, Any]:
    step, seconds = reach(run["timed"], target)
    return {
        "seed": seed,
        "val_loss": run["val_loss"],
        "steps_to_target": step,
        "seconds_to_target": seconds,
        "seconds": run["seconds"],
    }


def _delta(runs: list[dict[str, Any]], against: list[dict[str, Any]], key: str, digits: int):
    """``runs`` − ``against`` on ``key`` paired by seed (seeds where both have it), or None."""
    mine = [r for r in runs if r[key] is not None]
    theirs = [r for r in against if r[key] is not None]
    interval = paired_interval(mine, theirs, key)
    if interval is None:
        return None
    words = paired_verdict(mine, theirs, key, lower_is_better=True, digits=digits)
    return {"interval": interval.as_dict(), "text": words}


def _reference(cfg: CodistillStudyConfig, label: str, run: dict[str, Any]) -> str | None:
    """The data-parallel run a row is compared with: as many processes as its pool (the
    all-data model: the first pool size); None for data-parallel rows themselves."""
    if label.startswith("data-parallel"):
        return None
    return f"data-parallel-{run['pool'] if run['pool'] > 1 else cfg.peers[0]}"


def _row(
    label: str,
    peer: int | None,
    first: dict[str, Any],
    runs: list[dict[str, Any]],
    reference: str | None,
    against: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """One table row from the seeds' scores ``runs`` (and the reference's, ``against``)."""
    loss = mean_std([r["val_loss"] for r in runs])
    totals = [r["seconds"] for r in runs if r["seconds"] is not None]
    keep = ("model", "layers", "processes", "threads", "batch")
    return {
        "arm": label,
        "peer": peer,
        **{k: first[k] for k in keep},
        "val_loss": {"mean": loss[0], "std": loss[1]},
        "steps_to_target": [r["steps_to_target"] for r in runs],
        "seconds_to_target": [r["seconds_to_target"] for r in runs],
        "reached": sum(r["steps_to_target"] is not None for r in runs),
        "seconds": statistics.fmean(totals) if totals else None,
        "against": reference if against else None,
        "delta_val_loss": _delta(runs, against, "val_loss", 3) if against else None,
        "delta_seconds_to_target": (
            _delta(runs, against, "seconds_to_target", 1) if against else None
        ),
    }


def baselines_summary(cfg: CodistillStudyConfig, per_seed: list[dict[str, Any]]) -> dict | None:
    """A row for every baseline, arm and peer against the target, Δ against data-parallel
    (None when the study has no baseline arm and no ``target_loss``)."""
    if not any(s["baselines"] for s in per_seed) and cfg.target_loss is None:
        return None
    targets = {}
    for s in per_seed:
        own = s["baselines"].get("all-data", {}).get("val_loss")
        targets[s["seed"]] = cfg.target_loss if cfg.target_loss is not None else own
    runs: dict[tuple[str, int | None], list[dict[str, Any]]] = {}  # (label, peer) → each seed's
    scores: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for s in per_seed:
        found = [((k, None), run) for k, run in s["baselines"].items()]
        found += [((k, p["peer"]), p) for k, peers in s["arms"].items() for p in peers]
        for key, run in found:
            runs.setdefault(key, []).append(run)
            scores.setdefault(key, []).append(_scored(s["seed"], run, targets[s["seed"]]))
    rows = []
    for (label, peer), seeds in runs.items():
        reference = _reference(cfg, label, seeds[0])
        against = scores.get((reference, None)) if reference else None
        rows.append(_row(label, peer, seeds[0], scores[(label, peer)], reference, against))
    return {
        "targets": targets,
        "configured_target": cfg.target_loss,
        "rows": rows,
        "cores": os.cpu_count(),
        "per_peer_batch": cfg.train.batch_size,
    }


def _sharing(rows: list[dict[str, Any]], cores: int) -> str:
    """How the processes shared the cores, one phrase per kind of launch seen."""
    seen = dict.fromkeys((r["processes"], r["threads"]) for r in rows)
    words = [
        f"{p} process{'es' if p > 1 else ''} × {t} thread{'s' if t > 1 else ''}" for p, t in seen
    ]
    return f"{', '.join(words)} on {cores} cores (one arm at a time)"


def baselines_markdown(result: dict[str, Any]) -> str:
    """The baselines' table: steps and seconds to the target, paired Δ against data-parallel."""
    rows, cores = result["rows"], result["cores"]
    target = (
        f"the configured target_loss {result['configured_target']:.3f}"
        if result["configured_target"] is not None
        else "the all-data model's final validation loss of each seed ("
        + ", ".join(f"{v:.3f}" for v in result["targets"].values()) + ")"
    )  # fmt: skip
    lines = [
        "## Against one model on all the data and synchronous data-parallel",
        "",
        f"Processes: {_sharing(rows, cores)}. Target: {target}. all-data: one model on every "
        f"training block, batch {result['per_peer_batch']} (the per-peer batch); data-parallel "
        "×N: DDP over N processes, global batch N × the per-peer batch, every block; pool peers: "
        "each on its own 1/N of the blocks. Steps / seconds to target: the first evaluation at "
        "or below it, per seed (– never); seconds are wall-clock from the first step, "
        "exchanges, waiting and earlier evaluations included. Δ: paired by seed against the "
        "data-parallel model as wide as the pool (all-data: the first pool size), 95% "
        "t-interval; Δ seconds over the seeds where both reached the target.",
        "",
        "| arm | peer | processes × threads | batch | val loss | steps to target "
        "| s to target | total s | Δ val loss vs data-parallel | Δ s to target |",
        "|---|---|---|---:|---:|---|---|---:|---|---|",
    ]
    for row in rows:
        steps = ", ".join("–" if s is None else str(s) for s in row["steps_to_target"])
        secs = ", ".join("–" if s is None else f"{s:.1f}" for s in row["seconds_to_target"])
        peer = "–" if row["peer"] is None else f"{row['peer']} ({row['model']})"
        total = "–" if row["seconds"] is None else f"{row['seconds']:.1f}"
        delta = [
            (row[k] or {}).get("text", "–") for k in ("delta_val_loss", "delta_seconds_to_target")
        ]
        lines.append(
            f"| {row['arm']} | {peer} | {row['processes']} × {row['threads']} | {row['batch']} | "
            f"{row['val_loss']['mean']:.3f} ± {row['val_loss']['std']:.3f} | {steps} | {secs} | "
            f"{total} | {delta[0]} | {delta[1]} |"
        )
    return "\n".join(lines) + "\n"
