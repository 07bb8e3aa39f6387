"""The offline teacher: run the teacher once over the training blocks, keep its top-k.

A cache folder holds, for every position of every training block, the teacher's k most likely
tokens, their log-probabilities at the cache's temperature and the log of the probability mass
left over, one compressed record per block (``blocks.bin``, record ``i`` at
``offsets.npy[i]:offsets.npy[i + 1]``; the codec is ``teachers.cache_codec``: ``compact`` about
k·(1 + log2(V/k)/8) bytes a position, ``exact`` float32 log-probabilities), plus ``cache.json``:
what it was made from (teacher weights, tokenizer, data, block size, k, temperature, codec). A
cache that does not match the run reading it, or of another format, is refused.

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
from distillery.teachers.cache_codec import Codec, decode_block, encode_block
from distillery.teachers.signals import LiveTeacher, TeacherBase, TeacherOutput
from distillery.teachers.topk import TopK

CACHE_VERSION = "distillery-teacher-cache-v2"
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
    codec: Codec = "compact",
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
        offsets = [0]
        with (tmp / "blocks.bin").open("wb") as out_file:
            for batch in sequential_batches(data, batch_size):
                out = teacher.run(batch.to(device), logits=False)
                assert out.chunk_logits is not None
                tops = [
                    TopK.of(cut_vocab(out.chunk_logits(part, None), vocab), k, temperature)
                    for part in chunks(batch.numel(), chunk_rows(vocab))
                ]
                ids, logp, rest = (
                    torch.cat([getattr(top, f) for top in tops]).cpu().numpy().reshape(-1, t, *s)
                    for f, s in (("ids", (k,)), ("logp", (k,)), ("rest", ()))
                )
                for b in range(batch.shape[0]):
                    record = encode_block(ids[b], logp[b], rest[b], vocab=vocab, codec=codec)
                    out_file.write(record)
                    offsets.append(offsets[-1] + len(record))
                if progress:
                    progress(len(offsets) - 1, n)
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        meta = {
            "version": CACHE_VERSION,
            **{f: key[f] for f in KEY_FIELDS},
            "codec": codec,
            "blocks": n,
            "seq_len": t,
            "bytes_per_position": offsets[-1] / max(n * t, 1),
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
        except (OSError, ValueError) as exc:
            raise DistilleryError(
                f"teacher cache {folder} is missing or corrupt ({type(exc).__name__}); build it "
                "with `distillery cache-teacher`"
            ) from None
        version = meta.get("version") if isinstance(meta, dict) else None
        if version != CACHE_VERSION:
            raise DistilleryError(
                f"teacher cache {folder} has another format ({version}; this version reads "
                f"{CACHE_VERSION}); rebuild it with `distillery cache-teacher`"
            )
        try:
            self.offsets = np.load(folder / "offsets.npy")
            self.records = np.memmap(folder / "blocks.bin", np.uint8, mode="r")
            int(meta["blocks"]), int(meta["seq_len"]), int(meta["top_k"])
            float(meta["temperature"]), int(meta["vocab"])
            if meta["codec"] not in ("compact", "exact"):
                raise ValueError("unknown codec")
            if self.offsets.shape != (int(meta["blocks"]) + 1,) or self.offsets[-1] != len(
                self.records
            ):
                raise ValueError("offsets.npy does not match blocks.bin")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DistilleryError(
                f"teacher cache {folder} is missing or corrupt ({type(exc).__name__}); build it "
                "with `distillery cache-teacher`"
            ) from None
        stale = [f for f in KEY_FIELDS if f in expect and meta.get(f) != expect[f]]
        if stale or meta.get("blocks") != data.num_blocks:
            what = ", ".join(f"{f}: cache {meta.get(f)!r} ≠ run {expect[f]!r}" for f in stale)
            raise DistilleryError(
                f"teacher cache {folder} does not match this run ({what or 'data blocks differ'}); "
                "rebuild it with `distillery cache-teacher`"
            )
        self.meta, self.vocab, self.codec = meta, int(meta["vocab"]), meta["codec"]
        self.temperature, self.top_k = float(meta["temperature"]), int(meta["top_k"])
        self.config = None
        self.index: dict[bytes, int] = {}
        for start in range(0, data.num_blocks, 4096):  # a slice at a time, not the whole split
            rows = data.blocks(np.arange(start, min(start + 4096, data.num_blocks))).numpy()
            self.index.update((_block_hash(row), start + i) for i, row in enumerate(rows))

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block ``i``'s top-k: ids ``(T, k)``, log-probabilities ``(T, k)``, rest ``(T,)``."""
        record = self.records[self.offsets[i] : self.offsets[i + 1]].tobytes()
        return decode_block(
            record,
            seq_len=int(self.meta["seq_len"]),
            k=self.top_k,
            vocab=self.vocab,
            codec=self.codec,
        )

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
        ids, logp, rest = (
            torch.from_numpy(np.stack(a)).to(device)
            for a in zip(*(self.block(int(b)) for b in blocks), strict=True)
        )
        ids, logp, rest = (
            ids.reshape(-1, self.top_k),
            logp.reshape(-1, self.top_k),
            rest.reshape(-1),
        )
        top = TopK(ids, logp, rest, self.temperature, self.vocab)
        return TeacherOutput(chunk_logits=lambda part, student=None: top[part].dense(student))
