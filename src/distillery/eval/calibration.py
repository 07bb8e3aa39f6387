"""Calibration of top-label predictions: ECE, MCE, NLL, Brier (next tokens or classes alike),
reliability bins, and temperature scaling.

Predictions are probabilities ``(N, C)`` or logits, with labels ``(N,)``. Equal-width bins are
``[0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]`` over the top-label confidence (a confidence
exactly on an edge, in the given dtype, belongs to the bin below it); equal-mass bins split the
samples sorted by confidence into B groups whose sizes differ by at most one.

``CalibrationStats`` keeps four numbers per prediction (confidence, correct, NLL, Brier), so a
whole test split of next-token predictions over a large vocabulary is measured chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
