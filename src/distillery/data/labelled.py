"""Labelled texts for classification: split, class ids, and fixed-length token rows in memory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillery.data.packed import _encode
from distillery.data.sources import split_documents
from distillery.data.tokenizer import special_layout
from distillery.errors import DistilleryError


class Examples(Protocol):
    """What the engine trains on: indexable examples of a fixed length."""

    @property
    def seq_len(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def identity(self) -> str: ...

    def examples(
        self, indices: Sequence[int] | np.ndarray, draw: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids ``(B, T)``, labels ``(B, T)`` or ``(B,)``); ``draw`` (the global step)
        picks the random masks of masked-LM data and is ignored by fixed examples."""
        ...


def split_labelled(
    pairs: list[tuple[str, str]],
    val_fraction: float,
    test_fraction: float,
    transfer_fraction: float = 0.0,
) -> dict[str, list[tuple[str, str]]]:
    """Train/val/test (and ``transfer``, when its fraction is > 0) by the hash of each text, as
    for documents (``split_documents``); one label per text."""
    label_of: dict[str, str] = {}
    for text, label in pairs:
        if label_of.setdefault(text, label) != label:
            raise DistilleryError(
                f"the same text has two labels ({label_of[text]!r} and {label!r}): "
                f"fix the data (text begins {text[:40]!r})"
            )
    splits = split_documents(
        [t for t, _ in pairs], val_fraction, test_fraction, transfer_fraction=transfer_fraction
    )
    return {name: [(t, label_of[t]) for t in texts] for name, texts in splits.items()}


def class_names(train: list[tuple[str, str]]) -> list[str]:
    """The classes in sorted order; at least two."""
    classes = sorted({label for _, label in train})
    if len(classes) < 2:
        raise DistilleryError(
            f"the training split has a single class ({classes[0] if classes else 'none'}): "
            "a classifier needs at least two labels"
        )
    return classes


class TensorRows:
    """``Examples`` over rows held in memory: ``ids`` ``(N, T)`` and their ``labels``."""

    ids: torch.Tensor
    labels: torch.Tensor

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_blocks(self) -> int:
        return int(self.ids.shape[0])

    def __len__(self) -> int:
        return self.num_blocks

    def examples(
        self, indices: Sequence[int] | np.ndarray, draw: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        return self.ids[idx], self.labels[idx]


@dataclass
class LabelledExamples(TensorRows):
    """Each text's first tokens and eos (encoders: cls first), right-padded; its class id.

    A decoder classifier reads the last non-padding position (the eos), which with right
    padding never attends to the padding.
    """

    ids: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    truncated: int  # texts cut to fit seq_len
    name: str = "labelled"

    @property
    def identity(self) -> str:
        return f"{self.name}/{self.num_blocks}x{self.seq_len}"

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Examples 0, 1, 2, ... in batches (the last may be smaller)."""
        for start in range(0, self.num_blocks, batch_size):
            yield self.ids[start : start + batch_size], self.labels[start : start + batch_size]


def encode_labelled(
    pairs: list[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    classes: list[str],
    name: str = "labelled",
    *,
    encoder: bool = False,
) -> LabelledExamples:
    """Token rows and class ids of ``pairs``; a label outside ``classes`` is refused.

    Decoders read ``tokens + eos``, after the BOS of a tokenizer that puts one before every text
    (Llama 3, Gemma: ``bos + tokens + eos``); an ``encoder`` reads ``cls + tokens + sep`` (BERT's
    layout; the tokenizer's bos/eos stand in for a missing cls/sep), its pooler the first
    position.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start: list[int] = [] if encoder else special_layout(tokenizer)[0]
    if encoder:
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else eos
        cls = tokenizer.cls_token_id
        cls = cls if cls is not None else tokenizer.bos_token_id
        if cls is None:
            raise DistilleryError("the tokenizer needs a cls or bos token for an encoder")
        start = [cls]
    if seq_len < 2 + len(start):
        raise DistilleryError(f"data.seq_len={seq_len}: too short for a classifier")
    if eos is None or pad is None:
        raise DistilleryError("the tokenizer needs an eos and a pad token for classification")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({label for _, label in pairs} - set(index))
    if unknown:
        raise DistilleryError(
            f"{name} split: label(s) {unknown} do not occur in the training split "
            f"(classes: {classes}); fix the labels or the split fractions"
        )
    ids = torch.full((len(pairs), seq_len), pad, dtype=torch.int64)
    truncated = 0
    room = seq_len - 1 - len(start)
    for row, tokens in enumerate(_encode(tokenizer, [t for t, _ in pairs])):
        if len(tokens) > room:
            truncated += 1
            tokens = tokens[:room]
        full = [*start, *tokens, eos]
        ids[row, : len(full)] = torch.tensor(full, dtype=torch.int64)
    labels = torch.tensor([index[label] for _, label in pairs], dtype=torch.int64)
    return LabelledExamples(ids, labels, list(classes), truncated, name)
