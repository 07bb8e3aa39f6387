"""Evaluation: held-out quality, agreement with a teacher, calibration, size and speed."""

from distillery.eval.calibration import calibration_metrics
from distillery.eval.metrics import evaluate_lm, folder_size, generation_speed

__all__ = ["calibration_metrics", "evaluate_lm", "folder_size", "generation_speed"]
