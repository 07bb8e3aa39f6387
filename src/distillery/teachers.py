"""The teacher signal: one call that gives what the objectives need of the teacher for a batch."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from distillery.models.loading import compute_params
from distillery.objectives.chunked import head_inputs


@dataclass
class TeacherOutput:
    """A teacher's view of one batch; fields not asked for are None."""

    logits: torch.Tensor | None = None  # (B, T, V)
    head_input: torch.Tensor | None = None  # (B, T, H): what ``head`` projects to the logits
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L+1 × (B, T, H), 0 = embeddings
    attentions: tuple[torch.Tensor, ...] | None = None  # L × (B, A, T, T)


class TeacherSignal(Protocol):
    """What a distillation run reads of its teacher(s), however it is produced."""

    compute_params: int
    config: Any  # the model config: widths, depth and heads for representation objectives
    head: torch.nn.Module  # the output projection, applied to ``head_input`` chunk by chunk

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput: ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...


def use_eager_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` to the eager attention kernel, the one that can return its maps."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")


class LiveTeacher:
    """A frozen model run forward on every batch: eval mode, no gradients."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.compute_params = compute_params(model)
        self.config = model.config
        self.head = model.get_output_embeddings()

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        *,
        logits: bool = True,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TeacherOutput:
        """One forward pass. ``logits=False`` skips the output projection and returns its input
        (``head_input``) instead, for chunked losses."""
        if attentions:
            use_eager_attention(self.model)
        with nullcontext({}) if logits else head_inputs(self.model) as captured:
            out = self.model(
                input_ids=input_ids,
                output_hidden_states=hidden_states,
                output_attentions=attentions,
            )
        return TeacherOutput(
            logits=out.logits if logits else None,
            head_input=captured.get("hidden"),
            hidden_states=out.hidden_states if hidden_states else None,
            attentions=out.attentions if attentions else None,
        )

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits ``(B, T, V)``."""
        out = self.run(input_ids).logits
        assert out is not None
        return out
