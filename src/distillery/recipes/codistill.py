"""``distillery codistill``: one peer of a codistillation pool (Anil et al. 2018).

Launch every peer with ``torchrun --nproc-per-node N -m distillery codistill --config X``
(peer = rank; gloo on CPU, NCCL on GPU), or each peer on its own with ``--peer I`` (the same
command on one machine or several; in ``checkpoints`` mode the pool folder must be shared).

Each peer trains ``peers[I]`` on its own shard of the training blocks with the one engine; the
task loss plus, when the exchange has targets for the step, a soft-target term towards the
other peers (``pool.Exchange``). In ``checkpoints`` mode peers meet only through published
weight files: a peer that dies does not stop the others (they keep its last weights), and,
restarted with ``--peer I --resume``, it continues from its own checkpoint and rejoins. In
``predictions`` mode peers exchange in lockstep (an all-gather every ``every`` steps); under
``torchrun --max-restarts K`` a failure restarts the pool and every peer resumes from the newest
checkpoint they all have. Writes ``peerI/`` (a run folder: metrics, checkpoints, ``model/``,
``summary.json`` with the exchange's accounts) and ``pool/peerI/`` (published weights).
``delays[I]`` (seconds slept before each step) makes peer I a slowed worker.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from distillery.config import (
    CodistillConfig,
    CrossEntropyObjective,
    ForwardKLObjective,
    config_to_yaml,
)
from distillery.distributed import DistEnv, init_distributed, resolve_device
from distillery.engine import Engine, checkpoint_step, list_checkpoints, seed_everything
from distillery.errors import DistilleryError
from distillery.eval import evaluate_model, folder_size
from distillery.files import atomic_write_text, write_json
from distillery.models import build_model, compute_params, num_params
from distillery.models.dropout import add_residual_dropout
from distillery.pool import Exchange, PoolData, agree_on_start, check_same_config
from distillery.recipes.common import export_model, prepare_data, prepare_out_dir
from distillery.report.card import write_model_card
from distillery.step import DistillStep, chunk_options, terms_from_config


def _peer_index(cfg: CodistillConfig, peer: int | None) -> tuple[int, DistEnv, bool]:
    """(this peer, its process-group env, whether the pool shares a process group)."""
    n = len(cfg.peers)
    if peer is not None:
        if not 0 <= peer < n:
            raise DistilleryError(f"--peer {peer}: the config has peers 0..{n - 1}")
        if cfg.exchange.mode == "predictions":
            raise DistilleryError(
                "exchange.mode=predictions exchanges in lockstep through torch.distributed: "
                f"launch the pool with torchrun --nproc-per-node {n} (not --peer)"
            )
        return peer, DistEnv(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        raise DistilleryError(
            f"codistill needs one process per peer: torchrun --nproc-per-node {n} -m distillery "
            "codistill ..., or start each peer with --peer I"
        )
    if world != n:
        raise DistilleryError(f"torchrun started {world} processes for {n} peers; start {n}")
    env = init_distributed(resolve_device(cfg.train.device).type, cfg.exchange.wait_seconds)
    return env.rank, env, True


def _peer_builder(cfg: CodistillConfig, tokenizer: Any) -> Callable[[int], Any]:
    """``build_peer(i)``: a fresh model of peer i's architecture (with its residual dropout)."""
    special = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    def build_peer(i: int) -> Any:
        spec_i = cfg.peers[i]
        model = build_model(spec_i.preset or "", len(tokenizer), spec_i.overrides, **special)
        add_residual_dropout(model, spec_i.dropout)
        return model

    return build_peer


def _model_facts(model: Any, folder: Path) -> dict[str, Any]:
    return {
        "params": num_params(model),
        "compute_params": compute_params(model),
        "layers": model.config.num_hidden_layers,
        "size_on_disk": folder_size(folder),
    }


def _progress_facts(progress: Any) -> dict[str, Any]:
    return {
        "steps": progress.step,
        "flops": progress.flops,
        "tokens": progress.tokens,
        "train_seconds": progress.seconds,
    }


def _resume_upto(out: Path, collective: bool) -> int:
    """The step lockstep peers resume from: the newest checkpoint they all have."""
    found = list_checkpoints(out)
    return agree_on_start(checkpoint_step(found[-1]) if found else 0, collective)


def _finish_peer(
    cfg: CodistillConfig,
    index: int,
    model: Any,
    tokenizer: Any,
    val: Any,
    engine: Engine,
    exchange: Exchange,
    device: Any,
) -> dict[str, Any]:
    """Export the peer's model, evaluate it once in full, write its ``summary.json`` and the
    model's card (no teacher: the card names the pool)."""
    out = Path(cfg.out) / f"peer{index}"
    export_model(model, tokenizer, out / "model")
    metrics = evaluate_model(model, val, device=device, vocab=len(tokenizer))
    engine.log({"step": engine.progress.step, **metrics, "final": True})
    summary = {
        "name": f"peer{index}",
        "peer": index,
        "peers": len(cfg.peers),
        "mode": cfg.exchange.mode,
        **_model_facts(model, out / "model"),
        **metrics,
        **_progress_facts(engine.progress),
        **exchange.accounts.summary(),
        "device": str(device),
        "finished": True,
    }
    write_json(out / "summary.json", summary)
    write_model_card(out / "model", config=cfg, summary=summary)
    return summary


def codistill(
    cfg: CodistillConfig, *, peer: int | None = None, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train this process's peer of the pool; returns its summary."""
    index, env, collective = _peer_index(cfg, peer)
    spec, n = cfg.exchange, len(cfg.peers)
    try:
        device = resolve_device(cfg.train.device, env)
        out = Path(cfg.out) / f"peer{index}"
        prepare_out_dir(out, resume=resume, overwrite=overwrite)
        digest = hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()
        check_same_config(digest, collective)
        # Rank 0 first builds the token cache; the others then read it (or each alone).
        tokenizer, train, val = prepare_data(cfg.data, env if collective else DistEnv())
        if collective and spec.mode != "predictions":
            dist.destroy_process_group()  # from here on peers meet only through files
            collective = False
        vocab = len(tokenizer)
        build_peer = _peer_builder(cfg, tokenizer)
        seed_everything(cfg.train.seed * 1000 + index)  # each peer its own initialisation
        model = build_peer(index)
        data = PoolData(train, index, n, shared_seed=cfg.train.seed)
        exchange = Exchange(
            spec,
            peer=index,
            peers=n,
            model=model,
            data=data,
            pool_dir=Path(cfg.out) / "pool",
            build_peer=build_peer,
            device=device,
        )
        kd = ForwardKLObjective(weight=spec.weight, temperature=spec.temperature)
        distil = DistillStep(
            terms_from_config([CrossEntropyObjective(), kd]),
            exchange.teacher,
            vocab=vocab,
            **chunk_options(cfg.train, vocab),
        )
        train_cfg = cfg.train.model_copy(update={"seed": cfg.train.seed + index})
        n_params = compute_params(model)
        engine = Engine(
            model,
            distil,
            data,
            train_cfg,
            out,
            device=device,
            flops_per_token=6.0 * n_params,
            eval_fn=lambda m: evaluate_model(
                m, val, device=device, max_batches=cfg.train.eval_batches, vocab=vocab
            ),
            name=f"peer{index}",
        )

        delay = cfg.delays[index] if cfg.delays else 0.0

        def before_step(step: int) -> None:
            if delay:  # a slowed worker: inside the engine's logged wall-clock (tokens/s)
                time.sleep(delay)
            extra = exchange.before_step(step, train_cfg.batch_size)
            distil.teacher_enabled = exchange.active  # the task loss alone until peers teach
            engine.flops_per_token = 6.0 * n_params + extra

        upto = _resume_upto(out, collective) if resume and spec.mode == "predictions" else None
        atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
        engine.fit(resume=resume, before_step=before_step, resume_upto=upto)
        if collective:  # lockstep peers finish together, then each saves on its own
            dist.barrier()
            dist.destroy_process_group()
            collective = False
        summary = _finish_peer(cfg, index, model, tokenizer, val, engine, exchange, device)
        return summary
    finally:
        # (transformers saves only on rank 0 while a process group exists, so every peer
        # leaves it before exporting.) After a failure, leave without waiting for the others.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
