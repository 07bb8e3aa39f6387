"""The teacher signal: one call that gives the teacher's logits for a batch, however made."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedModel

from distillery.models.loading import compute_params
from distillery.objectives.chunked import head_inputs


class TeacherSignal(Protocol):
    """Teacher logits ``(B, T, V)`` for ``input_ids`` ``(B, T)``, or the final hidden states
    ``(B, T, H)`` that ``head`` projects to them (for chunked losses)."""

    compute_params: int
    head: torch.nn.Module  # the output projection, applied to ``hidden`` chunk by chunk

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor: ...


class LiveTeacher:
    """A frozen model run forward on every batch: eval mode, no gradients, inference mode."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.compute_params = compute_params(model)
        self.head = model.get_output_embeddings()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids).logits  # (B, T, V)
        # Inference tensors cannot be saved for backward: hand out an ordinary copy.
        return logits.clone()

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), head_inputs(self.model) as captured:
            self.model(input_ids=input_ids)
        return captured["hidden"].clone()
