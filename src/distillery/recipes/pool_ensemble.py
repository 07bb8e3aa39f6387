"""``distillery experiment pool-ensemble``: is a codistilled pool a better ensemble than
independently trained members of the same size, and a better teacher for one student?

Members: a codistillation study's runs (``codistill``: its config file), per seed its ``solo``
peers (each alone on its own 1/N of the training blocks) and its ``checkpoints`` pool (the same
shards, peers teaching each other through published weights); finished runs are reused, missing
ones launched as the study launches them (``recipes.codistill_study``). On the test split, chunk
by chunk: ``single`` (solo peer 0), ``independent ensemble`` (the solo peers' mean
probabilities), ``codistilled peer`` (pool peer 0), ``pool ensemble`` (the pool's mean), and
per ensemble and temperature T a student of the peer's architecture (random initialisation),
trained by the one engine (``recipes.run``) on every training block towards the ensemble's mean
at T (forward KL × T², + task CE if ``distil.ce_weight``), the same seed and steps for both.
Accuracy, NLL, Brier, equal-width ECE, with block-bootstrap intervals (``eval.calibration``)
alone, against ``single`` and for pool − independent, which also gets seed-paired t-intervals;
and each ensemble's diversity. Writes ``pool-ensemble.{md,json}`` and a reliability diagram
(``recipes.pool_ensemble_report``).
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, model_validator

from distillery.config import (
    CodistillConfig,
    CrossEntropyObjective,
    ForwardKLObjective,
    LiveTeacherSpec,
    RunConfig,
    Strict,
    build_config,
)
from distillery.distributed import DistEnv, resolve_device
from distillery.errors import DistilleryError
from distillery.eval import (
    CalibrationStats,
    bootstrap_calibration,
    bootstrap_weights,
    calibration_sums,
    evaluate_model,
    prediction_groups,
    predictions,
)
from distillery.models import load_pretrained
from distillery.pool import Shard
from distillery.recipes.calibrate_report import plot_reliability
from distillery.recipes.codistill_study import (
    CodistillStudyConfig,
    _finished,
    _label,
    _launch,
    _pool_config,
)
from distillery.recipes.common import prepare_data, prepare_out_dir
from distillery.recipes.pool_ensemble_report import NAME, pool_ensemble_markdown, summarise
from distillery.recipes.study import SeededStudy, run_or_reuse, write_study
from distillery.teachers import EnsembleTeacher, LiveTeacher

ENSEMBLES = {"independent": "solo", "pool": "checkpoints"}  # the codistill arm of each's members
MEMBER_PREDICTORS = ("single", "independent ensemble", "codistilled peer", "pool ensemble")
DEFAULT_CODISTILL = Path("experiments/codistill/baselines.yaml")


class DistilSpec(Strict):
    """The students: one per ensemble and temperature, each from a random initialisation."""

    steps: int = Field(240, gt=0)
    lr: float = Field(2e-3, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    temperatures: list[Annotated[float, Field(gt=0.0)]] = Field(
        default_factory=lambda: [1.0], min_length=1
    )
    kl_weight: float = Field(1.0, gt=0.0)  # forward KL to the ensemble's mean at T (× T²)
    ce_weight: float = Field(0.0, ge=0.0)  # task CE on the next tokens (calibrate's students: 0)

    @model_validator(mode="after")
    def _distinct(self) -> DistilSpec:
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError("temperatures: give each temperature once")
        return self


class BootstrapSpec(Strict):
    """Resamples of the test blocks (seeded: the same for every predictor and seed)."""

    samples: int = Field(1000, ge=100)
    seed: int = Field(0, ge=0)


def load_codistill(path: Path) -> CodistillStudyConfig:
    """The codistillation study whose runs are the members (its config file)."""
    if not Path(path).is_file():
        raise DistilleryError(f"codistill: no config file {path}")
    try:
        return build_config(CodistillStudyConfig, Path(path))
    except DistilleryError as err:
        raise DistilleryError(f"codistill: {path}: {err}") from None


class PoolEnsembleConfig(SeededStudy):
    """``distillery experiment pool-ensemble``: a codistilled pool and independently trained
    peers as ensembles, and students distilled from each (``recipes/pool_ensemble``)."""

    codistill: Path = DEFAULT_CODISTILL  # a ``distillery experiment codistill`` config
    peers: int = Field(2, ge=2, le=64)  # the pool size (one of the study's ``peers``)
    distil: DistilSpec = Field(default_factory=DistilSpec)
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    n_bins: int = Field(10, ge=2)  # equal-width ECE bins
    out: Path = Path("runs/pool-ensemble")

    @model_validator(mode="before")
    @classmethod
    def _seeds_of_the_study(cls, data: Any) -> Any:
        """Without ``seeds``: the codistillation study's (a bad file is reported below)."""
        if isinstance(data, dict) and "seeds" not in data:
            try:
                return {
                    **data,
                    "seeds": load_codistill(data.get("codistill", DEFAULT_CODISTILL)).seeds,
                }
            except (DistilleryError, TypeError):
                pass
        return data

    @model_validator(mode="after")
    def _members_in_the_study(self) -> PoolEnsembleConfig:
        try:
            study = load_codistill(self.codistill)
        except DistilleryError as err:
            raise ValueError(str(err)) from None
        if self.peers not in study.peers:
            raise ValueError(
                f"peers: {self.codistill} trains pools of {study.peers} peers, not {self.peers}"
            )
        if missing := sorted(set(self.seeds) - set(study.seeds)):
            raise ValueError(
                f"seeds: {missing} are not seeds of {self.codistill} ({study.seeds}), whose runs "
                "are the members; choose among those"
            )
        if not study.data.test_fraction:
            raise ValueError(f"codistill: {self.codistill} has no test split (data.test_fraction)")
        return self


@dataclass(frozen=True)
class Student:
    """One student: its predictor name, the ensemble it learns from, T and its run folder."""

    name: str
    ensemble: str
    temperature: float
    folder: str


def students(cfg: PoolEnsembleConfig) -> list[Student]:
    """The students of each temperature, from the independent then the pool ensemble."""
    return [
        Student(f"student ← {kind} (T={t:g})", kind, t, f"student-{kind}-T{t:g}")
        for t in cfg.distil.temperatures
        for kind in ENSEMBLES
    ]


def member_pools(
    cfg: PoolEnsembleConfig, study: CodistillStudyConfig, seed: int
) -> dict[str, CodistillConfig]:
    """The seed's ``solo`` and ``checkpoints`` pools of ``cfg.peers``, as the study runs them."""
    root, n = Path(study.out) / f"seed{seed}", cfg.peers
    return {
        a: _pool_config(study, a, seed, root / _label(a, n), n) for a in ("solo", "checkpoints")
    }


def member_dirs(pool: CodistillConfig) -> list[Path]:
    """The model folders of a pool's peers."""
    return [Path(pool.out) / f"peer{i}" / "model" for i in range(len(pool.peers))]


def ensure_members(
    cfg: PoolEnsembleConfig, study: CodistillStudyConfig, seed: int
) -> tuple[dict[str, CodistillConfig], bool]:
    """The seed's pools, launching what is missing; and whether all had finished before."""
    pools, peers = member_pools(cfg, study, seed), list(range(cfg.peers))
    before = all(_finished(pool, peers) for pool in pools.values())
    _launch(pools["solo"], peers, f"s{seed}-{_label('solo', cfg.peers)}")
    _launch(pools["checkpoints"], None, f"s{seed}-{_label('checkpoints', cfg.peers)}")
    return pools, before


def student_config(
    cfg: PoolEnsembleConfig,
    study: CodistillStudyConfig,
    seed: int,
    student: Student,
    pools: dict[str, CodistillConfig],
) -> RunConfig:
    """A student's run: the peer's architecture, every training block, the ensemble's mean."""
    spec = cfg.distil
    objectives: list[Any] = [
        ForwardKLObjective(weight=spec.kl_weight, temperature=student.temperature)
    ]
    if spec.ce_weight:
        objectives.append(CrossEntropyObjective(weight=spec.ce_weight))
    train = study.train.model_copy(
        update={"steps": spec.steps, "lr": spec.lr, "warmup_steps": spec.warmup_steps,
                "seed": seed, "eval_every": 0, "checkpoint_every": 0}
    )  # fmt: skip
    return RunConfig(
        data=study.data,
        model=study.model,
        teacher=LiveTeacherSpec(path=member_dirs(pools[ENSEMBLES[student.ensemble]])),
        objectives=objectives,
        train=train,
        out=Path(cfg.out) / f"seed{seed}" / student.folder,
    )


@dataclass
class TestSplit:
    """The test split as every predictor is scored on it."""

    data: Any  # PackedTokens
    groups: np.ndarray  # (N,) the test block of each prediction, in order
    vocab: int
    device: torch.device


def ensemble(folders: list[Path], device: torch.device, vocab: int) -> EnsembleTeacher:
    """The models in ``folders`` as one predictor: the mean of their probabilities."""
    members = [LiveTeacher(load_pretrained(f, "peer").to(device)) for f in folders]
    return EnsembleTeacher(members, vocab=vocab)


def score(
    predictor: Any, split: TestSplit, n_bins: int
) -> tuple[dict[str, float], np.ndarray, CalibrationStats]:
    """(metrics, ``calibration_sums`` per test block, the per-prediction stats)."""
    stats = CalibrationStats()
    with torch.inference_mode():
        m = evaluate_model(
            predictor, split.data, device=split.device, vocab=split.vocab, n_bins=n_bins,
            stats=stats,
        )  # fmt: skip
    metrics = {"nll": m["val_loss"], **{k: m[k] for k in ("accuracy", "brier", "ece")}}
    sums = calibration_sums(stats.table, split.groups, split.data.num_blocks, n_bins)
    return metrics, sums, stats


@torch.inference_mode()
def disagreement(members: list[LiveTeacher], split: TestSplit) -> float:
    """Mean over pairs of members of the share of test predictions whose top-1 differ."""
    shares = []
    for a, b in itertools.combinations(members, 2):
        differ = total = 0
        for logits, _, other in predictions(
            a, split.data, device=split.device, teacher=b, vocab=split.vocab
        ):
            assert other is not None
            differ += int((logits.argmax(-1) != other.argmax(-1)).sum())
            total += logits.shape[0]
        shares.append(differ / total)
    return statistics.fmean(shares)


def _summary(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir.parent / "summary.json").read_text(encoding="utf-8"))


def evaluate_seed(
    cfg: PoolEnsembleConfig,
    study: CodistillStudyConfig,
    seed: int,
    pools: dict[str, CodistillConfig],
    pooled: dict[str, CalibrationStats],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every predictor's metrics, cost and within-seed bootstrap intervals on the test split,
    and the ensembles' diversity; and each predictor's ``calibration_sums``."""
    device = resolve_device(study.train.device)
    dirs = {kind: member_dirs(pools[arm]) for kind, arm in ENSEMBLES.items()}
    tokenizer, test = prepare_data(study.data, DistEnv(), dirs["independent"][0], splits=("test",))
    split = TestSplit(test, prediction_groups(test), len(tokenizer), device)
    ensembles = {kind: ensemble(d, device, split.vocab) for kind, d in dirs.items()}
    flops = {kind: [_summary(m)["flops"] for m in d] for kind, d in dirs.items()}
    predictors: dict[str, tuple[Any, float]] = {  # (predictor, training FLOPs behind it)
        "single": (ensembles["independent"].members[0], flops["independent"][0]),
        "independent ensemble": (ensembles["independent"], sum(flops["independent"])),
        "codistilled peer": (ensembles["pool"].members[0], flops["pool"][0]),
        "pool ensemble": (ensembles["pool"], sum(flops["pool"])),
    }
    for s in students(cfg):
        folder = Path(cfg.out) / f"seed{seed}" / s.folder / "model"
        own = _summary(folder)["flops"]
        model = LiveTeacher(load_pretrained(folder, "student").to(device))
        predictors[s.name] = (model, sum(flops[s.ensemble]) + own)
    weights = bootstrap_weights(test.num_blocks, cfg.bootstrap.samples, cfg.bootstrap.seed)
    result: dict[str, Any] = {"seed": seed, "predictors": {}, "bootstrap": {}}
    sums: dict[str, np.ndarray] = {}
    for name, (predictor, train_flops) in predictors.items():
        metrics, sums[name], stats = score(predictor, split, cfg.n_bins)
        result["predictors"][name] = {**metrics, "train_flops": train_flops}
        within = bootstrap_calibration([sums[name]], weights)
        result["bootstrap"][name] = {k: v.as_dict() for k, v in within.items()}
        if name in MEMBER_PREDICTORS:
            pooled.setdefault(name, CalibrationStats()).parts.extend(stats.parts)
    result["diversity"] = {kind: disagreement(e.members, split) for kind, e in ensembles.items()}
    result |= {"test_blocks": test.num_blocks, "test_predictions": len(split.groups)}
    return result, sums


def comparisons(cfg: PoolEnsembleConfig) -> list[tuple[str, str]]:
    """(predictor, against): the pool against independence, for the ensembles, one peer and
    the students of each temperature."""
    name = {(s.ensemble, s.temperature): s.name for s in students(cfg)}
    pairs = [("pool ensemble", "independent ensemble"), ("codistilled peer", "single")]
    return pairs + [(name["pool", t], name["independent", t]) for t in cfg.distil.temperatures]


def _setup(
    cfg: PoolEnsembleConfig, study: CodistillStudyConfig, pools: dict[str, CodistillConfig]
) -> dict[str, Any]:
    """The members' size and the training blocks each member and each student saw."""
    first = member_dirs(pools["solo"])[0]
    train = prepare_data(study.data, DistEnv(), first, splits=("train",))[1]
    config = json.loads((first / "config.json").read_text(encoding="utf-8"))
    summary = _summary(first)
    return {
        "member": {"params": summary["params"], "layers": summary["layers"],
                   "hidden_size": config["hidden_size"]},
        "train_blocks": train.num_blocks,
        "shard_blocks": [Shard(train, i, cfg.peers).num_blocks for i in range(cfg.peers)],
    }  # fmt: skip


def pool_ensemble(cfg: PoolEnsembleConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Make sure the members exist, train the students, evaluate and tabulate; returns the
    result written to ``pool-ensemble.json``. ``overwrite`` retrains the students only (the
    members belong to the codistillation study)."""
    study = load_codistill(cfg.codistill)
    out = Path(cfg.out)
    prepare_out_dir(out, resume=False, overwrite=overwrite, resumable=False)
    prepare_data(study.data, DistEnv())  # the token cache, once, before the peers' processes
    per_seed, sums, pooled = [], {}, {}
    for seed in cfg.seeds:
        pools, before = ensure_members(cfg, study, seed)
        for student in students(cfg):  # students of relaunched members are retrained
            run_cfg = student_config(cfg, study, seed, student, pools)
            run_or_reuse(run_cfg, f"s{seed}-{student.folder}", reuse=before and not overwrite)
        result, sums[seed] = evaluate_seed(cfg, study, seed, pools, pooled)
        per_seed.append(result)
    setup = _setup(cfg, study, pools)
    summary = summarise(cfg, study, per_seed, sums, pooled, setup, comparisons(cfg))
    write_study(
        NAME,
        summary,
        pool_ensemble_markdown(summary),
        [out, cfg.results],
        lambda folder: plot_reliability(summary, folder / f"{NAME}-reliability.png"),
    )
    return summary
