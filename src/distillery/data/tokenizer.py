"""Byte-level BPE tokenizers: train, save atomically, cache, load and fingerprint; the special
tokens a tokenizer puts around a text."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distillery.errors import DistilleryError
from distillery.files import publish_folder, temp_folder_next_to

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MIN_VOCAB_SIZE = 300
_FORMAT = "distillery-bpe-v1"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def train_bpe_tokenizer(
    docs: list[str], vocab_size: int, out_dir: Path, *, replace: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on docs and save it (atomically) to out_dir."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DistilleryError(
            f"vocab_size {vocab_size} is too small: use at least {MIN_VOCAB_SIZE} "
            "(256 bytes + special tokens + merges)"
        )
    if not docs:
        raise DistilleryError("cannot train a tokenizer on an empty corpus: give some documents")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(docs, trainer=trainer, length=len(docs))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    tmp = temp_folder_next_to(out_dir)
    try:
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, out_dir, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Load a saved tokenizer from a local folder; pad falls back to eos."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DistilleryError(f"tokenizer folder '{folder}' not found: train or save one there")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise DistilleryError(
            f"tokenizer folder '{folder}' has no tokenizer files "
            f"(expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistilleryError(f"cannot load the tokenizer in '{folder}': {message}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _docs_key(*parts: object, docs: list[str]) -> str:
    """sha256 over some header values and every document (length-prefixed, so unambiguous)."""
    digest = hashlib.sha256(json.dumps(parts).encode())
    for doc in docs:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cached_bpe_tokenizer(
    docs: list[str], vocab_size: int, cache_root: Path
) -> tuple[PreTrainedTokenizerFast, Path]:
    """Train a BPE tokenizer once per (vocab_size, docs) and reuse it from cache_root."""
    folder = Path(cache_root) / "tokenizers" / _docs_key(_FORMAT, vocab_size, docs=docs)
    if folder.is_dir():
        return load_tokenizer(folder), folder
    # Content-addressed: never replace a folder another job may be reading.
    return train_bpe_tokenizer(docs, vocab_size, folder, replace=False), folder


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 that changes when the vocabulary, merges or special tokens change."""
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # padding/truncation are per-call settings that HF toggles on the backend: not identity.
        state.pop("padding", None)
        state.pop("truncation", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"special": special, "state": state}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def special_layout(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(ids the tokenizer puts before a text, ids it puts after) when it encodes with its special
    tokens, read from what it does: ``[bos]`` and ``[]`` for Llama 3 / Gemma tokenizers,
    ``[cls]`` and ``[sep]`` for BERT (``<s>``, ``</s>`` for RoBERTa), ``[]`` and ``[]`` for
    GPT-2, Qwen2 and the lab's own BPE."""
    probe = "Hello world, 42 times."
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise DistilleryError(
        "cannot tell which special tokens the tokenizer adds: encoding a text with them does not "
        "contain its encoding without them; give a tokenizer that adds them around the text"
    )
