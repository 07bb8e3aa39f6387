"""Hostile and broken inputs: each is one ``distillery: error:`` line with exit 2, no
traceback, and the output folder is left as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from distillery.errors import DistilleryError
from distillery.models import build_model, load_pretrained
from tests.conftest import run_cli


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (empty if there is no folder)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _refused(args: list[str], out: Path, expect: str) -> None:
    before = _snapshot(out)
    result = run_cli(*args, "--out", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("distillery: error: "), lines
    assert "Traceback" not in result.stderr and expect in lines[0], lines[0]
    assert _snapshot(out) == before


YAML_CASES = {
    "duplicate-section": ("train:\n  steps: 3\ntrain:\n  lr: 0.1\n", "duplicate key 'train'"),
    "empty": ("", "is empty"),
    "comments-only": ("# nothing here\n", "is empty"),
    "null": ("null\n", "is empty"),
    "nested": ("a: " + "[" * 3000 + "\n", "nested too deeply"),
    "huge-integer": ("train:\n  seed: " + "9" * 5000 + "\n", "too large"),
    "wrong-section-type": ("train: [1, 2]\n", "train: Input should be a valid dictionary"),
    "not-a-mapping": ("- 1\n- 2\n", "must hold a mapping"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_bad_yaml_is_one_line(case: str, tmp_path: Path):
    text, expect = YAML_CASES[case]
    config = tmp_path / "c.yaml"
    config.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a finished run's file")
    _refused(["train", "--config", str(config)], out, expect)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A causal LM, the same with half its weights gone, a masked LM, a classifier, and a
    folder that names custom code."""
    root = tmp_path_factory.mktemp("folders")
    made = {}
    for name, task, labels in (("lm", "lm", None), ("mlm", "mlm", None), ("cls", "lm", 3)):
        preset = "bert-tiny" if task == "mlm" else "tiny"
        model = build_model(preset, 128, {"num_hidden_layers": 2}, task=task, num_labels=labels)
        model.save_pretrained(root / name)
        made[name] = root / name
    half = root / "half"
    shutil.copytree(made["lm"], half)
    weights = load_file(half / "model.safetensors")
    kept = {k: v for i, (k, v) in enumerate(sorted(weights.items())) if i % 2 == 0}
    save_file(kept, half / "model.safetensors", metadata={"format": "pt"})
    made["half"] = half
    custom = root / "custom"
    shutil.copytree(made["lm"], custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="mystery", auto_map={"AutoConfig": "mystery.MysteryConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "mystery.py").write_text("raise SystemExit('remote code ran')\n")
    made["custom"] = custom
    return made


def test_a_folder_with_missing_weights_is_refused(folders: dict[str, Path]):
    with pytest.raises(DistilleryError, match=r"missing weight\(s\)"):
        load_pretrained(folders["half"], "teacher")
    load_pretrained(folders["lm"], "teacher")  # the complete folder loads


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("half", "missing weight(s)"),
        ("mlm", "not a causal language model"),
        ("cls", "not a causal language model"),
        ("custom", "own Python code, which distillery never does"),
    ],
)
def test_wrong_teacher_folders_are_one_line(
    name: str, expect: str, folders: dict[str, Path], corpus: Path, cache_dir: Path, tmp_path
):
    args = [
        "distill", "--teacher", str(folders[name]), "--data", str(corpus),
        "model.preset=tiny", "data.seq_len=32", "data.vocab_size=512",
        f"data.cache_dir={cache_dir}", "train.steps=1",
    ]  # fmt: skip
    _refused(args, tmp_path / "out", expect)


@pytest.mark.parametrize(
    ("kind", "expect"),
    [("fifo", "not a regular file or folder"), ("device", "not a regular file or folder")],
)
def test_a_pipe_or_a_device_as_data_is_one_line(kind: str, expect: str, tmp_path: Path):
    import os

    source = tmp_path / "data.txt"
    if kind == "fifo":
        os.mkfifo(source)
    else:
        source.symlink_to("/dev/zero")
    _refused(["train", "--data", str(source), "train.steps=1"], tmp_path / "out", expect)


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("data.cache_dir=" + "/a" * 3000, "longer than the system allows"),
        ("out=runs/" + "x" * 300, "longer than the system allows"),
    ],
)
def test_absurd_paths_are_one_line(override: str, expect: str, tmp_path: Path):
    _refused(["train", override], tmp_path / "out", expect)


def test_a_nul_byte_in_a_config_path_is_one_line(tmp_path: Path):
    """(An argument cannot carry a NUL byte; a YAML string can.)"""
    config = tmp_path / "c.yaml"
    config.write_text('data:\n  cache_dir: "cache\\0dir"\n', encoding="utf-8")
    _refused(["train", "--config", str(config)], tmp_path / "out", "contains a NUL byte")


def test_ctrl_c_while_starting_is_one_line():
    """SIGINT a fraction of a second in, while torch and transformers are still importing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillery", "train", "--help"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # it finished before the signal: nothing to check here
        pytest.skip("the command finished before the signal arrived")
    assert "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("distillery: interrupted"), err


def test_overwrite_with_bad_inputs_leaves_the_finished_run(
    corpus: Path, cache_dir: Path, teacher_dir: Path, tmp_path: Path
):
    """``--overwrite`` replaces a finished run only once the new run's inputs are checked: a
    broken teacher, or a teacher that lives inside ``--out``, leaves every byte as it was."""
    out = tmp_path / "run"
    base = [
        "--data", str(corpus), "model.preset=tiny", "data.seq_len=32", "data.vocab_size=512",
        f"data.cache_dir={cache_dir}", "train.steps=2", "train.batch_size=4",
        "train.tensorboard=false",
    ]  # fmt: skip
    first = run_cli("train", *base, "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "model" / "model.safetensors").is_file()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _refused(["distill", "--teacher", str(broken), "--overwrite", *base], out, "config.json")
    _refused(
        ["distill", "--teacher", str(out / "model"), "--overwrite", *base],
        out,
        "is inside --out",
    )


def test_a_refused_resume_leaves_the_run_resumable(corpus: Path, cache_dir: Path, tmp_path: Path):
    """A resume refused for a changed setting writes nothing (its config.yaml is not the run's),
    so a plain ``--resume`` afterwards continues the run."""
    out = tmp_path / "run"
    base = [
        "--data", str(corpus), "model.preset=tiny", "data.seq_len=32", "data.vocab_size=512",
        f"data.cache_dir={cache_dir}", "train.steps=4", "train.batch_size=4",
        "train.checkpoint_every=2", "train.tensorboard=false", "--out", str(out),
    ]  # fmt: skip
    first = run_cli("train", *base, "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    refused = run_cli("train", *base, "--resume", "train.batch_size=8")
    assert refused.returncode == 2 and "train.batch_size 4 → 8" in refused.stderr
    assert _snapshot(out) == before
    again = run_cli("train", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


BOUNDS = {
    "train.flops_budget=.inf": "train.flops_budget: Input should be a finite number",
    "train.weight_decay=.inf": "train.weight_decay: Input should be a finite number",
    "train.lr=.nan": "train.lr: Input should be a finite number",
    "data.vocab_size=1000000000": "data.vocab_size: Input should be less than or equal",
    "train.seed=18446744073709551616": "train.seed: Input should be less than",
    "train.batch_size=1099511627776": "train.batch_size: Input should be less than or equal",
    "train.data_offset=99999999999999": "train.data_offset: Input should be less than or equal",
}


@pytest.mark.parametrize("override", sorted(BOUNDS))
def test_absurd_numbers_are_refused_before_anything_is_allocated(override: str, tmp_path: Path):
    from distillery.config import RunConfig, build_config

    with pytest.raises(DistilleryError) as err:
        build_config(RunConfig, overrides=[override])
    assert BOUNDS[override] in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["model.overrides={num_key_value_heads: 3}", "model.overrides={head_dim: 7}"],
)
def test_model_overrides_transformers_rejects_are_one_line(
    override: str, corpus: Path, cache_dir: Path, tmp_path: Path
):
    args = [
        "train", "--data", str(corpus), "model.preset=tiny", "data.seq_len=32",
        "data.vocab_size=512", f"data.cache_dir={cache_dir}", "train.steps=1", override,
    ]  # fmt: skip
    _refused(args, tmp_path / "out", "model.overrides")
