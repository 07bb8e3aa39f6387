"""What studies share: seeds, a teacher the study trains, finished runs reused, statistics and
tables written to ``results/``."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from pydantic import Field, model_validator

from distillery.config import (
    CrossEntropyObjective,
    DataConfig,
    ForwardKLObjective,
    HiddenCosineObjective,
    ModelSpec,
    RunConfig,
    Strict,
    TrainConfig,
)
from distillery.distributed import is_main_process
from distillery.errors import DistilleryError
from distillery.files import atomic_write_text, write_json
from distillery.report.html import first_heading, referenced_images, write_html


class TeacherStudentRecipe(Strict):
    """What recipes that train their own teacher and then half-depth students share."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelSpec = Field(default_factory=ModelSpec)
    teacher_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=240, lr=2e-3, warmup_steps=20)
    )
    student_layers: int = Field(2, gt=0)  # initialised from every other teacher layer
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=100, lr=2e-3, warmup_steps=10)
    )

    @property
    def teacher_layers(self) -> int:
        """The depth of the teacher the recipe trains (from a preset, checked below)."""
        return self.teacher.preset_layers or 0

    @model_validator(mode="after")
    def _student_fits_teacher(self) -> TeacherStudentRecipe:
        recipe = type(self).__name__.removesuffix("Config").lower()
        teacher = self.teacher
        if teacher.path is not None or teacher.init_from_teacher is not None:
            raise ValueError(f"teacher: {recipe} trains its teacher from a preset (teacher.preset)")
        layers = self.teacher_layers
        if 2 * self.student_layers - 1 > layers:
            raise ValueError(
                f"student_layers={self.student_layers} needs a teacher with at least "
                f"{2 * self.student_layers - 1} layers (every other layer); it has {layers}"
            )
        return self


def distilbert_mix() -> list[Any]:
    """DistilBERT's triple loss with its weights: soft targets 5 (T=2), task 2, cosine 1."""
    return [
        ForwardKLObjective(weight=5.0, temperature=2.0),
        CrossEntropyObjective(weight=2.0),
        HiddenCosineObjective(weight=1.0, layers="last"),
    ]


class SeededStudy(Strict):
    """What a recipe repeated over seeds adds: the seeds, and a folder for its table."""

    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1
    )
    results: Path | None = None  # also write the table and its JSON here

    @model_validator(mode="after")
    def _distinct_seeds(self) -> SeededStudy:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: give each seed once")
        return self


def run_or_reuse(cfg: RunConfig, name: str, *, reuse: bool = True) -> tuple[dict[str, Any], bool]:
    """(summary, reused): ``run(cfg)``, unless ``cfg.out`` holds a finished run of exactly this
    config. The summary is read back from disk, so every rank of a torchrun job has it."""
    from distillery.recipes.run import run  # run builds on this module

    out = Path(cfg.out)
    saved, summary = out / "config.yaml", out / "summary.json"

    def finished() -> dict[str, Any] | None:
        if not summary.is_file():
            return None
        result = json.loads(summary.read_text(encoding="utf-8"))
        return result if result.get("finished") else None

    same = False
    if saved.is_file():  # read back through today's config: fields added since take defaults
        try:
            same = (
                RunConfig.model_validate(yaml.safe_load(saved.read_text(encoding="utf-8"))) == cfg
            )
        except (ValueError, yaml.YAMLError):
            same = False
    if reuse and same and (result := finished()):
        if is_main_process():
            print(f"[distillery] {name}: finished before, reusing {out}", flush=True)
        return result, True
    run(cfg, overwrite=True, name=name)
    result = finished()
    if result is None:
        raise DistilleryError(f"{name}: the run in {out} did not finish")
    return result, False


def write_study(
    name: str,
    result: dict[str, Any],
    table: str,
    folders: list[Path | None],
    plot: Callable[[Path], None] | None = None,
) -> None:
    """A study's ``NAME.json``, ``NAME.md`` (and its ``plot``) and ``NAME.html`` (the Markdown
    with the plots it wrote, self-contained) into each folder given; the table printed. Only
    the main process writes."""
    if not is_main_process():
        return
    for folder in [Path(f) for f in folders if f is not None]:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{name}.json", result)
        atomic_write_text(folder / f"{name}.md", table)
        before = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}
        if plot is not None:
            plot(folder)
        shown = referenced_images(table, folder)
        plots = [
            p
            for p in sorted(folder.glob("*.png"))
            if before.get(p) != p.stat().st_mtime_ns and p not in shown
        ]
        write_html(
            folder / f"{name}.html",
            first_heading(table, name),
            table,
            images=plots,
            base=folder,
            config=result.get("config"),
            command=shlex.join(sys.argv),
            hardware=result.get("hardware") or hardware(),
        )
    print(table)


def hardware() -> str:
    """A short name of the machine for result folders and tables."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def against_spread(gap: float, stds: list[float], seeds: int, digits: int = 1) -> str:
    """Whether ``gap`` is larger than twice the larger seed std, in words."""
    if seeds < 2:
        return "one seed only, so no seed spread to compare it with"
    spread = max(stds)
    size = "larger" if abs(gap) > 2 * spread else "not larger"
    return f"{size} than twice the larger seed std ({spread:.{digits}f})"
