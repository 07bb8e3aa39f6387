"""``distillery experiment codistill-hetero``: a truly heterogeneous codistillation pool —
peers of unequal sizes, each its own process pinned to its own cores, one slowed worker, and
one peer killed mid-run that rejoins from its checkpoint.

Per seed, two arms, each a set of ``distillery codistill --peer I`` processes started at the
same time with the same CPU affinity (``cores``), threads (``OMP_NUM_THREADS`` = cores given)
and per-step sleeps (``delays``), so the cores are shared the same way in both:

- ``solo``: every peer alone on its own shard (``exchange.mode: none``);
- ``pool``: the peers codistilling through published weights (``checkpoints``). With
  ``rejoin``, peer ``rejoin.peer`` is SIGKILLed once it has checkpointed at or after
  ``rejoin.at_step``, and relaunched with ``--resume`` after ``rejoin.pause`` seconds; the
  others keep training with its last published weights. Downtime and resumed step are kept.

Each arm's folder is keyed by its content (``seedS/ARM-KEY``, with ``launch.json`` beside the
peers' run folders), and a finished one is reused, so a stopped study continues. The tables and
the plot are in ``recipes/codistill_hetero_report``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator

from distillery.config import (
    CodistillConfig,
    DataConfig,
    ExchangeSpec,
    ModelSpec,
    Strict,
    TrainConfig,
    config_to_yaml,
)
from distillery.distributed import DistEnv
from distillery.engine import checkpoint_step, list_checkpoints
from distillery.errors import DistilleryError
from distillery.files import atomic_write_text, write_json
from distillery.recipes.codistill_baselines import finished_in, reach, timed_curve
from distillery.recipes.codistill_hetero_report import hetero_markdown, peer_rows, plot_hetero
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.study import SeededStudy, hardware, write_study

POLL_SECONDS = 0.05  # how often the launcher looks at the processes and checkpoints
# Run as ``python -c PIN CORES EXE ARGS...``: pin to CORES, then become ``EXE ARGS...``.
PIN = (
    "import os, sys; os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


class Rejoin(Strict):
    """Kill peer ``peer`` (SIGKILL) once it has a checkpoint at or after ``at_step``; relaunch
    it with ``--resume`` ``pause`` seconds later."""

    peer: int = Field(ge=0)
    at_step: int = Field(gt=0)
    pause: float = Field(1.0, ge=0.0)


class CodistillHeteroConfig(SeededStudy):
    """``distillery experiment codistill-hetero``: unequal peers on separate processes and
    cores, a slowed worker and a kill-and-rejoin, against each peer alone
    (``recipes/codistill_hetero``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    peers: list[ModelSpec] = Field(min_length=2)
    delays: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=list)
    # CPU cores each peer's process is pinned to (None: not pinned, cores shared out evenly).
    cores: list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] | None = None
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            checkpoint_every=30, eval_every=30, log_every=30, tensorboard=False
        )
    )
    exchange: ExchangeSpec = Field(default_factory=lambda: ExchangeSpec(mode="checkpoints"))
    rejoin: Rejoin | None = None
    out: Path = Path("runs/codistill-hetero")

    @model_validator(mode="after")
    def _runnable(self) -> CodistillHeteroConfig:
        n, train = len(self.peers), self.train
        if self.delays and len(self.delays) != n:
            raise ValueError(f"delays: give one per peer ({n} peers, {len(self.delays)} delays)")
        if self.cores is not None and len(self.cores) != n:
            raise ValueError(f"cores: give one list per peer ({n} peers, {len(self.cores)} lists)")
        if self.exchange.mode != "checkpoints":
            raise ValueError(
                f"exchange.mode={self.exchange.mode}: the heterogeneous pool exchanges published "
                "weights (checkpoints); its peers run unsynchronised"
            )
        if not train.eval_every or train.eval_every % train.log_every:
            raise ValueError(
                f"train.eval_every ({train.eval_every}) must be > 0 and a multiple of "
                f"train.log_every ({train.log_every}): seconds are read at logged evaluations"
            )
        if (r := self.rejoin) is not None:
            if not train.checkpoint_every:
                raise ValueError(
                    "rejoin needs train.checkpoint_every > 0: the killed peer resumes from its "
                    "own checkpoint"
                )
            if r.peer >= n:
                raise ValueError(f"rejoin.peer={r.peer}: the peers are 0..{n - 1}")
            if r.at_step % train.checkpoint_every or r.at_step >= train.steps:
                raise ValueError(
                    f"rejoin.at_step={r.at_step}: give a multiple of train.checkpoint_every "
                    f"({train.checkpoint_every}) below train.steps ({train.steps})"
                )
        arm_config(self, "pool", 0, Path("."))  # what each peer's config checks, refused now
        return self


def check_cores(cfg: CodistillHeteroConfig) -> None:
    """Refuse cores this process may not run on (before anything starts)."""
    if cfg.cores is None:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise DistilleryError("cores: pinning peers to cores needs Linux (os.sched_setaffinity)")
    have = os.sched_getaffinity(0)
    for i, cores in enumerate(cfg.cores):
        if missing := sorted(set(cores) - have):
            raise DistilleryError(
                f"cores.{i}: core(s) {missing} are not available on this machine (this process "
                f"may use cores {sorted(have)}); give cores from those"
            )


def threads(cfg: CodistillHeteroConfig) -> list[int]:
    """Threads per peer process: the cores it is pinned to, else the cores shared out."""
    if cfg.cores is not None:
        return [len(c) for c in cfg.cores]
    return [max(1, (os.cpu_count() or 1) // len(cfg.peers))] * len(cfg.peers)


def arm_config(cfg: CodistillHeteroConfig, arm: str, seed: int, out: Path) -> CodistillConfig:
    """The peers' config for an arm: ``pool`` exchanges checkpoints, ``solo`` nothing."""
    mode = "checkpoints" if arm == "pool" else "none"
    return CodistillConfig(
        data=cfg.data,
        peers=cfg.peers,
        train=cfg.train.model_copy(update={"seed": seed}),
        exchange=cfg.exchange.model_copy(update={"mode": mode}),
        delays=cfg.delays,
        out=out,
    )


def _arm_dir(cfg: CodistillHeteroConfig, arm: str, seed: int, root: Path) -> Path:
    """``root/ARM-KEY``: KEY hashes the peers' config and how they are launched."""
    launch = {"cores": cfg.cores, "threads": threads(cfg), "arm": arm}
    if arm == "pool":
        launch["rejoin"] = cfg.rejoin.model_dump() if cfg.rejoin else None
    text = config_to_yaml(arm_config(cfg, arm, seed, Path("."))) + json.dumps(launch)
    return root / f"{arm}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _spawn(
    cfg: CodistillHeteroConfig, config: Path, peer: int, *, resume: bool
) -> subprocess.Popen[bytes]:
    """``distillery codistill --peer I`` as its own process; with ``cores``, a small Python
    stub pins itself to them and execs the peer (same process, so the pinning is inherited by
    every thread it starts; no ``preexec_fn``, which is unsafe in a threaded parent)."""
    cmd = [sys.executable, "-m", "distillery", "codistill", "--config", str(config)]
    cmd += ["--peer", str(peer), "--resume" if resume else "--overwrite"]
    if cfg.cores is not None:
        cmd = [sys.executable, "-c", PIN, ",".join(map(str, cfg.cores[peer])), *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads(cfg)[peer])}
    return subprocess.Popen(cmd, env=env)


def _kill_and_rejoin(
    cfg: CodistillHeteroConfig,
    config: Path,
    procs: dict[int, subprocess.Popen[bytes]],
    out: Path,
    name: str,
) -> dict[str, Any] | None:
    """Once the rejoining peer has checkpointed at ``at_step`` or later: SIGKILL it, wait
    ``pause``, relaunch it with ``--resume``; (peer, resumed_from, downtime), else None."""
    assert cfg.rejoin is not None
    i, folder = cfg.rejoin.peer, out / f"peer{cfg.rejoin.peer}"
    found = list_checkpoints(folder)
    if not found or checkpoint_step(found[-1]) < cfg.rejoin.at_step:
        return None
    killed = time.monotonic()
    procs[i].kill()
    code = procs[i].wait()
    resumed_from = checkpoint_step(list_checkpoints(folder)[-1])
    if code == 0 or resumed_from >= cfg.train.steps:
        raise DistilleryError(
            f"{name}: peer {i} finished before it could be killed; give an earlier "
            "rejoin.at_step (or a slower peer)"
        )
    time.sleep(cfg.rejoin.pause)
    procs[i] = _spawn(cfg, config, i, resume=True)
    downtime = time.monotonic() - killed
    print(f"[distillery] {name}: killed peer {i}, rejoined from step {resumed_from} "
          f"after {downtime:.1f} s", flush=True)  # fmt: skip
    return {"peer": i, "resumed_from": resumed_from, "downtime": downtime}


def launch_arm(cfg: CodistillHeteroConfig, pool: CodistillConfig, name: str, rejoin: bool) -> dict:
    """Run every peer of ``pool`` side by side (killing and rejoining one when ``rejoin``);
    returns ``launch.json``: each process's seconds from launch to exit, and the rejoin."""
    out = Path(pool.out)
    record_path, n = out / "launch.json", len(pool.peers)
    if finished_in(pool, [out / f"peer{i}" for i in range(n)]) and record_path.is_file():
        print(f"[distillery] {name}: finished before, reusing {out}", flush=True)
        return json.loads(record_path.read_text(encoding="utf-8"))
    shutil.rmtree(out / "pool", ignore_errors=True)  # no weights published by an earlier try
    out.mkdir(parents=True, exist_ok=True)
    config = out / "pool.yaml"
    atomic_write_text(config, config_to_yaml(pool))
    print(f"[distillery] {name}: {n} processes, cores {cfg.cores or 'unpinned'}, threads "
          f"{threads(cfg)}, delays {cfg.delays or 'none'}", flush=True)  # fmt: skip
    start = time.monotonic()
    procs = {i: _spawn(cfg, config, i, resume=False) for i in range(n)}
    ended: dict[int, float] = {}
    rejoined = None
    try:
        while len(ended) < n:
            for i, proc in procs.items():
                if i not in ended and proc.poll() is not None:
                    if proc.returncode:
                        raise DistilleryError(
                            f"{name}: peer {i} failed (exit code {proc.returncode}); see its "
                            "output above"
                        )
                    ended[i] = time.monotonic() - start
            if rejoin and rejoined is None:
                if cfg.rejoin is not None and cfg.rejoin.peer in ended:
                    raise DistilleryError(
                        f"{name}: peer {cfg.rejoin.peer} finished before it could be killed; "
                        "give an earlier rejoin.at_step"
                    )
                rejoined = _kill_and_rejoin(cfg, config, procs, out, name)
            time.sleep(POLL_SECONDS)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    record = {"process_seconds": [ended[i] for i in range(n)], "rejoin": rejoined}
    write_json(record_path, record)
    return record


def _summary(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def peer_result(
    cfg: CodistillHeteroConfig, seed: int, i: int, arms: dict[str, tuple[Path, dict]]
) -> dict[str, Any]:
    """Peer ``i`` of a seed: its pool run beside its solo run."""
    (pool_dir, pool_launch), (solo_dir, solo_launch) = arms["pool"], arms["solo"]
    mine, alone = _summary(pool_dir / f"peer{i}"), _summary(solo_dir / f"peer{i}")
    timed, solo_timed = timed_curve(pool_dir / f"peer{i}"), timed_curve(solo_dir / f"peer{i}")
    step, seconds = reach(timed, alone["val_loss"])
    run_s, solo_s = timed[-1][1], solo_timed[-1][1]
    rejoin = pool_launch["rejoin"]
    return {
        "seed": seed,
        "peer": i,
        "layers": mine["layers"],
        "params": mine["params"],
        "delay": cfg.delays[i] if cfg.delays else 0.0,
        "cores": cfg.cores[i] if cfg.cores else None,
        "threads": threads(cfg)[i],
        "steps": mine["steps"],
        "solo_steps": alone["steps"],
        "val_loss": mine["val_loss"],
        "solo_val_loss": alone["val_loss"],
        "seconds": run_s,
        "solo_seconds": solo_s,
        "process_seconds": pool_launch["process_seconds"][i],
        "solo_process_seconds": solo_launch["process_seconds"][i],
        "steps_per_second": mine["steps"] / run_s,
        "solo_steps_per_second": alone["steps"] / solo_s,
        "steps_to_solo": step,
        "seconds_to_solo": seconds,
        "bytes": mine["bytes_sent"] + mine["bytes_received"],
        "wait_seconds": mine["wait_seconds"],
        "mean_copy_lag_steps": mine.get("mean_copy_lag_steps"),
        "rejoined": rejoin if rejoin and rejoin["peer"] == i else None,
        "timed": timed,
        "solo_timed": solo_timed,
    }


def codistill_hetero(cfg: CodistillHeteroConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run both arms for every seed; return (and write) the tables' data."""
    check_cores(cfg)
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    prepare_data(cfg.data, DistEnv())  # the token cache, once, before the processes start
    per_seed = []
    for seed in cfg.seeds:
        arms = {}
        for arm in ("solo", "pool"):
            folder = _arm_dir(cfg, arm, seed, out / f"seed{seed}")
            pool = arm_config(cfg, arm, seed, folder)
            launched = launch_arm(
                cfg, pool, f"s{seed}-{arm}", rejoin=arm == "pool" and bool(cfg.rejoin)
            )
            arms[arm] = (folder, launched)
        peers = [peer_result(cfg, seed, i, arms) for i in range(len(cfg.peers))]
        per_seed.append({"seed": seed, "peers": peers, "rejoin": arms["pool"][1]["rejoin"]})
    result = summarise(cfg, per_seed)
    write_study(
        "codistill-hetero",
        result,
        hetero_markdown(result),
        [out, cfg.results],
        lambda folder: plot_hetero(result, folder / "codistill-hetero.png"),
    )
    return result


def summarise(cfg: CodistillHeteroConfig, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The study's result: the setup, per-peer rows (``peer_rows``), the rejoins, each seed."""
    return {
        "hardware": hardware(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "seeds": cfg.seeds,
        "steps": cfg.train.steps,
        "eval_every": cfg.train.eval_every,
        "exchange": cfg.exchange.model_dump(mode="json"),
        "cores": cfg.cores,
        "threads": threads(cfg),
        "delays": cfg.delays,
        "rows": peer_rows(per_seed),
        "rejoins": [{"seed": s["seed"], **s["rejoin"]} for s in per_seed if s["rejoin"]],
        "per_seed": per_seed,
        "config": cfg.model_dump(mode="json"),
    }
