"""The offline teacher: run the teacher once over the training blocks, keep its top-k.

A cache folder holds, for every position of every training block, the teacher's k most likely
tokens (``ids.npy``, int32 ``(blocks, T, k)``), their log-probabilities at the cache's
temperature (``logp.npy``, float32) and the log of the probability mass left over
(``rest.npy``, ``(blocks, T)``), as memory-mapped NumPy arrays, plus ``cache.json``: what it was
made from (teacher weights, tokenizer, data, block size, k, temperature). A cache that does not
match the run reading it is refused.

Reading it (``CachedTeacher``), the teacher's distribution is rebuilt a chunk of positions at a
time as a ``teachers.topk.TopK`` (the top-k exactly, the rest spread in proportion to the
student's own probabilities), so every logit objective runs unchanged.
``hard_labels`` is refused with a cache (a completed tail token could outrank the top-1). The logits
handed out are ``T_cache · log p``, so an objective softening them at the cache's temperature
recovers the cached distribution exactly; objectives at another temperature are refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.data import PackedTokens, sequential_batches, tokenizer_fingerprint
from distillery.errors import DistilleryError
from distillery.files import publish_folder, temp_folder_next_to, write_json
from distillery.models.heads import chunk_rows, chunks, cut_vocab
from distillery.teachers.signals import LiveTeacher, TeacherBase, TeacherOutput
from distillery.teachers.topk import TopK

CACHE_VERSION = "distillery-teacher-cache-v1"
KEY_FIELDS = ("teacher", "tokenizer", "data", "vocab", "top_k", "temperature")


def model_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's config and weight files (what decides its outputs)."""
    digest = hashlib.sha256()
    weights = [p for ext in ("*.safetensors", "*.bin", "*.pt") for p in Path(folder).glob(ext)]
    files = [*sorted(weights), Path(folder) / "config.json"]
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(teacher_dir: Path, tokenizer: Any, data: PackedTokens) -> dict[str, Any]:
    """What a cache must have been made from for a run: teacher, tokenizer, data, vocabulary."""
    return {
        "teacher": model_fingerprint(teacher_dir),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data.identity,
        "vocab": len(tokenizer),
    }


def check_cache_objectives(objectives: list[Any], temperature: float, folder: Path) -> None:
    """Soft objectives must soften at the cache's temperature (the cache holds p at T only);
    ``hard_labels`` needs the teacher's argmax, which a completed tail could hide."""
    if any(o.kind == "hard_labels" for o in objectives):
        raise DistilleryError(
            "hard_labels cannot read a teacher cache; use forward_kl (or a live teacher)"
        )
    wrong = [o.kind for o in objectives if getattr(o, "temperature", temperature) != temperature]
    if wrong:
        raise DistilleryError(
            f"objectives {wrong} use another temperature than the teacher cache {folder} "
            f"(T={temperature:g}); set their temperature to {temperature:g} or rebuild the cache"
        )


def _block_hash(row: np.ndarray) -> bytes:
    return hashlib.blake2b(
        np.ascontiguousarray(row, dtype=np.int64).tobytes(), digest_size=16
    ).digest()


@torch.no_grad()
def build_teacher_cache(
    teacher: LiveTeacher,
    data: PackedTokens,
    dest: Path,
    *,
    key: dict[str, Any],
    device: torch.device,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``teacher`` over every block of ``data`` into the cache folder ``dest``; its meta."""
    k, temperature, vocab = int(key["top_k"]), float(key["temperature"]), int(key["vocab"])
    if not 1 <= k < vocab:
        raise DistilleryError(f"top_k={k}: give 1 ≤ top_k < the vocabulary ({vocab})")
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise DistilleryError(f"--out {dest} already exists; use --overwrite to rebuild it")
    n, t = data.num_blocks, data.seq_len
    tmp = temp_folder_next_to(dest)
    start = time.perf_counter()
    try:
        ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.int32, (n, t, k))
        logp = np.lib.format.open_memmap(tmp / "logp.npy", "w+", np.float32, (n, t, k))
        rest = np.lib.format.open_memmap(tmp / "rest.npy", "w+", np.float32, (n, t))
        done = 0
        for batch in sequential_batches(data, batch_size):
            rows = slice(done, done + batch.shape[0])
            out = teacher.run(batch.to(device), logits=False)
            assert out.chunk_logits is not None
            flat_ids = np.empty((batch.numel(), k), np.int32)
            flat_logp = np.empty((batch.numel(), k), np.float32)
            flat_rest = np.empty(batch.numel(), np.float32)
            for part in chunks(batch.numel(), chunk_rows(vocab)):
                top = TopK.of(cut_vocab(out.chunk_logits(part, None), vocab), k, temperature)
                flat_ids[part] = top.ids.cpu().numpy()
                flat_logp[part] = top.logp.cpu().numpy()
                flat_rest[part] = top.rest.cpu().numpy()
            ids[rows] = flat_ids.reshape(-1, t, k)
            logp[rows] = flat_logp.reshape(-1, t, k)
            rest[rows] = flat_rest.reshape(-1, t)
            done += batch.shape[0]
            if progress:
                progress(done, n)
        for array in (ids, logp, rest):
            array.flush()
        del ids, logp, rest
        meta = {
            "version": CACHE_VERSION,
            **{f: key[f] for f in KEY_FIELDS},
            "blocks": n,
            "seq_len": t,
            "teacher_flops": 2.0 * teacher.compute_params * n * t,
            "seconds": time.perf_counter() - start,
        }
        write_json(tmp / "cache.json", meta)
        publish_folder(tmp, dest, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class CachedTeacher(TeacherBase):
    """A teacher signal read from a cache: no teacher forward passes while distilling.

    Batches are looked up by their tokens (a hash of each block), so the engine's data order,
    seeds and processes need no coordination with the cache. ``logits()`` (no student to
    follow) spreads the left-over mass evenly.
    """

    has_internals = False
    kind = "a teacher cache"
    compute_params = 0  # reading the cache costs no teacher FLOPs (the cache's own are in meta)

    def __init__(self, folder: Path, data: PackedTokens, expect: dict[str, Any]) -> None:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "cache.json").read_text(encoding="utf-8"))
            arrays = [
                np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("ids", "logp", "rest")
            ]
            shape = (int(meta["blocks"]), int(meta["seq_len"]), int(meta["top_k"]))
            float(meta["temperature"]), int(meta["vocab"])
            if [a.shape for a in arrays] != [shape, shape, shape[:2]]:
                raise ValueError("array shapes do not match cache.json")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DistilleryError(
                f"teacher cache {folder} is missing or corrupt ({type(exc).__name__}); build it "
                "with `distillery cache-teacher`"
            ) from None
        if meta.get("version") != CACHE_VERSION:
            raise DistilleryError(f"teacher cache {folder} has another format; rebuild it")
        stale = [f for f in KEY_FIELDS if f in expect and meta.get(f) != expect[f]]
        if stale or meta.get("blocks") != data.num_blocks:
            what = ", ".join(f"{f}: cache {meta.get(f)!r} ≠ run {expect[f]!r}" for f in stale)
            raise DistilleryError(
                f"teacher cache {folder} does not match this run ({what or 'data blocks differ'}); "
                "rebuild it with `distillery cache-teacher`"
            )
        self.ids, self.logp, self.rest = arrays
        self.meta, self.vocab = meta, int(meta["vocab"])
        self.temperature, self.top_k = float(meta["temperature"]), int(meta["top_k"])
        self.config = None
        self.index: dict[bytes, int] = {}
        for start in range(0, data.num_blocks, 4096):  # a slice at a time, not the whole split
            rows = data.blocks(np.arange(start, min(start + 4096, data.num_blocks))).numpy()
            self.index.update((_block_hash(row), start + i) for i, row in enumerate(rows))

    def _lookup(self, input_ids: torch.Tensor) -> np.ndarray:
        found = [self.index.get(_block_hash(row)) for row in input_ids.cpu().numpy()]
        if any(i is None for i in found):
            raise DistilleryError("a training batch is not in the teacher cache; rebuild it")
        return np.asarray(found, dtype=np.int64)

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput:
        """The cached distribution of these blocks, always chunk-wise (its completion needs the
        student's logits); ``logits`` is ignored."""
        self.logits_only(hidden_states=hidden_states, attentions=attentions)
        blocks = self._lookup(input_ids)
        device = input_ids.device
        k = self.top_k
        ids = torch.from_numpy(np.asarray(self.ids[blocks])).to(device).reshape(-1, k)
        logp = torch.from_numpy(np.asarray(self.logp[blocks])).to(device).reshape(-1, k)
        rest = torch.from_numpy(np.asarray(self.rest[blocks])).to(device).reshape(-1)
        top = TopK(ids, logp, rest, self.temperature, self.vocab)
        return TeacherOutput(chunk_logits=lambda part, student=None: top[part].dense(student))
