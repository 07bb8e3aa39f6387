"""The command line: bad input gives one clear line and exit code 2; quickstart end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.cli import main
from tests.conftest import run_cli


def fails_with(capsys: pytest.CaptureFixture, args: list[str], *needles: str) -> str:
    """Run the CLI in-process; assert exit 2 and one stderr line containing ``needles``."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("distillery: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def small(cache_dir: Path) -> list[str]:
    return [
        "model.preset=tiny",
        "data.seq_len=32",
        "data.vocab_size=512",
        f"data.cache_dir={cache_dir}",
        "train.steps=2",
        "train.batch_size=2",
    ]


def test_missing_corpus_in_a_real_process(tmp_path):
    proc = run_cli("train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("distillery: error: ")
    assert "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_and_malformed_corpora(capsys, tmp_path, cache_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails_with(
        capsys,
        ["train", "--data", str(empty), "--out", str(tmp_path / "a"), *small(cache_dir)],
        "empty",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    fails_with(
        capsys,
        ["train", "--data", str(bad), "--out", str(tmp_path / "b"), *small(cache_dir)],
        "line 2",
    )
    no_field = tmp_path / "field.csv"
    no_field.write_text("body,label\nhello,1\n")
    fails_with(
        capsys,
        ["train", "--data", str(no_field), "--out", str(tmp_path / "c"), *small(cache_dir)],
        "text",
    )


def test_config_errors_name_the_field(capsys, tmp_path, corpus, cache_dir):
    args = ["train", "--data", str(corpus), "--out", str(tmp_path / "o"), *small(cache_dir)]
    line = fails_with(capsys, [*args, "train.lrr=1", "train.steps=-3"], "train.lrr")
    assert "train.steps" in line  # every problem gathered into the one line
    fails_with(capsys, [*args, "model.preset=huge"], "huge", "tiny")
    fails_with(capsys, [*args, "objectives=[{kind: forward_kl}]"], "teacher")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: [unclosed\n")
    fails_with(capsys, [*args, "--config", str(cfg)], "not valid YAML")
    assert not (tmp_path / "o" / "model").exists()


def test_teacher_problems(capsys, tmp_path, corpus, cache_dir, teacher_dir):
    args = ["distill", "--data", str(corpus), "--out", str(tmp_path / "o"), *small(cache_dir)]
    not_lm = tmp_path / "vision"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "vit"}))
    fails_with(capsys, [*args, "--teacher", str(not_lm)], "not a causal language model")
    fails_with(capsys, [*args, "--teacher", str(tmp_path / "absent")], "not found")

    # A student folder whose tokenizer differs from the teacher's.
    from distillery.data import load_documents, train_bpe_tokenizer
    from distillery.models import build_model

    other = tmp_path / "other"
    tok = train_bpe_tokenizer(load_documents(corpus)[:50], 400, other)
    build_model("tiny", len(tok)).save_pretrained(other)
    args = [a for a in args if a != "model.preset=tiny"]
    fails_with(
        capsys,
        [*args, "--teacher", str(teacher_dir), "--student", str(other)],
        "tokenizers disagree",
    )


def test_unwritable_output_folder(capsys, tmp_path, corpus, cache_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    fails_with(
        capsys,
        ["train", "--data", str(corpus), "--out", str(blocker / "run"), *small(cache_dir)],
        "cannot write",
    )
    assert blocker.read_text() == "not a folder"


def test_quickstart_end_to_end(tmp_path, corpus, cache_dir):
    out = tmp_path / "qs"
    code = main(
        [
            "quickstart",
            "--out",
            str(out),
            "--data",
            str(corpus),
            "teacher.preset=tiny",
            "teacher.overrides={num_hidden_layers: 4}",
            "student_layers=2",
            "data.seq_len=32",
            "data.vocab_size=512",
            f"data.cache_dir={cache_dir}",
            "teacher_train.steps=30",
            "teacher_train.batch_size=8",
            "teacher_train.warmup_steps=3",
            "teacher_train.log_every=1",
            "student_train.steps=10",
            "student_train.batch_size=8",
            "student_train.warmup_steps=2",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())["models"]
    assert set(summary) == {"teacher", "student-distilled", "student-scratch"}
    for row in summary.values():
        for key in ("params", "val_loss", "val_ppl", "agreement", "flops"):
            assert isinstance(row[key], float | int) and row[key] == row[key], key
    assert summary["teacher"]["params"] > summary["student-distilled"]["params"]
    assert summary["student-distilled"]["params"] == summary["student-scratch"]["params"]
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    teacher_losses = [
        json.loads(line)["loss"]
        for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert all(x == x for x in teacher_losses)
    assert teacher_losses[-1] < teacher_losses[0] - 0.3
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student-distilled" / "model")
    assert student.config.num_hidden_layers == 2


def test_eval_command_reports_quality_size_and_speed(
    capsys, tmp_path, corpus, cache_dir, teacher_dir
):
    dest = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--model",
            str(teacher_dir),
            "--teacher",
            str(teacher_dir),
            "--data",
            str(corpus),
            "--out",
            str(dest),
            "seq_len=32",
            f"cache_dir={cache_dir}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads(dest.read_text())
    assert result["agreement"] == 1.0  # a model agrees with itself
    assert abs(result["kl_teacher_student"]) < 1e-6
    assert result["val_ppl"] > 1 and 0 < result["accuracy"] < 1
    assert result["size_on_disk"] > 4 * result["params"]  # fp32 weights at least
    assert result["generation_tokens_per_s"] > 0


def test_overrides_may_come_before_options_and_more_input_checks(
    capsys, tmp_path, corpus, cache_dir
):
    bom = tmp_path / "excel.csv"
    bom.write_bytes(
        "\ufefftext,label\n".encode()
        + b"".join(f'"{t[:400]}",x\n'.replace('"', "").encode() for t in ["alpha beta gamma"] * 3)
    )
    fails_with(
        capsys,
        [
            "train",
            "model.overrides.max_position_embeddings=16",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "o"),
            *small(cache_dir),
        ],
        "data.seq_len=32 exceeds",
    )
    fails_with(
        capsys,
        ["train", "train.betas=[2, 3]", "--data", str(corpus), "--out", str(tmp_path / "o")],
        "train.betas",
    )
    fails_with(
        capsys,
        [
            "train",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "o"),
            *small(cache_dir),
            "model.overrides.num_attention_heads=0",
        ],
        "positive",
    )
    # The BOM is not part of the column name: the failure is about size, not the column.
    line = fails_with(
        capsys, ["train", "--data", str(bom), "--out", str(tmp_path / "o"), *small(cache_dir)]
    )
    assert "no column" not in line
    code = main(["eval", "--model", str(tmp_path), "--out", str(tmp_path)])
    assert code == 2 and "not a folder" in capsys.readouterr().err


def test_out_and_data_flags_beat_the_config_file_and_overrides_beat_both(tmp_path):
    from distillery.cli import _recipe_config, build_parser
    from distillery.recipes.ablate import AblationConfig
    from distillery.recipes.quickstart import QuickstartConfig

    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("out: runs/from-file\ndata: {source: from-file.txt, seq_len: 64}\n")
    for command, cls in (("ablate", AblationConfig), ("quickstart", QuickstartConfig)):
        args = build_parser().parse_args(
            [command, "--config", str(cfg_file), "--out", "flag-out", "--data", "flag.txt"]
        )
        cfg = _recipe_config(cls, args)
        assert (str(cfg.out), cfg.data.source, cfg.data.seq_len) == ("flag-out", "flag.txt", 64)
        args = build_parser().parse_args(
            [command, "--config", str(cfg_file), "--out", "flag-out", "out=override-out"]
        )
        assert str(_recipe_config(cls, args).out) == "override-out"
