"""Configs: YAML + overrides, every problem named in one line, shipped configs valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.config import RunConfig, build_config
from distillery.errors import DistilleryError
from distillery.recipes.ablate import AblationConfig
from distillery.recipes.quickstart import QuickstartConfig

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_nested():
    cfg = build_config(
        RunConfig,
        overrides=["train.lr=3e-4", "train.precision=bf16", "model.overrides={hidden_size: 128}"],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.precision == "bf16"
    assert cfg.model.overrides == {"hidden_size": 128}


def test_yaml_then_overrides_merge_deeply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 0.01\ndata:\n  seq_len: 64\n")
    cfg = build_config(RunConfig, path, ["train.lr=0.02"])
    assert (cfg.train.steps, cfg.train.lr, cfg.data.seq_len) == (7, 0.02, 64)
    assert cfg.data.source == "bbc-news"  # untouched defaults survive the merge


def test_all_problems_in_one_line():
    with pytest.raises(DistilleryError) as err:
        build_config(RunConfig, overrides=["train.stepz=1", "data.seq_len=0", "objectives=[]"])
    line = str(err.value)
    assert "\n" not in line
    for field in ("train.stepz", "data.seq_len", "objectives"):
        assert field in line


def test_objective_union_rejects_unknown_kind_and_parameter():
    with pytest.raises(DistilleryError, match=r"objectives\.0"):
        build_config(RunConfig, overrides=["objectives=[{kind: telepathy}]"])
    with pytest.raises(DistilleryError, match="unknown field"):
        build_config(RunConfig, overrides=["objectives=[{kind: ce, temperature: 2}]"])


def test_bad_override_syntax():
    with pytest.raises(DistilleryError, match="key=value"):
        build_config(RunConfig, overrides=["train.lr"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")))
def test_shipped_configs_validate(name):
    path = ROOT / "experiments" / name
    from distillery.recipes.teacher_stage import TeachersConfig

    recipes = {
        "quickstart": QuickstartConfig,
        "ablation": AblationConfig,
        "teachers": TeachersConfig,
    }
    stem = name.removesuffix(".yaml")  # ablation-ladder.yaml is an ablation config, and so on
    cls = next((c for k, c in recipes.items() if stem == k or stem.startswith(f"{k}-")), RunConfig)
    build_config(cls, path, ["teacher=/some/teacher"] if cls is RunConfig else [])


def test_quickstart_yaml_spells_out_the_defaults():
    assert build_config(QuickstartConfig, ROOT / "experiments" / "quickstart.yaml") == (
        QuickstartConfig()
    )


def test_ablation_yaml_is_the_default_ablation_written_out():
    cfg = build_config(AblationConfig, ROOT / "experiments" / "ablation.yaml")
    assert cfg == AblationConfig(results=Path("results/ablation/cpu-2core"))


def test_teacher_is_one_typed_field():
    """A folder or a list of folders is a live teacher; other kinds are named; the flat fields
    it replaced are unknown now; every problem is one line naming the field."""
    from distillery.config import CachedTeacherSpec, LiveTeacherSpec, MCDropoutTeacherSpec

    one = RunConfig.model_validate({"teacher": "t"}).teacher
    assert isinstance(one, LiveTeacherSpec) and one.paths == [Path("t")]
    several = RunConfig.model_validate({"teacher": ["a", "b"]}).teacher
    assert isinstance(several, LiveTeacherSpec) and several.paths == [Path("a"), Path("b")]
    cfg = build_config(RunConfig, overrides=["teacher.path=t", "teacher.kind=mc_dropout"])
    assert isinstance(cfg.teacher, MCDropoutTeacherSpec) and cfg.teacher.samples == 8
    cached = {"kind": "cache", "path": "t", "cache": "c"}
    assert isinstance(RunConfig.model_validate({"teacher": cached}).teacher, CachedTeacherSpec)
    for overrides, field in (
        (["teacher={kind: oracle, path: t}"], "teacher"),
        (["teacher=t", "teacher_cache=c"], "teacher_cache: unknown field"),
        (["teacher={kind: live, path: [a, b], weights: [1]}"], "weights: give one weight"),
        (["teacher={kind: mc_dropout, path: t, samples: 1}"], "teacher.mc_dropout.samples"),
    ):
        with pytest.raises(DistilleryError) as err:
            build_config(RunConfig, overrides=overrides)
        assert field in str(err.value) and "\n" not in str(err.value)


def test_codistill_refuses_a_flops_budget_in_one_line():
    from distillery.config import CodistillConfig

    peers = {"peers": [{"preset": "tiny"}, {"preset": "tiny"}]}
    with pytest.raises(DistilleryError, match=r"train\.flops_budget: a peer's FLOPs per step"):
        build_config(CodistillConfig, overrides=["train.flops_budget=1e12"], base=peers)
    with pytest.raises(DistilleryError, match=r"must be a multiple of exchange\.every"):
        build_config(
            CodistillConfig,
            overrides=["exchange.mode=predictions", "exchange.every=3", "train.checkpoint_every=5"],
            base=peers,
        )


def _study_class(path: Path) -> type:
    from distillery.config import CodistillConfig
    from distillery.recipes.calibrate import CalibrateConfig
    from distillery.recipes.classifiers import ClassifiersConfig
    from distillery.recipes.codistill_hetero import CodistillHeteroConfig
    from distillery.recipes.codistill_study import CodistillStudyConfig
    from distillery.recipes.cross_tokenizer import CrossTokenizerStudyConfig
    from distillery.recipes.distill_expand import DistillExpandConfig
    from distillery.recipes.iit import IITStudyConfig
    from distillery.recipes.modes_config import ModesConfig
    from distillery.recipes.on_policy import OnPolicyStudyConfig
    from distillery.recipes.pool_ensemble import PoolEnsembleConfig
    from distillery.recipes.prune_study import PruneStudyConfig

    by_folder = {
        "modes": ModesConfig,
        "distill-expand": DistillExpandConfig,
        "iit": IITStudyConfig,
        "calibration": {"pool-ensemble.yaml": PoolEnsembleConfig}.get(path.name, CalibrateConfig),
        "classifiers": ClassifiersConfig,
        "codistill": {"pool.yaml": CodistillConfig, "hetero.yaml": CodistillHeteroConfig}.get(
            path.name, CodistillStudyConfig
        ),
        "on_policy": OnPolicyStudyConfig,
        "cross_tokenizer": CrossTokenizerStudyConfig,
        "prune": PruneStudyConfig,
    }
    return by_folder[path.parent.name]


@pytest.mark.parametrize(
    "name", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*/*.yaml"))
)
def test_shipped_study_configs_validate_with_their_recipes(name):
    """Every config under experiments/<study>/ validates with the schema beside its recipe."""
    path = ROOT / name
    build_config(_study_class(path), path)
