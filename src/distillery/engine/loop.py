"""The one training loop, for plain training and distillation alike.

AdamW, linear warmup + cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
optional ``torch.compile``, data-parallel under ``torchrun`` (DDP replicas, or FSDP2 shards with
``train.parallel: fsdp``), a FLOPs meter, JSONL and TensorBoard metrics, atomic checkpoints and
exact resume.

Loss normalisation (the loss contract): a step's objective sums are divided once by the number
of valid positions in the whole *global* batch, counted before the first backward, so micro-
batching and the number of processes do not change the gradient.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import distillery.parallel as fsdp
from distillery.config import TrainConfig
from distillery.data import Examples, global_batch_indices
from distillery.distributed import DistEnv, all_reduce_sum
from distillery.engine.checkpoints import (
    checkpoint_step,
    corrupt,
    list_checkpoints,
    load_newest,
    read_state,
    read_weights,
    shapes_digest,
    write_checkpoint,
)
from distillery.engine.contracts import Progress, TrainStep
from distillery.engine.metrics_log import MetricsLog
from distillery.engine.schedule import apply_schedule, autocast_context, check_finite, lr_factor
from distillery.errors import DistilleryError


class Engine:
    """Trains ``model`` on ``data`` with ``step`` according to ``cfg``, writing to ``out_dir``."""

    def __init__(
        self,
        model: nn.Module,
        step: TrainStep,
        data: Examples,
        cfg: TrainConfig,
        out_dir: Path,
        *,
        device: torch.device,
        env: DistEnv | None = None,
        flops_per_token: float,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        name: str = "train",
    ) -> None:
        self.env = env or DistEnv()
        self.cfg, self.step, self.data, self.out_dir = cfg, step, data, Path(out_dir)
        self.device, self.eval_fn, self.name = device, eval_fn, name
        self.flops_per_token = flops_per_token
        if cfg.batch_size % self.env.world_size:
            raise DistilleryError(
                f"train.batch_size {cfg.batch_size} is not divisible by the "
                f"{self.env.world_size} processes"
            )
        self.per_rank = cfg.batch_size // self.env.world_size
        self.micro = min(cfg.micro_batch_size or self.per_rank, self.per_rank)
        # FSDP trains a sharded copy; the raw module waits on the CPU, filled with the full
        # weights at each checkpoint and (on rank 0, moved to the device) at the end of ``fit``.
        self.sharded = cfg.parallel == "fsdp" and self.env.active
        self.model = model.to("cpu" if self.sharded else device)  # the raw module: saved
        self.model.train()
        forward: nn.Module = self.model
        if cfg.compile:
            forward = torch.compile(forward)  # type: ignore[assignment]
        if self.sharded:
            forward = fsdp.sharded_copy(model, device)
        elif self.env.active:
            ids = [device.index] if device.type == "cuda" else None
            # Without a logit term, representation terms may leave parameters unused (the head,
            # blocks after the last mapped layer), which DDP must be told about.
            forward = DistributedDataParallel(
                forward, device_ids=ids, find_unused_parameters=not step.uses_every_parameter
            )
        self.forward = forward
        # The step's own parameters (learned projections) train with the model; DDP does
        # not see them, so their gradients are all-reduced by hand.
        self.step.modules.to(device)
        self.extra = self.step.parameters()
        self.trained = forward if self.sharded else self.model  # the parameters optimised
        trained = [p for p in [*self.trained.parameters(), *self.extra] if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
            foreach=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg)
        )
        self.progress = Progress()
        self.metrics = MetricsLog(
            self.out_dir, name, enabled=self.env.is_main, tensorboard=cfg.tensorboard
        )
        self.metrics_path = self.metrics.path
        self.resumed_with: dict[str, tuple[Any, Any]] = {}  # settings a resume changed

    # ----------------------------------------------------------------- checkpoints
    def _weights(self) -> dict[str, nn.Module]:
        """What a checkpoint holds besides the trainer state: the model and the step's own
        trainable modules (``objectives.safetensors``)."""
        return {"model": self.model, **({"objectives": self.step.modules} if self.extra else {})}

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNNN`` atomically (rank 0) and prune old ones. Sharded:
        full state dicts gathered to rank 0 (a collective), the files those of a DDP run."""
        optimizer_state = None
        if self.sharded:  # collectives: every rank takes part
            fsdp.gather_into(self.model, self.forward)
            optimizer_state = fsdp.full_optimizer_state(self._optimized(), self.optimizer)
        if not self.env.is_main:
            return None
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        trainer_state = {
            "optimizer": optimizer_state or self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }
        state = {
            **asdict(self.progress),
            "samples_seen": self.progress.step * self.cfg.batch_size,
            "run": self._run_fingerprint(),
        }
        return write_checkpoint(
            self.out_dir,
            self.progress.step,
            self._weights(),
            trainer_state,
            state,
            keep=self.cfg.keep_checkpoints,
        )

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore model, optimizer, scheduler, RNG and data position from ``ckpt``."""
        weights = self._weights()
        state = read_state(ckpt, list(weights))
        self._check_same_run(ckpt, state.get("run", {}))
        try:
            trainer_state = read_weights(ckpt, weights, self.device)
            if self.sharded:  # every rank read the whole files; each keeps its slices
                fsdp.load_full_state(self.forward, self.model.state_dict())
                fsdp.load_full_optimizer_state(
                    self._optimized(), self.optimizer, trainer_state["optimizer"]
                )
            else:
                self.optimizer.load_state_dict(trainer_state["optimizer"])
            self.scheduler.load_state_dict(trainer_state["scheduler"])
            self.resumed_with = apply_schedule(self.optimizer, self.scheduler, self.cfg)
            progress = Progress(**{k: state[k] for k in asdict(Progress())})
            rng = trainer_state["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except DistilleryError:
            raise
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise corrupt(ckpt, reason) from None
        self.progress = progress

    def _run_fingerprint(self) -> dict[str, Any]:
        """What must not change on resume: data order and block size, and the weights' shapes."""
        return {
            "train.batch_size": self.cfg.batch_size,
            "train.seed": self.cfg.seed,
            "train.data_offset": self.cfg.data_offset,
            "data.seq_len": self.data.seq_len,
            "data.num_blocks": self.data.num_blocks,
            "model shapes": shapes_digest(self.model),
            "objective projections": shapes_digest(self.step.modules),
            "train.parallel": "fsdp" if self.sharded else "ddp",  # the optimizer state's layout
        }

    def _check_same_run(self, ckpt: Path, saved: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint with a config that changes data order or shapes."""
        now = self._run_fingerprint()
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            what = ", ".join(f"{k} {saved[k]} → {now[k]}" for k in changed)
            raise DistilleryError(
                f"cannot resume {ckpt}: the config changed ({what}); resume with the settings "
                "the run was started with"
            )

    def resume(self, upto: int | None = None) -> int:
        """Continue from the newest checkpoint in ``out_dir`` (at or before step ``upto``);
        returns its step."""
        found = list_checkpoints(self.out_dir)
        if upto is not None:
            found = [c for c in found if checkpoint_step(c) <= upto]
        if not found:
            raise DistilleryError(
                f"--resume: no checkpoint in {self.out_dir / 'checkpoints'}; start without --resume"
            )
        say = (lambda line: print(f"[{self.name}] {line}", flush=True)) if self.env.is_main else str
        ckpt = load_newest(found, self.load_checkpoint, say)
        if self.progress.step > self.cfg.steps:
            raise DistilleryError(
                f"checkpoint {ckpt} is past train.steps={self.cfg.steps}; raise train.steps"
            )
        self.metrics.truncate(self.progress.step)
        if self.resumed_with:  # said and recorded: the run continues with other settings
            what = ", ".join(f"{k} {a} → {b}" for k, (a, b) in self.resumed_with.items())
            if self.env.is_main:
                print(f"[{self.name}] resumed at step {self.progress.step} with {what}", flush=True)
            self.log({"step": self.progress.step, "resumed_with": what})
        return self.progress.step

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record (rank 0; ``engine.metrics_log``)."""
        self.metrics.log(record)

    # ----------------------------------------------------------------- the loop
    def _step_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (input ids, labels) of global batch ``step``."""
        indices = global_batch_indices(
            self.data.num_blocks, self.cfg.data_offset + step, self.cfg.batch_size, self.cfg.seed
        )
        mine = indices[self.env.rank * self.per_rank : (self.env.rank + 1) * self.per_rank]
        # (per_rank, T), (per_rank, T) or (per_rank,); the step draws masked-LM masks
        ids, labels = self.data.examples(mine, draw=self.cfg.data_offset + step)
        return list(zip(ids.split(self.micro), labels.split(self.micro), strict=True))

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over the global batch; returns the mean of each term."""
        micro_batches = self._step_batches(step)
        # The step's counts over the global batch: the loss is divided once by the first.
        counts = torch.stack([self.step.counts(ids, y) for ids, y in micro_batches]).sum(0)
        counts = all_reduce_sum(counts.to(self.device), self.env)
        n_global = counts.tolist()[0]
        scale = self.env.world_size / max(n_global, 1.0)  # DDP averages over ranks
        sums: dict[str, torch.Tensor] = {}
        for i, (ids, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if self.sharded:  # gradients reduce-scattered after the last micro-batch only
                self.forward.set_requires_gradient_sync(last)  # type: ignore[operator]
            elif self.env.active and not last:
                sync = self.forward.no_sync()  # type: ignore[operator]
            with sync:
                with autocast_context(self.device, self.cfg.precision):
                    total, terms = self.step(
                        self.forward, ids.to(self.device), y.to(self.device), counts=counts
                    )
                (total * scale).backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["loss"] = sums.get("loss", 0.0) + total.detach().float()
        for p in self.extra if self.env.active else []:  # averaged over ranks, as DDP does
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = all_reduce_sum(grad, self.env) / self.env.world_size
        grad_norm = None
        if self.cfg.grad_clip is not None and self.sharded:
            groups = [list(self.forward.parameters()), self.extra]
            grad_norm = fsdp.clip_grad_norm(groups, self.cfg.grad_clip)
        elif self.cfg.grad_clip is not None:
            params = [*self.model.parameters(), *self.extra]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        names = sorted(sums)
        reduced = all_reduce_sum(torch.stack([sums[k] for k in names]), self.env).cpu()
        out = {k: float(v) / max(n_global, 1.0) for k, v in zip(names, reduced, strict=True)}
        check_finite(step, out["loss"], grad_norm, lr)  # before the update, on every rank
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out["lr"] = lr
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    def fit(
        self,
        *,
        resume: bool = False,
        stop_after: int | None = None,
        before_step: Callable[[int], None] | None = None,
        resume_upto: int | None = None,
    ) -> Progress:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` steps of this call).

        ``before_step(step)`` runs before each step, outside the timed step (e.g. a pool
        exchanging weights or predictions); it may change ``flops_per_token`` for that step.
        ``resume_upto``: resume from the newest checkpoint at or before that step.
        """
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume(resume_upto)
        else:
            self.metrics.clear()
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.data.seq_len
        first = self.progress.step
        last = cfg.steps if stop_after is None else min(cfg.steps, first + stop_after)
        bar = tqdm(
            total=cfg.steps,
            initial=first,
            desc=self.name,
            disable=not (self.env.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        window_start, window_tokens = time.perf_counter(), 0
        for step in range(first, last):
            if before_step is not None:
                before_step(step)
            t0 = time.perf_counter()
            terms = self.train_step(step)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - t0
            self.progress.step = step + 1
            self.progress.tokens += tokens_per_step
            self.progress.flops += self.flops_per_token * tokens_per_step
            self.progress.seconds += elapsed
            window_tokens += tokens_per_step
            done = self.progress.step
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                record = {
                    "step": done,
                    **terms,
                    "tokens": self.progress.tokens,
                    "flops": self.progress.flops,
                    "tokens_per_s": rate,
                }
                self.log(record)
                if bar.disable and self.env.is_main:
                    eta = (cfg.steps - done) * tokens_per_step / max(rate, 1e-9)
                    print(
                        f"[{self.name}] step {done}/{cfg.steps} loss {terms['loss']:.4f} "
                        f"{rate:,.0f} tok/s eta {eta:.0f}s",
                        flush=True,
                    )
                window_start, window_tokens = time.perf_counter(), 0
            if self.eval_fn and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                self.evaluate()
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        finished_now = first < cfg.steps == self.progress.step
        if finished_now and (not cfg.checkpoint_every or cfg.steps % cfg.checkpoint_every):
            self.save_checkpoint()  # the final state, unless the loop has just written it
        if self.sharded:  # rank 0's raw model gets the trained weights, for export and eval
            fsdp.gather_into(self.model, self.forward, device=self.device)
        self.metrics.flush()
        return self.progress

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` on the raw model (sharded: on the sharded copy, every rank) in eval
        mode and log it."""
        assert self.eval_fn is not None
        model = self.forward if self.sharded else self.model
        model.eval()
        with autocast_context(self.device, self.cfg.precision):
            metrics = self.eval_fn(model)
        model.train()
        self.log({"step": self.progress.step, **metrics})
        return metrics

    # ----------------------------------------------------------------- sharded (FSDP) runs
    def _optimized(self) -> nn.Module:
        """Everything the optimizer trains under one container, so its state has names."""
        return nn.ModuleDict({"model": self.trained, "objectives": self.step.modules})

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The trained model's whole state dict on the CPU (sharded: of rank 0, ``{}`` on the
        others, and every rank must call it)."""
        if self.sharded:
            return fsdp.full_state(self.forward)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
