"""Calibration of top-label predictions: ECE, MCE, NLL, Brier (next tokens or classes alike),
reliability bins, and temperature scaling.

Predictions are probabilities ``(N, C)`` or logits, with labels ``(N,)``. Equal-width bins are
``[0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]`` over the top-label confidence (a confidence
exactly on an edge, in the given dtype, belongs to the bin below it); equal-mass bins split the
samples sorted by confidence into B groups whose sizes differ by at most one.

``CalibrationStats`` keeps four numbers per prediction (confidence, correct, NLL, Brier), so a
whole test split of next-token predictions over a large vocabulary is measured chunk by chunk.

Bootstrap intervals resample *groups* of predictions (a test block's next tokens, which are
not independent; or single examples): ``calibration_sums`` reduces a table to a few sums per
group, ``bootstrap_weights`` draws how often each group enters each resample (seeded), and
``bootstrap_calibration`` gives accuracy, NLL, Brier and equal-width ECE — recomputed from the
bins on every resample — with percentile intervals, alone or paired against another predictor
scored on the same predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from distillery.eval.stats import Interval, percentile_interval

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


@dataclass
class CalibrationStats:
    """Per-prediction confidence, correctness, NLL and Brier score, gathered chunk by chunk."""

    parts: list[torch.Tensor] = field(default_factory=list)  # (n, 4) float64 each

    def add_probs(self, probs: torch.Tensor, labels: torch.Tensor) -> CalibrationStats:
        """Add predictions given as probabilities ``(N, C)`` (float64 inside)."""
        probs = probs.double()
        confidence, predicted = probs.max(dim=-1)
        true_prob = probs.gather(-1, labels[:, None])[:, 0]
        brier = (probs**2).sum(-1) - 2 * true_prob + 1
        nll = -torch.log(true_prob.clamp_min(1e-300))
        correct = (predicted == labels).double()
        self.parts.append(torch.stack([confidence, correct, nll, brier], dim=1).cpu())
        return self

    def add_logits(
        self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> CalibrationStats:
        """Add predictions given as logits ``(N, C)`` (float32 softmax; rows outside ``mask``
        are skipped)."""
        if mask is not None:
            logits, labels = logits[mask], labels[mask]
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, predicted = logp.max(dim=-1)
        true_logp = logp.gather(-1, labels[:, None])[:, 0]
        brier = torch.exp(2 * logp).sum(-1).double() - 2 * true_logp.double().exp() + 1
        correct = (predicted == labels).double()
        stacked = [top.double().exp(), correct, -true_logp.double(), brier]
        self.parts.append(torch.stack(stacked, dim=1).cpu())
        return self

    @property
    def table(self) -> torch.Tensor:
        """``(N, 4)``: confidence, correct, NLL, Brier."""
        return torch.cat(self.parts) if self.parts else torch.zeros(0, 4, dtype=torch.float64)

    def bins(self, n_bins: int = 10, binning: Binning = "width") -> list[dict[str, float]]:
        """Non-empty bins: share of predictions, mean confidence, accuracy (a reliability
        diagram's bars) and, for equal-width bins, their edges."""
        table = self.table
        confidence, correct = table[:, 0], table[:, 1]
        index = bin_index(confidence, n_bins, binning)
        out = []
        for b in range(n_bins):
            members = index == b
            if not members.any():
                continue
            row = {
                "bin": b,
                "share": members.double().mean().item(),
                "count": int(members.sum()),
                "confidence": confidence[members].mean().item(),
                "accuracy": correct[members].mean().item(),
            }
            if binning == "width":
                row |= {"lower": b / n_bins, "upper": (b + 1) / n_bins}
            out.append(row)
        return out

    def metrics(self, n_bins: int = 10, binning: Binning = "width") -> dict[str, float]:
        """Top-label accuracy, ECE, MCE (over non-empty bins), NLL and multi-class Brier."""
        table = self.table
        gaps = [
            (b["share"], abs(b["accuracy"] - b["confidence"])) for b in self.bins(n_bins, binning)
        ]
        return {
            "accuracy": table[:, 1].mean().item(),
            "ece": sum(share * gap for share, gap in gaps),
            "mce": max((gap for _, gap in gaps), default=0.0),
            "nll": table[:, 2].mean().item(),
            "brier": table[:, 3].mean().item(),
        }


def calibration_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10, binning: Binning = "width"
) -> dict[str, float]:
    """Top-label accuracy, ECE, MCE (over non-empty bins), NLL and multi-class Brier score."""
    return CalibrationStats().add_probs(probs, labels).metrics(n_bins, binning)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017),
    by L-BFGS on log T from T = 1."""
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


BOOTSTRAPPED = ("accuracy", "nll", "brier", "ece")  # what ``bootstrap_calibration`` resamples


def calibration_sums(
    table: torch.Tensor, groups: np.ndarray, n_groups: int, n_bins: int = 10
) -> np.ndarray:
    """Per group, ``(n_groups, 4 + n_bins)`` float64: the number of predictions, Σ correct,
    Σ NLL, Σ Brier, then per equal-width bin Σ (correct − confidence). ``table`` is
    ``CalibrationStats.table`` ``(N, 4)``; ``groups`` ``(N,)`` the group of each prediction."""
    table_np = table.double().numpy()
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (table_np.shape[0],):
        raise ValueError(
            f"one group per prediction: {groups.shape} groups, {table_np.shape[0]} rows"
        )
    confidence, correct = table_np[:, 0], table_np[:, 1]
    sums = np.zeros((n_groups, 4 + n_bins))
    np.add.at(sums[:, 0], groups, 1.0)
    for col in (1, 2, 3):
        np.add.at(sums[:, col], groups, table_np[:, col])
    index = bin_index(table[:, 0], n_bins, "width").numpy()
    np.add.at(sums, (groups, 4 + index), correct - confidence)
    return sums


def bootstrap_weights(n_groups: int, samples: int = 1000, seed: int = 0) -> np.ndarray:
    """``(samples, n_groups)``: how often each group is drawn in each resample — row b counts
    ``np.random.default_rng(seed).integers(0, n_groups, size=(samples, n_groups))[b]``."""
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(samples, n_groups))
    return np.stack([np.bincount(row, minlength=n_groups) for row in draws]).astype(np.float64)


def _resampled(sums: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric on each row of ``weights`` ``(B, G)`` (a row of ones: the whole sample)."""
    totals = weights @ sums  # (B, 4 + n_bins)
    n = totals[:, 0]
    return {
        "accuracy": totals[:, 1] / n,
        "nll": totals[:, 2] / n,
        "brier": totals[:, 3] / n,
        "ece": np.abs(totals[:, 4:]).sum(axis=1) / n,  # Σ_bins |Σ (correct − confidence)| / n
    }


def bootstrap_calibration(
    sums: Sequence[np.ndarray],
    weights: np.ndarray,
    against: Sequence[np.ndarray] | None = None,
    *,
    confidence: float = 0.95,
    unit: str = "test blocks",
) -> dict[str, Interval]:
    """Per metric of ``BOOTSTRAPPED``: the mean over seeds (one ``calibration_sums`` per seed,
    all on the same groups) with a percentile interval over the resamples ``weights``; with
    ``against`` (the other predictor's sums, seed for seed), the paired difference — both
    scored on the same resampled groups."""
    if against is not None and len(against) != len(sums):
        raise ValueError("bootstrap_calibration: pair the predictors seed for seed")
    ones = np.ones((1, weights.shape[1]))

    def seed_mean(w: np.ndarray) -> dict[str, np.ndarray]:
        per_seed = [_resampled(s, w) for s in sums]
        if against is not None:
            base = [_resampled(a, w) for a in against]
            per_seed = [{k: m[k] - b[k] for k in m} for m, b in zip(per_seed, base, strict=True)]
        return {k: np.mean([m[k] for m in per_seed], axis=0) for k in BOOTSTRAPPED}

    whole, resampled = seed_mean(ones), seed_mean(weights)
    return {
        k: percentile_interval(
            float(whole[k][0]), resampled[k], weights.shape[1], confidence=confidence, unit=unit
        )
        for k in BOOTSTRAPPED
    }
