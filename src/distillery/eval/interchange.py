"""Interchange agreement: how often the student's counterfactual top-1 equals the teacher's."""

from __future__ import annotations

import torch
from torch import nn

from distillery.data import IGNORE_INDEX, PackedTokens, sequential_batches, shift_labels
from distillery.models.heads import cut_vocab
from distillery.models.interchange import interchange_logits, pair_batch
from distillery.models.interventions import PositionSampling, sample_positions


@torch.no_grad()
def interchange_agreement(
    student: nn.Module,
    teacher: nn.Module,
    data: PackedTokens,
    pairs: list[tuple[int, int]],
    *,
    device: torch.device,
    positions: PositionSampling = "span",
    fraction: float = 0.5,
    batch_size: int = 16,
    max_batches: int | None = None,
    seed: int = 0,
    vocab: int | None = None,
) -> dict[str, float]:
    """On held-out pairs (each batch's rows re-paired, positions sampled, the aligned layer pair
    cycling through ``pairs``; all drawn from ``seed``, so every model sees the same
    interventions), the share of counted positions where both models' counterfactual top-1
    predictions agree — overall, at the swapped positions only, and at the positions whose
    teacher prediction the intervention changes (where agreement is not plain agreement)."""
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    gen = torch.Generator().manual_seed(seed)
    agree = agree_swapped = count = count_swapped = agree_changed = count_changed = 0.0
    for i, ids in enumerate(sequential_batches(data, batch_size, max_batches)):
        if ids.shape[0] < 2:
            break  # a last batch of one row has no pair
        base, source = pair_batch(ids, gen)
        where = sample_positions(tuple(ids.shape), positions, fraction, gen)
        s_layer, t_layer = pairs[i % len(pairs)]
        base, source, where = base.to(device), source.to(device), where.to(device)
        s = interchange_logits(student, base, source, s_layer, where, source_grad=False)
        t = interchange_logits(teacher, base, source, t_layer, where, source_grad=False)
        t_top = cut_vocab(t, vocab).argmax(-1)
        same = cut_vocab(s, vocab).argmax(-1) == t_top  # (B, T)
        counted = shift_labels(base) != IGNORE_INDEX
        plain = cut_vocab(teacher(input_ids=base).logits, vocab).argmax(-1)
        changed = counted & (plain != t_top)
        agree_changed += float((same & changed).sum())
        count_changed += float(changed.sum())
        agree += float((same & counted).sum())
        count += float(counted.sum())
        agree_swapped += float((same & counted & where).sum())
        count_swapped += float((counted & where).sum())
    student.train(was[0])
    teacher.train(was[1])
    return {
        "interchange_agreement": agree / max(count, 1.0),
        "interchange_agreement_swapped": agree_swapped / max(count_swapped, 1.0),
        "interchange_agreement_changed": agree_changed / max(count_changed, 1.0),
        "interchange_changed_fraction": count_changed / max(count, 1.0),
    }
