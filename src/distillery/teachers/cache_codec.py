"""How a teacher cache stores one block's top-k: a few hundred bytes a position, not 8·k + 4.

Each position's k tokens are sorted by id and kept as gaps between consecutive ids (small
numbers: about V/k apart), split into byte planes (all low bytes, then the next ones), so zlib
finds the runs of zero high bytes. Their log-probabilities, in the same order, are
  ``compact``  quantised to 8 bits on the position's own range [min, max] (kept in float16):
               at most half a step, (max − min)/510 nats, from the teacher's value;
  ``exact``    float32, unchanged.
The log of the left-over mass is float16 (compact) or float32 (exact). One block is one zlib
stream, so a batch decodes only its own blocks.
"""

from __future__ import annotations

import zlib
from typing import Literal

import numpy as np

Codec = Literal["compact", "exact"]
LEVELS = 255  # the compact codec's quantisation steps


def _id_bytes(vocab: int) -> int:
    """Bytes a gap between token ids needs (vocabularies up to 2^24)."""
    return 1 if vocab <= 2**8 else 2 if vocab <= 2**16 else 3


def encode_block(
    ids: np.ndarray, logp: np.ndarray, rest: np.ndarray, *, vocab: int, codec: Codec
) -> bytes:
    """One block's ``ids``/``logp`` ``(T, k)`` and ``rest`` ``(T,)`` as one compressed record."""
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids.astype(np.int64), order, 1)
    logp = np.take_along_axis(logp.astype(np.float32), order, 1)
    gaps = np.diff(ids, axis=1, prepend=-1) - 1  # ≥ 0: the ids are distinct
    planes = gaps.astype("<u4").view(np.uint8).reshape(*gaps.shape, 4)[..., : _id_bytes(vocab)]
    parts = [np.ascontiguousarray(np.moveaxis(planes, -1, 0)).tobytes()]
    if codec == "compact":
        hi, lo = logp.max(1), logp.min(1)  # (T,)
        hi16, lo16 = hi.astype(np.float16), lo.astype(np.float16)
        span = np.maximum(hi16.astype(np.float32) - lo16.astype(np.float32), 1e-12)
        q = np.rint((hi16.astype(np.float32)[:, None] - logp) / span[:, None] * LEVELS)
        parts += [np.clip(q, 0, LEVELS).astype(np.uint8).tobytes(), hi16.tobytes()]
        parts += [lo16.tobytes(), rest.astype(np.float16).tobytes()]
    else:
        parts += [logp.tobytes(), rest.astype(np.float32).tobytes()]
    return zlib.compress(b"".join(parts), 6)


def decode_block(
    record: bytes, *, seq_len: int, k: int, vocab: int, codec: Codec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``encode_block`` undone: ids int64 ``(T, k)``, logp float32 ``(T, k)``, rest ``(T,)``."""
    raw = np.frombuffer(zlib.decompress(record), np.uint8)
    t, nb = seq_len, _id_bytes(vocab)
    planes, at = raw[: nb * t * k].reshape(nb, t, k), nb * t * k
    gaps = np.zeros((t, k), np.int64)
    for i in range(nb):
        gaps |= planes[i].astype(np.int64) << (8 * i)
    ids = np.cumsum(gaps + 1, axis=1) - 1
    if codec == "compact":
        q = raw[at : at + t * k].reshape(t, k).astype(np.float32)
        at += t * k
        hi, lo, rest = (
            raw[at + 2 * t * i : at + 2 * t * (i + 1)].view(np.float16) for i in range(3)
        )
        span = hi.astype(np.float32) - lo.astype(np.float32)
        logp = hi.astype(np.float32)[:, None] - q * (span / LEVELS)[:, None]
        return ids, logp, rest.astype(np.float32)
    logp = raw[at : at + 4 * t * k].view(np.float32).reshape(t, k)
    return ids, logp.copy(), raw[at + 4 * t * k :].view(np.float32).copy()
