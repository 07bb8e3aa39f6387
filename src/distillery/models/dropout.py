"""Residual dropout added with hooks, and MC-dropout switches, for any model with a layer list.

Llama-style decoders have no dropout on their residual branches. ``add_residual_dropout``
drops out the output of every block's attention and MLP sub-modules before it joins the
residual stream (where GPT-2 applies ``resid_pdrop``), active whenever the sub-module is in
training mode. The rate is recorded in the model config (``residual_dropout``) so that a model
loaded from its folder gets the same hooks back (``restore_residual_dropout``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import nn

from distillery.errors import DistilleryError
from distillery.models.surgery import decoder_layers

BRANCHES = ("self_attn", "attn", "attention", "mlp", "feed_forward")  # residual branch names
CONFIG_KEY = "residual_dropout"


def _drop_output(p: float):
    def hook(module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    return hook


def add_residual_dropout(model: nn.Module, p: float) -> None:
    """Hook dropout with rate ``p`` onto every block's attention and MLP outputs (once)."""
    if p <= 0:
        return
    if getattr(model, "_distillery_dropout", None) is not None:
        raise DistilleryError("the model already has residual dropout hooks")
    _, layers = decoder_layers(model)
    handles = []
    for layer in layers:
        branches = [m for name, m in layer.named_children() if name in BRANCHES]
        if not branches:
            raise DistilleryError(
                f"cannot add residual dropout to a {type(layer).__name__} block: no sub-module "
                f"named one of {', '.join(BRANCHES)}"
            )
        handles += [m.register_forward_hook(_drop_output(p)) for m in branches]
    model._distillery_dropout = handles  # type: ignore[assignment]
    setattr(model.config, CONFIG_KEY, p)


def restore_residual_dropout(model: nn.Module) -> None:
    """Re-add the hooks a saved model was trained with (its config's ``residual_dropout``)."""
    p = float(getattr(model.config, CONFIG_KEY, 0.0) or 0.0)
    if p > 0 and getattr(model, "_distillery_dropout", None) is None:
        add_residual_dropout(model, p)


def has_dropout(model: nn.Module) -> bool:
    """Whether anything in ``model`` is stochastic in training mode."""
    config = model.config
    rates = [getattr(config, CONFIG_KEY, 0.0), getattr(config, "attention_dropout", 0.0)]
    rates += [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    return any(float(r or 0.0) > 0 for r in rates)


@contextmanager
def dropout_on(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in training mode (every dropout active) for MC-dropout passes, then restored.

    Batch-norm statistics would change in training mode, so models with it are refused.
    """
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise DistilleryError("MC dropout: the model has batch norm, which training mode changes")
    if not has_dropout(model):
        raise DistilleryError(
            "MC dropout needs a model trained with dropout (model.dropout, or its own dropout "
            "rates in config.json); this one has none"
        )
    was_training = model.training
    model.train()
    try:
        yield model
    finally:
        model.train(was_training)
