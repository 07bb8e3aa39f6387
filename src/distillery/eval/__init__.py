"""Evaluation: held-out quality, agreement with a teacher, calibration, size and speed."""

from distillery.eval.calibration import CalibrationStats, calibration_metrics, fit_temperature
from distillery.eval.interchange import interchange_agreement
from distillery.eval.metrics import (
    evaluate_model,
    folder_size,
    generation_speed,
    macro_f1,
    predictions,
)

__all__ = [
    "CalibrationStats",
    "calibration_metrics",
    "evaluate_model",
    "fit_temperature",
    "folder_size",
    "generation_speed",
    "interchange_agreement",
    "macro_f1",
    "predictions",
]
