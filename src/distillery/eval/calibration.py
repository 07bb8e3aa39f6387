"""Calibration of top-label predictions: ECE, MCE, NLL, Brier (next tokens or classes alike).

Inputs are probabilities ``(N, C)`` and labels ``(N,)``. Equal-width bins are
``[0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]`` over the top-label confidence (a confidence
exactly on an edge, in the given dtype, belongs to the bin below it); equal-mass bins split the
samples sorted by confidence into B groups whose sizes differ by at most one.
"""

from __future__ import annotations

from typing import Literal

import torch

Binning = Literal["width", "mass"]


def bin_index(confidence: torch.Tensor, n_bins: int, binning: Binning = "width") -> torch.Tensor:
    """The bin of each sample (0 .. n_bins-1)."""
    if binning == "width":
        return (torch.ceil(confidence.double() * n_bins) - 1).clamp(0, n_bins - 1).long()
    order = torch.argsort(confidence, stable=True)
    index = torch.empty_like(order)
    for b, chunk in enumerate(torch.tensor_split(order, n_bins)):
        index[chunk] = b
    return index


def calibration_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10, binning: Binning = "width"
) -> dict[str, float]:
    """Top-label accuracy, ECE, MCE (over non-empty bins), NLL and multi-class Brier score."""
    probs = probs.double()
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).double()
    bins = bin_index(confidence, n_bins, binning)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        members = bins == b
        if not members.any():
            continue
        gap = (correct[members].mean() - confidence[members].mean()).abs().item()
        ece += members.double().mean().item() * gap
        mce = max(mce, gap)
    true_prob = probs.gather(-1, labels[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return {
        "accuracy": correct.mean().item(),
        "ece": ece,
        "mce": mce,
        "nll": -torch.log(true_prob.clamp_min(1e-300)).mean().item(),
        "brier": ((probs - onehot) ** 2).sum(-1).mean().item(),
    }
