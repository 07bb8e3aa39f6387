"""The distillation step between the engine and {teachers, objectives} (``DistillStep``), and
its terms read from config (``terms_from_config``); on-policy distillation wraps it
(``OnPolicyStep``: completions sampled from the student)."""

from distillery.step.on_policy import OnPolicyStep
from distillery.step.step import DistillStep, chunk_options, unwrap
from distillery.step.terms import Term, terms_from_config

__all__ = ["DistillStep", "OnPolicyStep", "Term", "chunk_options", "terms_from_config", "unwrap"]
