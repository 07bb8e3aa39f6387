"""The distillation step between the engine and {teachers, objectives} (``DistillStep``), and
its terms read from config (``terms_from_config``)."""

from distillery.step.step import DistillStep, unwrap
from distillery.step.terms import Term, terms_from_config

__all__ = ["DistillStep", "Term", "terms_from_config", "unwrap"]
