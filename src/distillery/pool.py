"""A pool of codistilling peers (Anil et al. 2018): what one peer shares and what it reads.

- ``Shard``: a peer's own share of the training blocks (every n-th block from its index).
- ``PoolData``: the peer's shard, except on exchange steps of ``predictions`` mode, when every
  peer trains on the same shared batch.
- ``PeerTeacher``: the other peers as a teacher signal — stale copies run on the batch
  (``checkpoints``) or the top-k distributions gathered on the shared batch (``predictions``).
- ``Exchange``: before each step, publishes / loads weights (files, atomic) or all-gathers
  top-k predictions (torch.distributed), and keeps the accounts: bytes, waiting, staleness.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn

from distillery.config import ExchangeSpec
from distillery.data import PackedTokens, global_batch_indices
from distillery.errors import DistilleryError
from distillery.models.loading import compute_params
from distillery.teachers import LiveTeacher, TeacherBase, TeacherOutput, TopK, mean_distribution

PUBLISHED_KEEP = 2  # weight files each peer keeps published


class Shard:
    """Blocks ``index, index + count, index + 2·count, …`` of ``data``."""

    def __init__(self, data: PackedTokens, index: int, count: int) -> None:
        self.data, self.index, self.count = data, index, count
        self.blocks = np.arange(index, data.num_blocks, count, dtype=np.int64)
        if not len(self.blocks):
            raise DistilleryError(
                f"peer {index}: no training blocks in its shard ({data.num_blocks} blocks for "
                f"{count} peers); give more data or a smaller data.seq_len"
            )

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def identity(self) -> str:
        return f"{self.data.identity}/shard{self.index}of{self.count}"

    def examples(
        self, indices: Sequence[int] | np.ndarray, draw: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.examples(self.blocks[np.asarray(indices, dtype=np.int64)], draw)


class PoolData(Shard):
    """The peer's shard; on a shared step, the pool's shared batch instead (the same blocks
    for every peer: batch ``step // every`` of one seeded order over all blocks)."""

    def __init__(self, data: PackedTokens, index: int, count: int, shared_seed: int) -> None:
        super().__init__(data, index, count)
        self.shared_seed = shared_seed
        self.shared_step: int | None = None  # set by the exchange before a shared step

    def shared_indices(self, step: int, batch_size: int) -> np.ndarray:
        return global_batch_indices(self.data.num_blocks, step, batch_size, self.shared_seed)

    def examples(
        self, indices: Sequence[int] | np.ndarray, draw: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared_step is None:
            return super().examples(indices, draw)
        return self.data.examples(self.shared_indices(self.shared_step, len(indices)), draw)


class PeerTeacher(TeacherBase):
    """The other peers' combined next-token distribution on a batch."""

    has_internals = False
    kind = "codistillation peers"

    def __init__(self, spec: ExchangeSpec, config: Any) -> None:
        self.spec, self.config = spec, config
        self.copies: dict[int, LiveTeacher] = {}  # checkpoints mode: stale copies by peer
        self.gathered: list[TopK] = []  # predictions mode: each other peer's top-k
        self.compute_params = 0

    def combine(self, member_logits: list[torch.Tensor]) -> torch.Tensor:
        """``mean``: log of the mean of the peers' probabilities (the objective then softens
        it); ``each``: T·log of the mean of their softened distributions, so that softening at
        T gives the mean of each peer's softened targets (the gradient of the mean of one KL
        per peer)."""
        if self.spec.target == "mean":
            return mean_distribution(member_logits, None)
        t = self.spec.temperature
        return t * mean_distribution([z.float() / t for z in member_logits], None)

    @torch.no_grad()
    def run(
        self, input_ids: torch.Tensor, *, logits: bool = True, **internals: bool
    ) -> TeacherOutput:
        self.logits_only(**internals)
        if self.gathered:
            if self.gathered[0].ids.shape[0] != input_ids.numel():
                raise DistilleryError("internal: the gathered predictions are for another batch")
            peers = self.gathered
            return TeacherOutput(
                chunk_logits=lambda part, student=None: self.combine(
                    [top[part].dense(student) for top in peers]
                )
            )
        outs = [copy.logits(input_ids) for copy in self.copies.values()]
        return TeacherOutput(logits=self.combine(outs))


@dataclass
class Accounts:
    """What the exchange cost this peer."""

    bytes_sent: int = 0
    bytes_received: int = 0
    wait_seconds: float = 0.0
    exchanges: int = 0
    published: int = 0
    loaded: int = 0
    staleness: list[int] = field(default_factory=list)  # own step − copy's step (< 0: ahead)

    def summary(self) -> dict[str, float]:
        stale = self.staleness
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "wait_seconds": self.wait_seconds,
            "exchanges": self.exchanges,
            "published": self.published,
            "loaded": self.loaded,
            "mean_copy_lag_steps": sum(stale) / len(stale) if stale else 0.0,
        }


def _published(folder: Path) -> list[tuple[int, Path]]:
    """(step, file) of a peer's published weights, newest last."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("step-*.safetensors"):
        try:
            found.append((int(path.stem.removeprefix("step-")), path))
        except ValueError:
            continue
    return sorted(found)


class Exchange:
    """Runs before every step of one peer: decides whether it distils, and gets it the
    targets (see the module docstring)."""

    def __init__(
        self,
        spec: ExchangeSpec,
        *,
        peer: int,
        peers: int,
        model: nn.Module,
        data: PoolData,
        pool_dir: Path,
        build_peer: Any,  # (peer index) -> a fresh model of that peer's architecture
        device: torch.device,
    ) -> None:
        self.spec, self.peer, self.peers, self.model = spec, peer, peers, model
        self.data, self.pool_dir, self.build_peer, self.device = data, pool_dir, build_peer, device
        self.teacher = PeerTeacher(spec, model.config)
        self.versions: dict[int, int] = {}  # checkpoints: the published step held, per peer
        self.accounts = Accounts()
        self.active = False  # whether this step has a distillation term

    # ----------------------------------------------------------------- checkpoints mode
    def publish(self, step: int) -> None:
        """Write this peer's weights as ``pool/peer{i}/step-N.safetensors`` (atomically)."""
        folder = self.pool_dir / f"peer{self.peer}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-step-{step:07d}.safetensors"
        save_model(self.model, str(tmp))  # tied weights stored once
        final = folder / f"step-{step:07d}.safetensors"
        tmp.replace(final)
        self.accounts.bytes_sent += final.stat().st_size
        self.accounts.published += 1
        for _, old in _published(folder)[:-PUBLISHED_KEEP]:
            old.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Load every other peer's newest published weights that are newer than the copy held
        (a file pruned meanwhile is simply picked up at a later step)."""
        for other in range(self.peers):
            if other == self.peer:
                continue
            found = _published(self.pool_dir / f"peer{other}")
            if not found or found[-1][0] <= self.versions.get(other, -1):
                continue
            version, path = found[-1]
            if other not in self.teacher.copies:
                self.teacher.copies[other] = LiveTeacher(self.build_peer(other).to(self.device))
            try:
                size = path.stat().st_size
                load_model(self.teacher.copies[other].model, str(path), device=str(self.device))
            except (FileNotFoundError, OSError):
                continue  # pruned meanwhile: a newer one is there next step
            self.versions[other] = version
            self.accounts.bytes_received += size
            self.accounts.loaded += 1

    # ----------------------------------------------------------------- predictions mode
    @torch.no_grad()
    def _own_top_k(self, ids: torch.Tensor) -> TopK:
        """This peer's top-k on the shared batch, at the temperature its peers' targets are
        made at (``each``: softened per peer; ``mean``: at 1, the objective softens the mean)."""
        was = self.model.training
        self.model.eval()
        logits = self.model(input_ids=ids).logits.reshape(ids.numel(), -1)  # (N, V)
        self.model.train(was)
        temperature = self.spec.temperature if self.spec.target == "each" else 1.0
        return TopK.of(logits, self.spec.top_k, temperature)

    def gather(self, step: int, batch_size: int) -> None:
        """All-gather every peer's top-k (ids, log-probabilities and the left-over mass) on
        the shared batch; keep the others'."""
        ids = self.data.data.examples(self.data.shared_indices(step // self.spec.every, batch_size))
        own = self._own_top_k(ids[0].to(self.device))
        k = self.spec.top_k
        payload = torch.cat([own.logp, own.ids.float(), own.rest[:, None]], dim=-1).contiguous()
        gathered = [torch.empty_like(payload) for _ in range(self.peers)]  # (N, 2k + 1) each
        start = time.perf_counter()
        try:
            dist.all_gather(gathered, payload)
        except RuntimeError as exc:
            raise DistilleryError(
                f"peer {self.peer}: a peer did not answer the exchange at step {step} "
                f"({str(exc).splitlines()[0][:120]}); restart the pool with --resume"
            ) from None
        self.accounts.wait_seconds += time.perf_counter() - start
        size = payload.numel() * payload.element_size()
        self.accounts.bytes_sent += size
        self.accounts.bytes_received += size * (self.peers - 1)
        self.teacher.gathered = [
            TopK(part[:, k : 2 * k].long(), part[:, :k], part[:, -1], own.temperature, own.vocab)
            for other, part in enumerate(gathered)
            if other != self.peer
        ]

    # ----------------------------------------------------------------- every step
    def before_step(self, step: int, batch_size: int) -> float:
        """Prepare step ``step``; returns the teacher-side FLOPs per trained token it costs."""
        spec = self.spec
        self.active, self.data.shared_step, self.teacher.gathered = False, None, []
        if spec.mode == "none":
            return 0.0
        if spec.mode == "checkpoints":
            if step and step % spec.every == 0:
                self.publish(step)
            self.refresh()
            self.active = step >= spec.burn_in and bool(self.teacher.copies)
            if not self.active:
                return 0.0
            self.accounts.staleness.extend(step - v for v in self.versions.values())
            return 2.0 * sum(c.compute_params for c in self.teacher.copies.values())
        if step % spec.every or step < spec.burn_in:
            return 0.0
        self.gather(step, batch_size)
        self.accounts.exchanges += 1
        self.data.shared_step = step // spec.every
        self.active = True
        return 2.0 * compute_params(self.model)  # type: ignore[arg-type]  # its sharing forward


def agree_on_start(step: int, collective: bool) -> int:
    """The step every peer resumes from in ``predictions`` mode: the smallest of the peers'
    newest checkpoints (peers exchange in lockstep, so they must restart together)."""
    if not collective:
        return step
    mine = torch.tensor([step], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return int(min(t.item() for t in everyone))


def check_same_config(digest: str, collective: bool) -> None:
    """Every peer must run the same config (one line naming the peers that differ)."""
    if not collective:
        return
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, digest)
    differ = [i for i, d in enumerate(everyone) if d != everyone[0]]
    if differ:
        raise DistilleryError(
            f"peers {differ} were started with another config than peer 0; start every peer "
            "with the same --config and overrides"
        )
