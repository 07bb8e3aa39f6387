"""Fair baselines: each arm's learning rate and warmup chosen from a small grid on validation.

Every (lr, warmup) of the grid trains the arm once on the tuning seed (a seed the study does
not report, so the choice is not fitted to the reported runs' noise); the one with the lowest
validation loss is the arm's setting for every reported seed. A best lr at the grid's edge is
flagged: the grid did not bracket the best. A point whose training diverged is recorded as
such (``val_loss`` null) and left out of the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from distillery.config import RunConfig, Strict, TrainConfig
from distillery.distributed import is_main_process
from distillery.errors import DistilleryError, Diverged
from distillery.recipes.study import run_or_reuse


class Tuning(Strict):
    """The grid each arm is tuned on (``lrs`` × ``warmups``), trained on ``seed``."""

    lrs: list[Annotated[float, Field(gt=0.0)]] = Field(min_length=3)
    warmups: list[Annotated[int, Field(ge=0)]] = Field(min_length=2)
    seed: int = Field(1000, ge=0)  # not one of the reported seeds

    @model_validator(mode="after")
    def _sorted(self) -> Tuning:
        if sorted(set(self.lrs)) != self.lrs or sorted(set(self.warmups)) != self.warmups:
            raise ValueError("tune: give lrs and warmups in increasing order, each once")
        if len({f"{lr:g}" for lr in self.lrs}) < len(self.lrs):  # run folders are named so
            raise ValueError("tune: lrs must differ in their first 6 significant digits")
        return self

    def check_seed(self, seeds: list[int]) -> None:
        """The tuning seed must not be a reported one (the choice is not fitted to them)."""
        if self.seed in seeds:
            raise ValueError(f"tune: seed {self.seed} is a reported seed; give another")


def setting(lr: float, warmup: int) -> str:
    """The folder name of one grid point (``Tuning`` keeps these distinct)."""
    return f"lr-{lr:g}-warmup-{warmup}"


def choose(tuning: Tuning, score: Callable[[float, int], float]) -> dict[str, Any]:
    """The grid's record: ``score(lr, warmup)`` (validation loss of the arm trained at those
    settings on the tuning seed) for every point, ``None`` where it raised ``Diverged``, and
    the point with the lowest."""

    def loss(lr: float, warmup: int) -> float | None:
        try:
            return score(lr, warmup)
        except Diverged as err:
            if is_main_process():
                print(f"[distillery] tune: lr {lr:g}, warmup {warmup} diverged ({err}); "
                      "left out of the choice", flush=True)  # fmt: skip
            return None

    grid = [
        {"lr": lr, "warmup_steps": warmup, "val_loss": loss(lr, warmup)}
        for lr in tuning.lrs
        for warmup in tuning.warmups
    ]
    finite = [g for g in grid if g["val_loss"] is not None]
    if not finite:
        raise DistilleryError("tune: every grid point diverged; give lower tune.lrs")
    best = min(finite, key=lambda g: g["val_loss"])
    edge = best["lr"] in (tuning.lrs[0], tuning.lrs[-1])
    return {"grid": grid, "lr": best["lr"], "warmup_steps": best["warmup_steps"],
            "lr_at_edge": edge, "seed": tuning.seed}  # fmt: skip


def shown(row: dict[str, Any]) -> str:
    """``0.001, 10``: a table row's lr and warmup (``–`` in tables written before they were
    kept)."""
    return f"{row['lr']:g}, {row['warmup_steps']}" if "lr" in row else "–"


def grid_table(records: dict[str, dict[str, Any]], what: str) -> list[str]:
    """Markdown lines: each tuned row's grid (``choose``'s records, by label), its ``what``
    (e.g. "validation loss") on the tuning seed at every (lr, warmup); none: no lines."""
    if not records:
        return []
    first = next(iter(records.values()))
    points = [(g["lr"], g["warmup_steps"]) for g in first["grid"]]
    lines = [
        "",
        f"Tuning ({what} on seed {first['seed']}, not a reported seed; **bold**: chosen; "
        "† the chosen lr is at the grid's edge):",
        "",
        "| row | " + " | ".join(f"lr {lr:g}, warmup {w}" for lr, w in points) + " |",
        "|---|" + "---:|" * len(points),
    ]
    for label, record in records.items():
        chosen = (record["lr"], record["warmup_steps"])
        cells = [
            "diverged" if g["val_loss"] is None
            else f"**{g['val_loss']:.3f}**" if (g["lr"], g["warmup_steps"]) == chosen
            else f"{g['val_loss']:.3f}"
            for g in record["grid"]
        ]  # fmt: skip
        edge = " †" if record["lr_at_edge"] else ""
        lines.append(f"| {label}{edge} | " + " | ".join(cells) + " |")
    return lines


def tuned(
    tuning: Tuning,
    train: TrainConfig,
    build: Callable[[TrainConfig, Path], RunConfig],
    folder: Path,
    name: str,
    *,
    reuse: bool,
) -> tuple[TrainConfig, dict[str, Any]]:
    """(the train settings with the chosen lr and warmup, the grid's record): ``build(train,
    out)`` is the arm's run for given settings; each grid point runs once into ``folder``."""

    def score(lr: float, warmup: int) -> float:
        point = train.model_copy(update={"lr": lr, "warmup_steps": warmup, "seed": tuning.seed})
        out = folder / setting(lr, warmup)
        summary, _ = run_or_reuse(build(point, out), f"{name}/tune/{out.name}", reuse=reuse)
        return float(summary["val_loss"])

    record = choose(tuning, score)
    chosen = train.model_copy(update={"lr": record["lr"], "warmup_steps": record["warmup_steps"]})
    return chosen, record
