"""``distillery experiment distill-expand``: distil in the middle of training, then grow back.

Every arm ends in the same 2n-layer model, spends the same FLOPs budget B (each phase takes the
whole steps its share pays for, as the engine's meter counts them) and reads the same data
stream (each phase starts where the previous one stopped, ``train.data_offset``):

1. ``baseline``: the 2n-layer model trained for B;
2. ``distill-expand`` (f_train, f_distill): 2n layers trained for f_train·B; distilled into n
   layers (every other teacher layer) for f_distill·B; n identity layers grown on top; the
   2n-layer model trained with the rest;
3. ``shrink-expand`` (f_train): as 2 without the distillation phase;
4. ``stacking``: n layers trained for ``stack_fraction``·B, stacked to 2n (StackBERT), trained
   with the rest;
5. ``restart-only`` (f_train, f_distill): the 2n-layer model with 2's phase boundaries and no
   shrink — each phase restarts warmup, cosine decay and AdamW as 2's do, so 2 against 5 is
   the distillation step itself, not the restarts.
6. ``reset-in-place`` (f_train): 3's control — after f_train·B the layers shrink drops (every
   odd one) are re-initialised where they are, as identity blocks (n kept, n new interleaved),
   and the 2n layers trained with the rest: 3 against 6 is where the new layers go, not that
   half the layers start afresh.

``continue_schedule``: every phase takes its slice of one warmup + cosine schedule over B
(``train.schedule_slice``) instead of warming up and decaying again. ``optimizer``: each swept arm
runs once per entry — ``restart`` (AdamW from zero moments in every phase) or ``carry`` (each
phase starts from the previous phase's moments, through the shrink and the growth:
``engine.moments``; grown blocks start afresh; rows and folders end in ``-carry``).
``f_distill = 0`` is shrink-expand at that f_train (the same runs) and, for restart-only, one
restart at f_train.

Each phase's FLOPs per step against a plain 2n-layer step is in the table: a distillation
phase is cheap only where the layers, not the output layer, dominate the compute.

Writes ``distill-expand.{md,json}``, ``final_loss.png`` and ``loss_vs_flops.png``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator

from distillery.config import (
    CrossEntropyObjective,
    DataConfig,
    ForwardKLObjective,
    GrowSpec,
    ModelSpec,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
)
from distillery.recipes.common import prepare_out_dir
from distillery.recipes.distill_expand_report import expand_markdown, plot_expand
from distillery.recipes.study import (
    SeededStudy,
    hardware,
    mean_std,
    run_or_reuse,
    write_study,
)
from distillery.recipes.tuning import Tuning, choose, setting
from distillery.report import read_metrics

EXPAND_ARMS = ("baseline", "distill-expand", "shrink-expand", "stacking", "restart-only",
               "reset-in-place")  # fmt: skip
# arms run at each sweep point
SWEPT = ("distill-expand", "shrink-expand", "restart-only", "reset-in-place")


class DistillExpandConfig(SeededStudy):
    """``distillery experiment distill-expand``: arms that all end in the 2n-layer ``model``,
    each spending the same FLOPs budget on the same data order (see ``recipes/distill_expand``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)  # the 2n-layer model (a preset)
    budget_flops: float = Field(gt=0.0)  # B, per arm and seed
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=2e-3, warmup_steps=10, checkpoint_every=0)
    )  # every phase's settings; ``steps`` is set by each phase's share of B
    distill_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            CrossEntropyObjective(weight=1.0),
            ForwardKLObjective(weight=1.0, temperature=2.0),
        ],
        min_length=1,
    )
    # (f_train, f_distill) points: 2n layers trained for f_train·B, distilled for f_distill·B.
    sweep: list[tuple[Annotated[float, Field(gt=0.0, lt=1.0)], Annotated[float, Field(ge=0.0)]]] = (
        Field(default_factory=lambda: [(0.25, 0.1), (0.5, 0.1)], min_length=1)
    )
    stack_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # stacking: n layers for this share of B
    continue_schedule: bool = False  # phases follow one schedule over B (no re-warmup)
    # The swept arms' AdamW state at phase boundaries: restarted, carried, or each (two rows).
    optimizer: list[Literal["restart", "carry"]] = Field(
        default_factory=lambda: ["restart"], min_length=1
    )
    # More learning rates for the baseline (a tuned baseline); the answer is against the best.
    baseline_lrs: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=list)
    # The swept arms' learning rates (default: train.lr); rows and folders at another lr end
    # in ``-lrLR``, so each arm can be compared at its own best lr.
    swept_lrs: list[Annotated[float, Field(gt=0.0)]] | None = None
    # Set: each row's lr and warmup chosen on validation (``recipes/tuning``) before its seeds
    # run; each setting's runs in ``out/lr-LR-warmup-W`` (the tuning seed's in ``out/tune``).
    tune: Tuning | None = None
    arms: list[
        Literal[
            "baseline",
            "distill-expand",
            "shrink-expand",
            "stacking",
            "restart-only",
            "reset-in-place",
        ]
    ] = Field(default_factory=lambda: list(EXPAND_ARMS[:4]), min_length=1)
    out: Path = Path("runs/distill-expand")

    @model_validator(mode="after")
    def _fits(self) -> DistillExpandConfig:
        layers = self.model.preset_layers
        if layers is None or self.model.init_from_teacher or self.model.grow:
            raise ValueError("model: give the 2n-layer model as a preset (with overrides)")
        if layers < 2 or layers % 2:
            raise ValueError(f"model: needs an even number of layers (2n), not {layers}")
        if self.tune is not None:
            if self.baseline_lrs or self.swept_lrs:
                raise ValueError("tune: replaces baseline_lrs and swept_lrs; give one or the other")
            self.tune.check_seed(self.seeds)
        for f_train, f_distill in self.sweep:
            if f_train + f_distill >= 1.0:
                raise ValueError(
                    f"sweep: f_train + f_distill = {f_train + f_distill:g} leaves nothing to "
                    "train the grown model with; keep it below 1"
                )
        return self


class _Arm:
    """The phases of one arm for one seed, run in order on one data stream."""

    def __init__(self, cfg: DistillExpandConfig, seed: int, name: str, carry: bool) -> None:
        self.cfg, self.seed, self.name, self.carry = cfg, seed, name, carry
        self.phases: list[dict[str, Any]] = []

    @property
    def spent(self) -> float:
        return sum(p["flops"] for p in self.phases)

    def spec(self, layers: int, **fields: Any) -> ModelSpec:
        overrides = {**self.cfg.model.overrides, "num_hidden_layers": layers}
        return ModelSpec(preset=self.cfg.model.preset, overrides=overrides, **fields)

    def phase(
        self,
        name: str,
        out: Path,
        model: ModelSpec,
        share: float | None,
        *,
        teacher: Path | None = None,
        objectives: list[Any] | None = None,
    ) -> Path:
        """Run (or reuse) one phase with ``share``·B FLOPs (None: what is left of B); carrying,
        it starts from the previous phase's AdamW moments and leaves its own for the next."""
        budget = self.cfg.budget_flops
        flops = share * budget if share is not None else budget - self.spent
        start = self.spent / budget
        window = (start, min(1.0, start + flops / budget)) if self.cfg.continue_schedule else None
        train = self.cfg.train.model_copy(
            update={
                "seed": self.seed,
                "flops_budget": flops,
                "data_offset": sum(p["steps"] for p in self.phases),
                "schedule_slice": window,
                "save_moments": self.carry and share is not None,  # not the last phase
                "moments_from": Path(self.phases[-1]["dir"])
                if self.carry and self.phases
                else None,
            }
        )
        run_cfg = RunConfig(
            data=self.cfg.data,
            model=model,
            teacher=teacher,
            objectives=objectives or [CrossEntropyObjective()],
            train=train,
            out=out,
        )
        summary, _ = run_or_reuse(run_cfg, f"{self.name}/{name}/seed-{self.seed}")
        per_step = summary["flops"] / summary["steps"]
        curve = [
            (self.spent + r["step"] * per_step, r["val_loss"])
            for r in read_metrics(out)
            if "val_loss" in r
        ]
        self.phases.append({**summary, "name": name, "dir": str(out), "curve": curve})
        return out / "model"


def run_arm(
    cfg: DistillExpandConfig,
    arm: str,
    point: tuple[float, float],
    seed: int,
    lr: float | None = None,
    carry: bool = False,
) -> _Arm:
    """One arm (at sweep ``point`` = (f_train, f_distill); the baseline at ``lr``; ``carry``:
    AdamW's moments across its phases) for one seed."""
    n = (cfg.model.preset_layers or 0) // 2  # a preset with 2n layers: checked by the config
    f_train, f_distill = point
    root = Path(cfg.out) / f"seed-{seed}"
    label = arm_label(arm, point, lr, carry)
    tail = (f"-lr{lr:g}" if lr is not None else "") + ("-carry" if carry else "")
    if lr is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": lr})})
    a = _Arm(cfg, seed, label, carry)
    if arm == "baseline":
        a.phase("train-2n", root / label, a.spec(2 * n), 1.0)
    elif arm == "stacking":
        small = a.phase("train-n", root / "stacking" / "train-n", a.spec(n), cfg.stack_fraction)
        stacked = ModelSpec(path=small, preset=None, grow=GrowSpec(kind="stack"))
        a.phase("stack-train-2n", root / "stacking" / "train-2n", stacked, None)
    else:
        # The first phase is the same run for every arm at one f_train: run once, reused.
        big = a.phase("train-2n", root / f"train-2n-{f_train:g}{tail}", a.spec(2 * n), f_train)
        if arm == "distill-expand" and f_distill == 0.0:  # no distillation: shrink-expand
            arm, label = "shrink-expand", arm_label("shrink-expand", point, lr, carry)
        where = root / label
        grow = GrowSpec(kind="top", layers=n)
        if arm == "restart-only":  # distill-expand's boundaries, the 2n layers throughout
            mid = big
            if f_distill > 0.0:
                mid = a.phase("restart-2n", where / "restart-2n", ModelSpec(path=big, preset=None),
                              f_distill)  # fmt: skip
            a.phase("train-2n-again", where / "train-2n", ModelSpec(path=mid, preset=None), None)
        elif arm == "distill-expand":
            small = a.phase(
                "distill-n",
                where / "distill-n",
                a.spec(n, init_from_teacher="every_other"),
                f_distill,
                teacher=big,
                objectives=cfg.distill_objectives,
            )
            a.phase(
                "grow-train-2n",
                where / "train-2n",
                ModelSpec(path=small, preset=None, grow=grow),
                None,
            )
        else:  # the n layers taken from the teacher as they are, then grown (in place)
            if arm == "reset-in-place":  # kept blocks at 0, 2, …; the fresh ones between them
                grow = GrowSpec(kind="interleave", layers=n)
            shrunk = a.spec(n, init_from_teacher="every_other", grow=grow)
            a.phase("grow-train-2n", where / "train-2n", shrunk, None, teacher=big)
    return a


def _at(cfg: DistillExpandConfig, lr: float, warmup: int, root: Path) -> DistillExpandConfig:
    """``cfg`` at one (lr, warmup), its runs under ``root/lr-LR-warmup-W``."""
    train = cfg.train.model_copy(update={"lr": lr, "warmup_steps": warmup})
    return cfg.model_copy(update={"train": train, "out": root / setting(lr, warmup)})


def _tuned(
    cfg: DistillExpandConfig, arm: str, point: tuple[float, float], carry: bool
) -> tuple[DistillExpandConfig, dict[str, Any] | None]:
    """(``cfg`` at the arm's lr and warmup, the tuning record); untuned: ``cfg`` as given.
    Phases shared between arms at one setting (the first 2n-layer phase) run once."""
    if cfg.tune is None:
        return cfg, None
    tune, root = cfg.tune, Path(cfg.out)

    def score(lr: float, warmup: int) -> float:
        trial = run_arm(_at(cfg, lr, warmup, root / "tune"), arm, point, tune.seed, None, carry)
        return float(trial.phases[-1]["val_loss"])

    record = choose(tune, score)
    return _at(cfg, record["lr"], record["warmup_steps"], root), record


def arm_label(
    arm: str, point: tuple[float, float], lr: float | None = None, carry: bool = False
) -> str:
    """Folder and row name of an arm at a sweep point (at another ``lr`` than train.lr, ends
    in ``-lrLR``; a swept arm carrying AdamW's moments ends in ``-carry``)."""
    tail = (f"-lr{lr:g}" if lr is not None else "") + ("-carry" if carry else "")
    tail = tail if arm in SWEPT else ""
    if arm == "baseline" and lr is not None:
        return f"baseline-lr{lr:g}"
    if arm == "distill-expand":
        return f"distill-expand-{point[0]:g}-{point[1]:g}{tail}"
    if arm == "shrink-expand":
        return f"shrink-expand-{point[0]:g}{tail}"
    if arm == "restart-only":
        return f"restart-only-{point[0]:g}-{point[1]:g}{tail}"
    if arm == "reset-in-place":
        return f"reset-in-place-{point[0]:g}{tail}"
    return arm


def distill_expand(cfg: DistillExpandConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every arm × sweep point × seed into ``cfg.out``; write the table and plots."""
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    plan: dict[str, tuple[str, tuple[float, float], float | None, bool]] = {}
    for arm in cfg.arms:
        swept = arm in SWEPT
        lrs = [None if lr == cfg.train.lr else lr for lr in cfg.swept_lrs or [cfg.train.lr]]
        for lr in lrs if swept else [None]:
            for carry in sorted({opt == "carry" for opt in cfg.optimizer}) if swept else [False]:
                for point in cfg.sweep if swept else [(0.0, 0.0)]:
                    plan.setdefault(arm_label(arm, point, lr, carry), (arm, point, lr, carry))
        if arm == "baseline":
            for lr in cfg.baseline_lrs:
                plan.setdefault(arm_label(arm, (0.0, 0.0), lr), (arm, (0.0, 0.0), lr, False))

    rows: dict[str, Any] = {}
    for label, (arm, point, lr, carry) in plan.items():
        at, tuning = _tuned(cfg, arm, point, carry)
        seeds = [run_arm(at, arm, point, seed, lr, carry) for seed in cfg.seeds]
        finals = [s.phases[-1] for s in seeds]
        loss = mean_std([f["val_loss"] for f in finals])
        ppl = mean_std([f["val_ppl"] for f in finals])
        rows[label] = {
            "arm": arm,
            "lr": lr if lr is not None else at.train.lr,
            "warmup_steps": at.train.warmup_steps,
            "tuning": tuning,
            "f_train": point[0] if arm in SWEPT else None,
            "f_distill": point[1] if arm in ("distill-expand", "restart-only") else None,
            "optimizer": "carry" if carry else "restart",
            "val_loss": {"mean": loss[0], "std": loss[1]},
            "val_ppl": {"mean": ppl[0], "std": ppl[1]},
            "flops": statistics.fmean(s.spent for s in seeds),
            "phases": [
                {
                    "name": p["name"],
                    "layers": p["layers"],
                    "steps": p["steps"],
                    "flops": p["flops"],
                    "flops_per_step": p["flops"] / max(p["steps"], 1),
                }
                for p in seeds[0].phases
            ],
            "runs": [
                {
                    "seed": seed,
                    "val_loss": s.phases[-1]["val_loss"],
                    "val_ppl": s.phases[-1]["val_ppl"],
                    "flops": s.spent,
                    "curve": [pt for p in s.phases for pt in p["curve"]],
                }
                for seed, s in zip(cfg.seeds, seeds, strict=True)
            ],
        }
    result = {
        "hardware": hardware(),
        "torch": torch.__version__,
        "seeds": cfg.seeds,
        "budget_flops": cfg.budget_flops,
        "layers": cfg.model.preset_layers,
        "rows": rows,
        "config": cfg.model_dump(mode="json"),
    }
    write_study(
        "distill-expand",
        result,
        expand_markdown(result),
        [out, cfg.results],
        lambda folder: plot_expand(result, folder),
    )
    return result
