"""The one training loop, for plain training and distillation alike.

AdamW, linear warmup + cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
optional ``torch.compile``, data-parallel under ``torchrun``, a FLOPs meter, JSONL and
TensorBoard metrics, atomic checkpoints and exact resume.

Loss normalisation (the loss contract): a step's objective sums are divided once by the number
of valid positions in the whole *global* batch, counted before the first backward, so micro-
batching and the number of processes do not change the gradient.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distillery.config import TrainConfig
from distillery.data import Examples, global_batch_indices
from distillery.distributed import DistEnv, all_reduce_sum
from distillery.errors import DistilleryError
from distillery.files import atomic_write_text
from distillery.objectives.mix import LossMix

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt", "state.json")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine down to ``min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_for_budget(cfg: TrainConfig, flops_per_step: float) -> TrainConfig:
    """``cfg`` with ``steps`` set to the whole steps ``cfg.flops_budget`` pays for (unchanged
    without a budget); a budget smaller than one step is refused."""
    if cfg.flops_budget is None:
        return cfg
    steps = int(cfg.flops_budget // flops_per_step)
    if steps < 1:
        raise DistilleryError(
            f"train.flops_budget={cfg.flops_budget:.3g} is less than one step "
            f"({flops_per_step:.3g} FLOPs); raise it"
        )
    return cfg.model_copy(update={"steps": steps})


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (``auto``: on GPU only), else nothing."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (``step`` is also the data position)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint folder (``step-NNNNNNN``) was written at."""
    return int(ckpt.name.removeprefix("step-"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones never get their final name)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


class Engine:
    """Trains ``model`` on ``data`` with ``loss`` according to ``cfg``, writing to ``out_dir``."""

    def __init__(
        self,
        model: nn.Module,
        loss: LossMix,
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
        self.cfg, self.loss, self.data, self.out_dir = cfg, loss, data, Path(out_dir)
        self.device, self.eval_fn, self.name = device, eval_fn, name
        self.flops_per_token = flops_per_token
        if cfg.batch_size % self.env.world_size:
            raise DistilleryError(
                f"train.batch_size {cfg.batch_size} is not divisible by the "
                f"{self.env.world_size} processes"
            )
        self.per_rank = cfg.batch_size // self.env.world_size
        self.micro = min(cfg.micro_batch_size or self.per_rank, self.per_rank)
        self.model = model.to(device)  # the raw module: saved, evaluated
        self.model.train()
        forward: nn.Module = self.model
        if cfg.compile:
            forward = torch.compile(forward)  # type: ignore[assignment]
        if self.env.active:
            ids = [device.index] if device.type == "cuda" else None
            # Without a logit term, representation terms may leave parameters unused (the head,
            # blocks after the last mapped layer), which DDP must be told about.
            forward = DistributedDataParallel(
                forward, device_ids=ids, find_unused_parameters=not loss.logit_terms
            )
        self.forward = forward
        # The objectives' own parameters (learned projections) train with the model; DDP does
        # not see them, so their gradients are all-reduced by hand.
        self.loss.projections.to(device)
        self.extra = self.loss.parameters()
        trained = [p for p in [*self.model.parameters(), *self.extra] if p.requires_grad]
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
        self._resumed_at: int | None = None
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._tb: Any = None

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNNN`` atomically (rank 0) and prune old ones."""
        if not self.env.is_main:
            return None
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.progress.step:07d}"
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(self.model, str(tmp / "model.safetensors"))
        if self.extra:
            save_model(self.loss.projections, str(tmp / "objectives.safetensors"))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }
        torch.save(trainer_state, tmp / "trainer_state.pt")
        state = {
            **asdict(self.progress),
            "samples_seen": self.progress.step * self.cfg.batch_size,
            "run": self._run_fingerprint(),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore model, optimizer, scheduler, RNG and data position from ``ckpt``."""
        missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
        if missing:
            raise DistilleryError(f"checkpoint {ckpt} is incomplete (no {', '.join(missing)})")
        try:
            state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DistilleryError(
                f"checkpoint {ckpt} is corrupt (state.json: {exc}); delete it to resume from an "
                "earlier one, or start again without --resume"
            ) from None
        self._check_same_run(ckpt, state.get("run", {}))
        if self.extra and not (ckpt / "objectives.safetensors").is_file():
            raise DistilleryError(f"checkpoint {ckpt} is incomplete (no objectives.safetensors)")
        try:
            trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
            load_model(
                self.model, str(ckpt / "model.safetensors"), strict=True, device=str(self.device)
            )
            if self.extra:
                load_model(
                    self.loss.projections,
                    str(ckpt / "objectives.safetensors"),
                    strict=True,
                    device=str(self.device),
                )
            self.optimizer.load_state_dict(trainer_state["optimizer"])
            self.scheduler.load_state_dict(trainer_state["scheduler"])
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
            raise DistilleryError(
                f"checkpoint {ckpt} is corrupt ({reason[:160]}); delete it to resume from an "
                "earlier one, or start again without --resume"
            ) from None
        self.progress = progress

    def _run_fingerprint(self) -> dict[str, Any]:
        """What must not change on resume: data order and block size, and the weights' shapes."""

        def digest(state: dict[str, torch.Tensor]) -> str:
            shapes = {k: list(v.shape) for k, v in state.items()}
            return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]

        return {
            "train.batch_size": self.cfg.batch_size,
            "train.seed": self.cfg.seed,
            "train.data_offset": self.cfg.data_offset,
            "data.seq_len": self.data.seq_len,
            "data.num_blocks": self.data.num_blocks,
            "model shapes": digest(self.model.state_dict()),
            "objective projections": digest(self.loss.projections.state_dict()),
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
        self.load_checkpoint(found[-1])
        if self.progress.step > self.cfg.steps:
            raise DistilleryError(
                f"checkpoint {found[-1]} is past train.steps={self.cfg.steps}; raise train.steps"
            )
        self._truncate_metrics(self.progress.step)
        self._resumed_at = self.progress.step + 1
        return self.progress.step

    # ----------------------------------------------------------------- logging
    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after checkpoint ``step`` by the run that was interrupted.

        The end-of-run evaluation (``"final": true``) is logged after the last checkpoint.
        """
        if not self.env.is_main or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["step"] < step or (record["step"] == step and not record.get("final")):
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
        atomic_write_text(self.metrics_path, "".join(f"{x}\n" for x in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (rank 0) and mirror scalars to TensorBoard."""
        if not self.env.is_main:
            return
        record = {"run": self.name, **record}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    log_dir=str(self.out_dir / "tensorboard"), purge_step=self._resumed_at
                )
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(f"{self.name}/{key}", value, record["step"])

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
        # Labelled positions, and positions representation terms count (see LossMix), over
        # the global batch: the loss is divided once by the first.
        counts = torch.stack([self.loss.counts(ids, y) for ids, y in micro_batches]).sum(0)
        n_global, n_states = all_reduce_sum(counts.to(self.device), self.env).tolist()
        state_scale = max(n_global, 1.0) / max(n_states, 1.0)
        scale = self.env.world_size / max(n_global, 1.0)  # DDP averages over ranks
        sums: dict[str, torch.Tensor] = {}
        for i, (ids, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if self.env.active and not last:
                sync = self.forward.no_sync()  # type: ignore[operator]
            with sync:
                with autocast_context(self.device, self.cfg.precision):
                    total, terms = self.loss(
                        self.forward,
                        ids.to(self.device),
                        y.to(self.device),
                        state_scale=state_scale,
                    )
                (total * scale).backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["loss"] = sums.get("loss", 0.0) + total.detach().float()
        for p in self.extra if self.env.active else []:  # averaged over ranks, as DDP does
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = all_reduce_sum(grad, self.env) / self.env.world_size
        grad_norm = None
        if self.cfg.grad_clip is not None:
            params = [*self.model.parameters(), *self.extra]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        names = sorted(sums)
        reduced = all_reduce_sum(torch.stack([sums[k] for k in names]), self.env).cpu()
        out = {k: float(v) / max(n_global, 1.0) for k, v in zip(names, reduced, strict=True)}
        if not math.isfinite(out["loss"]):
            raise DistilleryError(
                f"the loss is not finite at step {step + 1} (diverged); lower train.lr or "
                "raise train.warmup_steps, then resume from the last checkpoint"
            )
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
        elif self.env.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()
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
        if self._tb is not None:
            self._tb.flush()
        return self.progress

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` on the raw model in eval mode and log it."""
        assert self.eval_fn is not None
        self.model.eval()
        with autocast_context(self.device, self.cfg.precision):
            metrics = self.eval_fn(self.model)
        self.model.train()
        self.log({"step": self.progress.step, **metrics})
        return metrics
