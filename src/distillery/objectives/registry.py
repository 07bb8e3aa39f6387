"""One registry of objectives, filled by ``@register_objective("name")``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from distillery.errors import DistilleryError

ObjectiveFn = Callable[..., torch.Tensor]

# Parameter types with their bounds: an objective's keyword-only parameters are its config
# schema (``config.objective_schema``), so each default and bound is written once, here or in
# the function's signature.
Temperature = Annotated[float, Field(gt=0.0)]
Beta = Annotated[float, Field(ge=0.0, le=1.0)]
Alpha = Annotated[float, Field(ge=0.0, lt=1.0)]  # skew of a skew KL (DistiLLM): below 1

# The tensors an objective may ask for, by argument name (shapes: ``logits.py`` and
# ``representations.py``).
SIGNAL_NAMES = (
    "student_logits",
    "teacher_logits",
    "labels",
    "mask",
    "teacher_mask",  # (N,) bool: positions with a teacher prediction (another tokenizer)
    "student_states",
    "teacher_states",
    "student_attentions",
    "teacher_attentions",
)


@dataclass(frozen=True)
class Objective:
    """A registered loss: the function, the signals it reads and its keyword parameters."""

    name: str
    fn: ObjectiveFn
    signals: tuple[str, ...]
    params: tuple[str, ...]
    # name -> (annotated type, default) of each keyword-only parameter
    param_specs: dict[str, tuple[Any, Any]]
    # Whether it compares a teacher whose vocabulary differs from the student's (``uld``);
    # the token-by-token divergences cannot.
    cross_vocab: bool = False

    @property
    def needs_teacher(self) -> bool:
        return any(s.startswith("teacher_") for s in self.signals)

    @property
    def reads(self) -> str:
        """Which outputs it compares: ``logits``, ``states`` (hidden) or ``attentions``."""
        for kind in ("states", "attentions"):
            if f"student_{kind}" in self.signals:
                return kind
        return "logits"

    @property
    def default_layers(self) -> str | None:
        """The layer map used when none is given: the last layers for hidden states, all
        blocks spread uniformly for attention maps (None: the objective reads logits)."""
        return {"states": "last", "attentions": "uniform"}.get(self.reads)

    def __call__(self, signals: dict[str, torch.Tensor | None], **params: float) -> torch.Tensor:
        args = {name: signals.get(name) for name in self.signals}
        return self.fn(**args, **params)


OBJECTIVES: dict[str, Objective] = {}


def register_objective(
    name: str, *, cross_vocab: bool = False
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Register ``fn`` under ``name``; its positional arguments name the signals it reads.
    ``cross_vocab``: it accepts a teacher with another vocabulary (``Objective.cross_vocab``)."""

    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        sig = inspect.signature(fn).parameters.values()
        signals = tuple(p.name for p in sig if p.kind is p.POSITIONAL_OR_KEYWORD)
        unknown = set(signals) - set(SIGNAL_NAMES)
        if unknown:
            raise ValueError(f"objective {name!r} reads unknown signals {sorted(unknown)}")
        keyword = [p for p in sig if p.kind is p.KEYWORD_ONLY]
        if any(p.default is p.empty for p in keyword):
            raise ValueError(f"objective {name!r}: every keyword-only parameter needs a default")
        hints = typing.get_type_hints(fn, include_extras=True)
        specs = {p.name: (hints.get(p.name, Any), p.default) for p in keyword}
        OBJECTIVES[name] = Objective(name, fn, signals, tuple(specs), specs, cross_vocab)
        return fn

    return wrap


def get_objective(name: str) -> Objective:
    """The registered objective ``name``, or one clear error listing those that exist."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise DistilleryError(
            f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}"
        ) from None
