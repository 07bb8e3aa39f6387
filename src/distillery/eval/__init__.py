"""Evaluation: held-out quality, agreement with a teacher, calibration, size and speed."""

from distillery.eval.calibration import (
    CalibrationStats,
    bootstrap_calibration,
    bootstrap_weights,
    calibration_metrics,
    calibration_sums,
    fit_temperature,
)
from distillery.eval.interchange import interchange_agreement
from distillery.eval.metrics import (
    evaluate_model,
    folder_size,
    generation_speed,
    macro_f1,
    prediction_groups,
    predictions,
)

__all__ = [
    "CalibrationStats",
    "bootstrap_calibration",
    "bootstrap_weights",
    "calibration_metrics",
    "calibration_sums",
    "evaluate_model",
    "fit_temperature",
    "folder_size",
    "generation_speed",
    "interchange_agreement",
    "macro_f1",
    "prediction_groups",
    "predictions",
]
