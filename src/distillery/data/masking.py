"""Masked-LM examples: BERT's dynamic masking over packed token blocks.

Each position that is not a special token is chosen with probability ``probability``; a chosen
position is the target of the masked-LM loss (its label is the original token) and its input
becomes the mask token (80%), a random token (10%) or stays itself (10%). Every other label is
``IGNORE_INDEX``, so each objective on logits counts the chosen positions only.

Masks are *dynamic* (drawn afresh each step, as in RoBERTa) yet reproducible: row ``b`` of draw
``d`` uses a generator seeded by ``(seed, d, b)``, so a batch's masks do not depend on how it is
split into micro-batches or ranks, and a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distillery.data.packed import IGNORE_INDEX, PackedTokens
from distillery.errors import DistilleryError

MASK_TOKEN = "<|mask|>"  # added to the lab's own BPE tokenizers for masked-LM runs


def mask_tokens(
    ids: torch.Tensor,
    rows: Sequence[int] | np.ndarray,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    probability: float,
    seed: int,
    draw: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels), both ``(B, T)``, for blocks ``ids`` whose identities are
    ``rows`` (one per block: it seeds that block's masks together with ``seed`` and ``draw``)."""
    inputs, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    specials = torch.as_tensor(list(special_ids), dtype=ids.dtype)
    for b, row in enumerate(np.asarray(rows, dtype=np.int64).reshape(-1)):
        rng = np.random.default_rng([seed, draw, int(row)])
        chosen_p, action, random_ids = (
            rng.random(ids.shape[1]),
            rng.random(ids.shape[1]),
            rng.integers(0, vocab_size, ids.shape[1]),
        )
        chosen = torch.from_numpy(chosen_p < probability) & ~torch.isin(ids[b], specials)
        labels[b] = torch.where(chosen, ids[b], IGNORE_INDEX)
        to_mask = chosen & torch.from_numpy(action < 0.8)
        to_random = chosen & torch.from_numpy((action >= 0.8) & (action < 0.9))
        inputs[b] = torch.where(to_mask, mask_id, inputs[b])
        inputs[b] = torch.where(to_random, torch.from_numpy(random_ids).to(ids.dtype), inputs[b])
    return inputs, labels


class MaskedBlocks:
    """Packed token blocks as masked-LM examples (see the module docstring)."""

    def __init__(
        self,
        blocks: PackedTokens,
        *,
        mask_id: int | None,
        vocab_size: int,
        special_ids: Sequence[int],
        probability: float = 0.15,
        seed: int = 0,
    ) -> None:
        if mask_id is None:
            raise DistilleryError(
                "masked-LM data needs a tokenizer with a mask token (BERT's [MASK]); use the "
                "encoder's own tokenizer, or let the lab train one (data.tokenizer unset)"
            )
        if not 0.0 < probability < 1.0:
            raise DistilleryError(f"data.mask_probability={probability}: must be in (0, 1)")
        self.blocks, self.mask_id, self.vocab_size = blocks, mask_id, vocab_size
        self.special_ids = sorted({int(i) for i in special_ids if i is not None})
        self.probability, self.seed = probability, seed

    @property
    def seq_len(self) -> int:
        return self.blocks.seq_len

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def identity(self) -> str:
        return f"{self.blocks.identity}/mlm-{self.probability}-{self.seed}"

    def __len__(self) -> int:
        return self.num_blocks

    def examples(
        self, indices: Sequence[int] | np.ndarray, draw: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input ids, labels) ``(B, T)`` of blocks ``indices``, masks of draw ``draw``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return mask_tokens(
            self.blocks.blocks(idx),
            idx,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            special_ids=self.special_ids,
            probability=self.probability,
            seed=self.seed,
            draw=draw,
        )
