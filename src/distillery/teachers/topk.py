"""A sparse teacher distribution: the k most likely tokens and one bucket for the rest.

The teacher cache stores it on disk and codistilling peers exchange it; both turn it back into
logits the same way (``TopK.dense``): the top-k probabilities exactly, the left-over mass spread
over the other tokens in proportion to the student's own probabilities at the same temperature
(evenly without a student). With that completion every logit objective runs unchanged and sees
the top-k plus one bucket for the rest — forward KL equals Σ_topk p·log(p/q) + r·log(r/q_rest)
in value and gradient — and a student that matches the teacher has zero loss. (Filling the tail
with a large negative logit instead would renormalise the top-k and drop the rest's mass.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distillery.models.heads import cut_vocab


@dataclass
class TopK:
    """``ids`` ``(N, k)``, ``logp`` ``(N, k)`` log-probabilities at ``temperature``, ``rest``
    ``(N,)`` the log of the probability mass outside the top-k; over ``vocab`` tokens."""

    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor
    temperature: float
    vocab: int

    @staticmethod
    def of(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
        """The top-k of ``logits`` ``(N, V)`` softened at ``temperature`` (float32)."""
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
        top = logp.topk(k, dim=-1)
        # The log of the mass outside the top-k, summed directly (not 1 − Σ top-k, which
        # cancels to 0 in float32 for a confident teacher).
        outside = logp.scatter(1, top.indices, float("-inf"))
        rest = torch.logsumexp(outside, dim=-1)  # (N,)
        return TopK(top.indices, top.values, rest, temperature, logits.shape[-1])

    def __getitem__(self, part: slice) -> TopK:
        return TopK(self.ids[part], self.logp[part], self.rest[part], self.temperature, self.vocab)

    def dense(self, student_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(N, vocab)`` = T·log p̃, p̃ the completed distribution (module docstring);
        ``student_logits`` ``(N, ≥ vocab)``, detached, decide how the rest is spread."""
        n, ids = self.ids.shape[0], self.ids.long()
        if student_logits is None:
            k = self.ids.shape[1]
            tail = torch.full((n, self.vocab), -math.log(self.vocab - k), device=ids.device)
        else:
            s = cut_vocab(student_logits, self.vocab).float()
            tail = torch.log_softmax(s / self.temperature, dim=-1)
        tail = tail.scatter(1, ids, float("-inf"))  # only the tokens outside the top-k
        tail = tail - torch.logsumexp(tail, dim=-1, keepdim=True)  # a distribution over them
        rest = self.rest.float().clamp_min(-1e4)  # finite even if nothing was left over
        dense = (rest[:, None] + tail).scatter(1, ids, self.logp.float())
        return dense * self.temperature
