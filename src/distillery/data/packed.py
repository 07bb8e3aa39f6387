"""Token caches on disk, fixed-length blocks over them, and step-addressable batch order.

Blocks follow the tokenizer's own special-token convention (``special_layout``): a tokenizer
that puts a BOS before every text it encodes (Llama 3, Gemma) gets every block starting with
that BOS — ``[bos] + seq_len-1`` tokens of the stream —, an encoder's (BERT: ``[CLS] ... [SEP]``,
RoBERTa: ``<s> ... </s>``) every block framed by its tokens, and one that adds none (GPT-2, Qwen2,
the lab's BPE) plain ``seq_len`` tokens. The BOS is per *block*, not per document: a pretrained
model has only ever seen a sequence whose first position is the BOS, and a packed block that
starts mid-document without one is scored far worse (the issue measured perplexity 126 vs 23).
The stream on disk is the same either way (documents joined by eos); the convention is recorded
in the cache's ``meta.json`` and key, so a cache without it is never read as one with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillery.data.tokenizer import special_layout, tokenizer_fingerprint
from distillery.errors import DistilleryError
from distillery.files import publish_folder, temp_folder_next_to

IGNORE_INDEX = -100  # a label that no loss counts (torch's cross-entropy convention)
_VERSION = "distillery-tokens-v1"
_BATCH_DOCS = 256


def _cache_key(
    splits: dict[str, list[str]], fingerprint: str, specials: dict[str, list[int]]
) -> str:
    """Content key of a cache; ``specials`` (the block layout) enters it only when not empty, so
    the keys of tokenizers that add no special tokens are what they always were."""
    header = f"{_VERSION}\0{fingerprint}" + (f"\0{json.dumps(specials)}" if specials else "")
    digest = hashlib.sha256(header.encode())
    for name in sorted(splits):
        digest.update(f"\0split\0{name}\0{len(splits[name])}\0".encode())
        for doc in splits[name]:
            data = doc.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast path; also avoids HF's max-length warnings on long documents
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _separator(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id that ends each document in the stream: eos, else (BERT) sep."""
    eos = tokenizer.eos_token_id
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


def _token_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str], dtype: type) -> np.ndarray:
    """All documents' tokens concatenated, eos (BERT: sep) after each document."""
    eos = np.array([_separator(tokenizer)], dtype=dtype)
    pieces = []
    for start in range(0, len(docs), _BATCH_DOCS):
        for ids in _encode(tokenizer, docs[start : start + _BATCH_DOCS]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def build_token_cache(
    splits: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, cache_root: Path
) -> Path:
    """Tokenize every split once into cache_root/tokens/<key>; reuse it when it exists."""
    if _separator(tokenizer) is None:
        raise DistilleryError(
            "the tokenizer has no eos (or sep) token: set one so documents can be joined"
        )
    for name in splits:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise DistilleryError(f"split name '{name}' must use only letters, digits, _ and -")
    fingerprint = tokenizer_fingerprint(tokenizer)
    prefix, suffix = special_layout(tokenizer)
    specials = {"prefix": prefix, "suffix": suffix} if prefix or suffix else {}
    folder = Path(cache_root) / "tokens" / _cache_key(splits, fingerprint, specials)
    if folder.is_dir():
        return folder
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    meta = {
        "version": _VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": len(tokenizer),
        "eos_token_id": _separator(tokenizer),
        "tokens": {},
        "documents": {},
        "tokenizer": fingerprint,
        **specials,  # ids every block starts ("prefix") and ends ("suffix") with
    }
    tmp = temp_folder_next_to(folder)
    try:
        for name, docs in splits.items():
            stream = _token_stream(tokenizer, docs, dtype)
            stream.tofile(tmp / f"{name}.bin")
            meta["tokens"][name] = int(stream.size)
            meta["documents"][name] = len(docs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        publish_folder(tmp, folder, replace=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class PackedTokens:
    """Non-overlapping blocks of seq_len tokens over one split of a token cache (memory-mapped):
    the cache's ``prefix`` ids, then the next ``seq_len - len(prefix) - len(suffix)`` tokens of
    the stream, then its ``suffix`` ids (both empty unless the tokenizer adds special tokens)."""

    def __init__(self, folder: Path, split: str, seq_len: int) -> None:
        folder = Path(folder)
        if seq_len < 1:
            raise DistilleryError(f"seq_len must be a positive integer, got {seq_len}")
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"])
            n_tokens = int(meta["tokens"][split]) if split in meta["tokens"] else None
            vocab_size = int(meta["vocab_size"])
            prefix = [int(i) for i in meta.get("prefix", [])]
            suffix = [int(i) for i in meta.get("suffix", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DistilleryError(
                f"token cache '{folder}' is missing or corrupt ({type(exc).__name__}): "
                "delete it and run again to rebuild it"
            ) from None
        if n_tokens is None:
            raise DistilleryError(
                f"token cache '{folder}' has no split '{split}' "
                f"(splits: {', '.join(meta['tokens'])})"
            )
        path = folder / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != n_tokens * dtype.itemsize:
            raise DistilleryError(
                f"token cache file '{path}' is missing or has the wrong size: "
                "delete the cache folder and run again to rebuild it"
            )
        body = seq_len - len(prefix) - len(suffix)
        if body < 1:
            raise DistilleryError(
                f"seq_len={seq_len} leaves no room for text between the tokenizer's "
                f"{len(prefix) + len(suffix)} special tokens of each block; raise seq_len"
            )
        if n_tokens < body:
            raise DistilleryError(
                f"split '{split}' has {n_tokens} tokens, fewer than seq_len={seq_len}: "
                "use a smaller seq_len or more data"
            )
        self.folder, self._split = folder, split
        self._seq_len, self._body = seq_len, body
        self.prefix, self.suffix = prefix, suffix
        self._vocab_size = vocab_size
        self._data = np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def identity(self) -> str:
        """What these blocks are: the token cache's content key, the split and the block size."""
        return f"{self.folder.name}/{self._split}/{self._seq_len}"

    @property
    def num_tokens(self) -> int:
        return int(self._data.shape[0])

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // self._body

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self.num_blocks

    def blocks(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """A LongTensor (len(indices), seq_len): block i is ``prefix`` + stream tokens
        [i*b, (i+1)*b) + ``suffix``, b = seq_len minus the special tokens (b = seq_len without)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_blocks):
            raise IndexError(f"block index out of range [0, {self.num_blocks}) in split")
        offsets = idx[:, None] * self._body + np.arange(self._body, dtype=np.int64)
        body = self._data[offsets].astype(np.int64)  # (B, b)
        if self.prefix or self.suffix:
            before = np.tile(np.asarray(self.prefix, dtype=np.int64), (len(idx), 1))
            after = np.tile(np.asarray(self.suffix, dtype=np.int64), (len(idx), 1))
            body = np.concatenate([before, body, after], axis=1)  # (B, seq_len)
        return torch.from_numpy(body)

    def examples(
        self, indices: Sequence[int] | np.ndarray, draw: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, next-token labels), both ``(len(indices), seq_len)``; no position learns
        to predict a block's suffix (an end marker where no document ends)."""
        ids = self.blocks(indices)
        labels = shift_labels(ids)
        if self.suffix:
            labels[:, -1 - len(self.suffix) :] = IGNORE_INDEX
        return ids, labels


def shift_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token labels ``(B, T)``: position t predicts token t+1; last and padding are -100."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        labels[:, :-1] = torch.where(keep, labels[:, :-1], IGNORE_INDEX)
    return labels


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_blocks)
    perm.flags.writeable = False  # shared through the cache
    return perm


def global_batch_indices(num_blocks: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Block indices of global batch `step` in a stream of one fresh permutation per epoch."""
    if num_blocks < 1 or batch_size < 1 or step < 0 or seed < 0:
        raise DistilleryError(
            "global_batch_indices needs num_blocks >= 1, batch_size >= 1, step >= 0, seed >= 0 "
            f"(got {num_blocks}, {batch_size}, {step}, {seed})"
        )
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs = positions // num_blocks
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = _epoch_permutation(num_blocks, seed, int(epoch))[positions[mask] % num_blocks]
    return out


def sequential_batches(
    data: PackedTokens, batch_size: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Blocks 0, 1, 2, ... in batches of batch_size (the last may be smaller)."""
    if batch_size < 1:
        raise DistilleryError(f"batch_size must be >= 1, got {batch_size}")
    for count, start in enumerate(range(0, data.num_blocks, batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        yield data.blocks(np.arange(start, min(start + batch_size, data.num_blocks)))
