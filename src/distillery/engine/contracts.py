"""What the training loop reads of a step (``TrainStep``) and where a run stands (``Progress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class TrainStep(Protocol):
    """What the loop needs of a step (``step.DistillStep``): per micro-batch, the counts the
    loss is divided by, and the weighted sum with its named terms; the trainable modules it
    adds to the model; whether every model parameter gets a gradient (DDP needs to know)."""

    modules: nn.Module
    uses_every_parameter: bool

    def counts(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(K,)`` counts of one micro-batch; the loss is divided by the global sum of the
        first."""
        ...

    def parameters(self) -> list[nn.Parameter]: ...

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (``step`` is also the data position)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
