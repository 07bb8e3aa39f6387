"""The teacher stage: early stopping by patience or at the cap, the best model exported, reuse
of a finished stage by content, exact resume of an interrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.config import DataConfig, ModelSpec, TrainConfig
from distillery.engine import Engine
from distillery.recipes.teacher_stage import (
    TeachersConfig,
    TeacherStage,
    converged_teacher,
    stage_run_config,
    teacher_for,
    teachers,
    train_teachers,
)


def _parts(corpus: Path, cache_dir: Path) -> tuple[DataConfig, ModelSpec, TrainConfig]:
    data = DataConfig(source=str(corpus), seq_len=32, vocab_size=512, cache_dir=cache_dir)
    train = TrainConfig(batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, tensorboard=False)
    return data, ModelSpec(preset="tiny"), train


def test_patience_stops_and_keeps_the_best(corpus: Path, cache_dir: Path, tmp_path: Path) -> None:
    data, model, train = _parts(corpus, cache_dir)
    # No later evaluation can beat the first by 100 nats: the stage stops after 1 + patience.
    stage = TeacherStage(eval_every=2, patience=2, min_delta=100.0, max_steps=50, root=tmp_path)
    cfg = stage_run_config(data, model, train, stage, seed=0)
    summary = converged_teacher(cfg, stage)
    assert summary["stopped"] == "patience"
    assert summary["best_step"] == 2 and summary["steps_trained"] == 6
    assert [h["step"] for h in summary["history"]] == [2, 4, 6]
    # The exported model is the step-2 one: scoring the export on the whole validation split
    # gives the loss the stage measured on the in-memory model at step 2.
    assert summary["val_loss"] == pytest.approx(summary["history"][0]["val_loss"], rel=1e-5)
    assert summary["history"][2]["val_loss"] < summary["history"][0]["val_loss"]  # still falling
    assert summary["flops"] < summary["flops_trained"]
    assert (Path(summary["model"]) / "model.safetensors").is_file()


def test_cap_reuse_and_content_key(
    corpus: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model, train = _parts(corpus, cache_dir)
    stage = TeacherStage(seeds=[0, 1], eval_every=3, patience=5, max_steps=6, root=tmp_path)
    cfg = TeachersConfig(
        data=data, teacher=model, teacher_train=train, teacher_stage=stage, results=tmp_path / "r"
    )
    result = teachers(cfg)
    table = (tmp_path / "r" / "teachers.md").read_text()
    assert table.count("| cap |") == 2 and "Teacher-seed spread" in table
    assert (
        json.loads((tmp_path / "r" / "teachers.json").read_text())["teachers"] == result["teachers"]
    )
    for t in result["teachers"]:
        assert t["stopped"] == "cap" and t["steps_trained"] == 6
        history = json.loads((Path(t["model"]).parent / "summary.json").read_text())["history"]
        assert t["best_step"] == min(history, key=lambda h: h["val_loss"])["step"]
    ppl = [t["val_ppl"] for t in result["teachers"]]
    assert ppl[0] != ppl[1]  # two seeds, two teachers
    mean = (ppl[0] + ppl[1]) / 2
    assert result["val_ppl"]["std"] == pytest.approx(abs(ppl[0] - ppl[1]) / 2**0.5)
    assert result["val_ppl"]["mean"] == pytest.approx(mean)
    assert teacher_for(result, 0) != teacher_for(result, 1) == teacher_for(result, 3)
    capsys.readouterr()
    again = train_teachers(data, model, train, stage)
    assert again["teachers"] == result["teachers"] and capsys.readouterr().out.count("reusing") == 2
    # Another stopping rule is another teacher; the same config is the same folder.
    other = stage.model_copy(update={"patience": 4})
    key = stage_run_config(data, model, train, stage, 0).out
    assert stage_run_config(data, model, train, stage, 0).out == key
    assert stage_run_config(data, model, train, other, 0).out != key
    assert stage_run_config(data, model, train.model_copy(update={"lr": 1e-3}), stage, 0).out != key
    # A field at its default, spelled out (or added to the schema later), changes no key.
    spelled = train.model_copy(update={"weight_decay": 0.1})
    assert stage_run_config(data, model, spelled, stage, 0).out == key


def test_interrupted_stage_resumes_exactly(
    corpus: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model, train = _parts(corpus, cache_dir)
    stage = TeacherStage(eval_every=2, patience=9, max_steps=6, root=tmp_path / "a")
    straight = converged_teacher(stage_run_config(data, model, train, stage, 0), stage)

    stage_b = stage.model_copy(update={"root": tmp_path / "b"})
    cfg = stage_run_config(data, model, train, stage_b, 0)
    fit, calls = Engine.fit, []

    def failing_fit(self: Engine, **kw: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # after the step-2 evaluation and checkpoint
            raise KeyboardInterrupt
        return fit(self, **kw)

    monkeypatch.setattr(Engine, "fit", failing_fit)
    with pytest.raises(KeyboardInterrupt):
        converged_teacher(cfg, stage_b)
    monkeypatch.setattr(Engine, "fit", fit)
    assert not (Path(cfg.out) / "summary.json").exists()
    resumed = converged_teacher(cfg, stage_b)
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6]
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)


def test_stage_config_is_checked() -> None:
    with pytest.raises(ValueError, match="each seed once"):
        TeacherStage(seeds=[1, 1])
    with pytest.raises(ValueError):
        TeacherStage(patience=0)
    from distillery.recipes.quickstart import QuickstartConfig  # a recipe that cannot use one

    with pytest.raises(ValueError, match="does not train converged teachers yet"):
        QuickstartConfig.model_validate({"teacher_stage": {}})


def test_teacher_regime_says_how_the_teachers_stopped() -> None:
    from distillery.recipes.study import teacher_regime

    def info(*stopped: str) -> dict:
        return {"converged": True, "teachers": [{"stopped": s} for s in stopped]}

    assert teacher_regime(info("patience", "patience")) == "converged (early-stopped by patience)"
    assert "1 of 2 stopped at the step cap" in teacher_regime(info("patience", "cap"))
    assert "not converged" in teacher_regime({"converged": False, "teachers": [{"seed": 0}]})
