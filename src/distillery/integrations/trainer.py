"""A ``transformers.Trainer`` that distils: ``DistillationTrainer(distiller=d, model=student)``.

``compute_loss`` is the lab's ``Distiller`` on the batch: the sum of the terms divided by the
Trainer's ``num_items_in_batch`` (the labelled next-token positions of the whole accumulated
batch, across devices when ``average_tokens_across_devices``), so gradient accumulation gives the
gradient of one big batch. The objectives' own parameters join the optimizer; each term's mean
is logged beside the loss. Needs ``accelerate`` (``pip install lm-distillery[trainer]``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from distillery.api import Distiller


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is ``distiller``'s (its student is ``model``)."""

    def __init__(self, *args: Any, distiller: Distiller, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distiller = distiller
        self._term_sums: dict[str, float] = {}
        self._term_batches = 0

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = super().create_optimizer(*args, **kwargs)
        extra = [p for p in self.distiller.parameters() if p.requires_grad]
        if extra and not any(
            p is q for g in optimizer.param_groups for p in g["params"] for q in extra
        ):
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        out = self.distiller(
            inputs["input_ids"],
            inputs.get("labels"),
            inputs.get("attention_mask"),
            model=model,
            num_items=num_items_in_batch,
        )
        loss = out.loss
        # Divided by the whole accumulated batch's count: the Trainer must not divide again.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages over processes
        for name, value in out.terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value)
        self._term_batches += 1
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds each term (summed over the micro-batches since the last log, i.e. its mean per
        optimizer step when counts are global) to the Trainer's own records."""
        if "loss" in logs and self._term_batches:
            steps = max(1, round(self._term_batches / self.args.gradient_accumulation_steps))
            logs = {**logs, **{k: v / steps for k, v in self._term_sums.items()}}
            self._term_sums, self._term_batches = {}, 0
        super().log(logs, *args, **kwargs)
