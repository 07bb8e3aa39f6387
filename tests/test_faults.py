"""Hostile and broken inputs: each is one ``distillery: error:`` line with exit 2, no
traceback, and the output folder is left as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
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


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so Python raises KeyboardInterrupt on it. A
    shell's background job (``cmd &``, as a CI runner may start the suite) ignores SIGINT,
    and the child would inherit that and never see the signal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def _train_args(corpus: Path, cache_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(corpus), "--out", str(out), "model.preset=tiny",
        "data.seq_len=32", "data.vocab_size=512", f"data.cache_dir={cache_dir}",
        "train.batch_size=4", "train.tensorboard=false", "train.log_every=1", *extra,
    ]  # fmt: skip


def test_a_divergent_run_stops_before_the_update_and_keeps_good_checkpoints(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    out = tmp_path / "run"
    args = _train_args(
        corpus, cache_dir, out, "train.steps=12", "train.lr=1e30", "train.warmup_steps=0",
        "train.checkpoint_every=1", "train.keep_checkpoints=20",
    )  # fmt: skip
    result = run_cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "is not finite at step" in lines[-1] and "last checkpoint is intact" in lines[-1]
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints  # the steps before the divergence were saved ...
    for ckpt in checkpoints:  # ... and none of them holds a broken weight
        weights = load_file(ckpt / "model.safetensors")
        assert all(bool(w.isfinite().all()) for w in weights.values()), ckpt.name


def test_a_changed_lr_on_resume_takes_effect_and_is_recorded(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    from distillery.engine import lr_factor
    from distillery.recipes.run import RunConfig

    out = tmp_path / "run"
    args = _train_args(corpus, cache_dir, out, "train.steps=4", "train.checkpoint_every=2")
    first = run_cli(*args, "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_cli("train", "--out", str(out), "--resume", "train.lr=2e-4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 2 with train.lr 0.001 → 0.0002" in resumed.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("resumed_with") == "train.lr 0.001 → 0.0002" for r in records)
    cfg = RunConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg.train.lr == 2e-4  # what config.yaml says is what ran
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[3] == pytest.approx(2e-4 * lr_factor(2, cfg.train))
    assert lrs[2] == pytest.approx(1e-3 * lr_factor(1, cfg.train))


def test_non_finite_gradients_under_a_finite_loss_never_reach_the_weights(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    """The case a loss check alone misses: the loss is finite, the gradients are not (a
    backward overflow). The engine stops before the update; weights and checkpoints stay good."""
    import torch

    from distillery.distributed import DistEnv
    from distillery.engine import Engine
    from distillery.recipes.common import prepare_data
    from distillery.step import DistillStep, terms_from_config
    from tests.conftest import tiny_run

    cfg = tiny_run(corpus, cache_dir, tmp_path / "r", steps=6, checkpoint_every=1)
    tokenizer, train, _ = prepare_data(cfg.data, DistEnv(), None)
    model = build_model("tiny", len(tokenizer), {})
    step = DistillStep(terms_from_config([{"kind": "ce"}]))
    engine = Engine(
        model, step, train, cfg.train, tmp_path / "r", device=torch.device("cpu"),
        flops_per_token=1.0,
    )  # fmt: skip
    poisoned = next(model.parameters())
    poisoned.register_hook(lambda g: g * float("nan") if engine.progress.step == 3 else g)
    with pytest.raises(DistilleryError, match=r"gradient norm \(nan\) is not finite at step 4"):
        engine.fit()
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    for ckpt in sorted((tmp_path / "r" / "checkpoints").iterdir()):
        assert all(bool(w.isfinite().all()) for w in load_file(ckpt / "model.safetensors").values())


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped-bit", "state-types"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    damage: str, corpus: Path, cache_dir: Path, tmp_path: Path
):
    """Checkpoints carry checksums: a flipped bit in the newest one (or a hand-edited
    state.json of the wrong types) is said in one line, the previous one is resumed, and the
    run ends with the weights of an uninterrupted run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    extra = ("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    assert run_cli(*_train_args(corpus, cache_dir, whole, *extra)).returncode == 0
    assert (
        run_cli(*_train_args(corpus, cache_dir, cut, *extra), "--stop-after", "4").returncode == 0
    )
    newest = cut / "checkpoints" / "step-0000004"
    if damage == "flipped-bit":
        _flip_a_byte(newest / "model.safetensors")
    else:
        state = json.loads((newest / "state.json").read_text())
        (newest / "state.json").write_text(json.dumps({**state, "step": "four"}))
        (newest / "manifest.json").unlink()  # as if hand-edited in a checkpoint without sums
    resumed = run_cli("train", "--out", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-0000004 is corrupt" in resumed.stdout and "step-0000002" in resumed.stdout
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_a_damaged_only_checkpoint_is_one_line(corpus: Path, cache_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = _train_args(corpus, cache_dir, out, "train.steps=4", "train.checkpoint_every=2")
    assert run_cli(*args, "--stop-after", "2").returncode == 0
    _flip_a_byte(out / "checkpoints" / "step-0000002" / "trainer_state.pt")
    _refused(["train", "--resume"], out, "do not match their checksums")


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    corpus: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import errno

    import distillery.engine.checkpoints as checkpoints
    from distillery.engine.checkpoints import list_checkpoints, read_state
    from distillery.recipes.run import run
    from tests.conftest import tiny_run

    real_save, calls = checkpoints.torch.save, []

    def save(obj, path):  # the second checkpoint finds the disk full
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    cfg = tiny_run(corpus, cache_dir, tmp_path / "r", steps=6, checkpoint_every=2)
    with pytest.raises(DistilleryError, match="No space left on device") as err:
        run(cfg)
    assert "\n" not in str(err.value) and "earlier checkpoints are intact" in str(err.value)
    found = list_checkpoints(tmp_path / "r")
    assert [p.name for p in found] == ["step-0000002"]
    read_state(found[0], ["model"])  # its checksums hold
    assert not list((tmp_path / "r" / "checkpoints").glob(".tmp-*"))


def test_sigint_mid_run_leaves_a_usable_checkpoint_and_one_line(
    corpus: Path, cache_dir: Path, tmp_path: Path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = _train_args(corpus, cache_dir, out, "train.steps=4000", "train.checkpoint_every=2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillery", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_default_sigint,
    )  # fmt: skip

    def checkpointed() -> bool:  # any finished checkpoint at step 4 or later (older ones go)
        steps = [p.name.removeprefix("step-") for p in (out / "checkpoints").glob("step-*")]
        return any(s.isdigit() and int(s) >= 4 for s in steps)

    deadline = time.time() + 120
    while time.time() < deadline and not checkpointed() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("distillery: interrupted; `--resume`")
    newest = int(sorted((out / "checkpoints").glob("step-*"))[-1].name.removeprefix("step-"))
    end = newest + 2  # finish soon after the checkpoint the interruption left
    resumed = run_cli("train", "--out", str(out), "--resume", f"train.steps={end}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == end


def test_logs_no_run_wrote_are_not_replaced_without_overwrite(tmp_path: Path):
    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events").write_text("someone else's")
    (out / "metrics.jsonl").write_text("{}\n")
    _refused(["train", "train.steps=1"], out, "that no distillery run wrote there")


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_at_a_random_step_then_resume_is_bit_identical(
    seed: int, corpus: Path, cache_dir: Path, tmp_path: Path
):
    """SIGKILL a real run at a step drawn at random (anywhere, not only at a checkpoint), then
    ``--resume``: the final weights equal an uninterrupted run's, bit for bit."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    steps = 24
    extra = (f"train.steps={steps}", "train.checkpoint_every=3")
    whole = tmp_path / "whole"
    assert run_cli(*_train_args(corpus, cache_dir, whole, *extra)).returncode == 0
    out = tmp_path / "killed"
    args = _train_args(corpus, cache_dir, out, *extra)
    target = random.Random(seed).randrange(4, steps - 2)  # killed after this step was logged
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillery", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and f'"step": {target},' in metrics.read_text():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    resumed = run_cli("train", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
