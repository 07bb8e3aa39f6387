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
    recipes = {"quickstart": QuickstartConfig, "ablation": AblationConfig}
    cls = recipes.get(name.removesuffix(".yaml"), RunConfig)
    build_config(cls, path, ["teacher=/some/teacher"] if cls is RunConfig else [])


def test_quickstart_yaml_spells_out_the_defaults():
    assert build_config(QuickstartConfig, ROOT / "experiments" / "quickstart.yaml") == (
        QuickstartConfig()
    )


def test_ablation_yaml_is_the_default_ablation_written_out():
    cfg = build_config(AblationConfig, ROOT / "experiments" / "ablation.yaml")
    assert cfg == AblationConfig(results=Path("results/ablation/cpu-2core"))
