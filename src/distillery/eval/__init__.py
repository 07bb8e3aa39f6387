"""Evaluation: held-out quality, agreement with a teacher, size and speed."""

from distillery.eval.metrics import evaluate_lm, folder_size, generation_speed

__all__ = ["evaluate_lm", "folder_size", "generation_speed"]
