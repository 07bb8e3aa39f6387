"""The teacher signal: one interface for whatever teaches a student — a live model, several
combined, MC dropout, a temperature-scaled model, a cache of top-k, codistilling peers — and one
factory (``build_teacher``) that makes it from a run's ``TeacherSpec``."""

from distillery.teachers.signals import (
    EnsembleTeacher,
    LiveTeacher,
    MCDropoutTeacher,
    TeacherBase,
    TeacherOutput,
    TeacherSignal,
    TemperatureScaled,
    combined_output,
    mean_distribution,
)
from distillery.teachers.topk import TopK

__all__ = [
    "EnsembleTeacher",
    "LiveTeacher",
    "MCDropoutTeacher",
    "TeacherBase",
    "TeacherOutput",
    "TeacherSignal",
    "TemperatureScaled",
    "TopK",
    "combined_output",
    "mean_distribution",
]
