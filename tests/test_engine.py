"""The engine: exact resume, accumulation and data-parallel equivalence, checkpoints, export."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.config import ModelSpec, TrainConfig
from distillery.engine import lr_factor
from distillery.errors import DistilleryError, Diverged
from distillery.models import compute_params, load_pretrained
from distillery.recipes.run import run
from distillery.recipes.tuning import Tuning, choose, grid_table, tuned
from tests.conftest import tiny_run

# `distillery` under torchrun with two local processes.
TORCHRUN_2 = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
    "distillery",
]


def run_one_and_two_processes(command: str, args: list[str], tmp_path: Path) -> None:
    """``distillery COMMAND ARGS`` alone into tmp_path/one and under torchrun ×2 into /two."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "distillery", command, f"--out={tmp_path / 'one'}", *args]
    dual = [*TORCHRUN_2, command, f"--out={tmp_path / 'two'}", *args]
    for cmd in (single, dual):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_interrupted_run_resumes_bit_identically(corpus, cache_dir, tmp_path):
    full = tiny_run(corpus, cache_dir, tmp_path / "full", steps=8, checkpoint_every=3)
    run(full)
    cut = tiny_run(corpus, cache_dir, tmp_path / "cut", steps=8, checkpoint_every=3)
    partial = run(cut, stop_after=5)  # "dies" after step 5; the last checkpoint is step 3
    assert partial == {"step": 5, "finished": False}
    assert not (tmp_path / "cut" / "model").exists()
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-0000003"]
    summary = run(cut, resume=True)
    assert summary["finished"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The metrics log of the resumed run has each step once, like the uninterrupted one.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 9))


def test_corrupt_checkpoint_is_refused_with_one_line(corpus, cache_dir, tmp_path):
    cfg = tiny_run(corpus, cache_dir, tmp_path / "r", steps=4, checkpoint_every=2)
    run(cfg, stop_after=2)
    ckpt = tmp_path / "r" / "checkpoints" / "step-0000002"
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DistilleryError, match="corrupt"):
        run(cfg, resume=True)


def test_resume_without_checkpoint_and_reusing_out_are_errors(corpus, cache_dir, tmp_path):
    cfg = tiny_run(corpus, cache_dir, tmp_path / "r", steps=2)
    with pytest.raises(DistilleryError, match="no checkpoint"):
        run(cfg, resume=True)
    run(cfg, overwrite=True)
    with pytest.raises(DistilleryError, match="already holds a run"):
        run(cfg)


def test_micro_batches_match_one_big_batch(corpus, cache_dir, tmp_path):
    run(tiny_run(corpus, cache_dir, tmp_path / "big", steps=3))
    run(tiny_run(corpus, cache_dir, tmp_path / "micro", steps=3, micro_batch_size=1))
    a, b = weights(tmp_path / "big"), weights(tmp_path / "micro")
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-5


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_schedule_slices_follow_the_whole_schedule():
    whole = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    expected = [lr_factor(s, whole) for s in range(100)]
    first = TrainConfig(steps=30, warmup_steps=10, schedule_slice=(0.0, 0.3))
    rest = TrainConfig(steps=70, warmup_steps=10, schedule_slice=(0.3, 1.0))
    pieced = [lr_factor(s, first) for s in range(30)] + [lr_factor(s, rest) for s in range(70)]
    assert pieced == pytest.approx(expected)
    # cheaper steps (twice as many for the share): the same decay, no second warmup
    fine = [lr_factor(s, TrainConfig(steps=140, warmup_steps=0, schedule_slice=(0.3, 1.0)))
            for s in range(140)]  # fmt: skip
    coarse = [lr_factor(s, TrainConfig(steps=70, warmup_steps=0, schedule_slice=(0.3, 1.0)))
              for s in range(70)]  # fmt: skip
    assert fine[::2] == pytest.approx(coarse)
    assert all(x >= y for x, y in itertools.pairwise(fine)) and fine[0] < 1.0
    with pytest.raises(ValueError, match="start < end"):
        TrainConfig(schedule_slice=(0.5, 0.5))


def test_distill_run_records_teacher_flops_and_agreement(corpus, cache_dir, tmp_path, teacher_dir):
    cfg = tiny_run(corpus, cache_dir, tmp_path / "d", teacher=teacher_dir, steps=4)
    cfg.objectives = [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}]
    cfg.model.overrides = {"num_hidden_layers": 2}
    cfg.model.init_from_teacher = "every_other"
    cfg = type(cfg).model_validate(cfg.model_dump())
    summary = run(cfg, name="distill")
    n_student, n_teacher = summary["compute_params"], 0
    from distillery.models import compute_params, load_pretrained

    n_teacher = compute_params(load_pretrained(teacher_dir))
    tokens = 4 * 4 * 32
    assert summary["flops"] == pytest.approx((6 * n_student + 2 * n_teacher) * tokens)
    assert 0.0 <= summary["agreement"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "forward_kl", "loss", "tokens_per_s", "flops"} <= set(records[0])
    assert any("val_loss" in r for r in records)  # the end-of-run evaluation is logged
    assert list((tmp_path / "d" / "tensorboard").glob("events.out.tfevents.*"))


def test_representation_distill_resumes_exactly_with_its_projection(
    corpus, cache_dir, tmp_path, teacher_dir
):
    """A narrower student (projection learned) with hidden and attention terms: checkpoints
    carry the projection, resume is bit-identical, the export is the plain student."""

    def cfg_for(out: Path):
        cfg = tiny_run(
            corpus, cache_dir, out, teacher=teacher_dir, steps=6, checkpoint_every=3
        ).model_dump()
        cfg["model"]["overrides"] = {"num_hidden_layers": 2, "hidden_size": 32}
        cfg["objectives"] = [
            {"kind": "ce"},
            {"kind": "hidden_mse", "layers": "uniform"},
            {"kind": "attention_kl", "layers": "last", "weight": 0.5},
        ]
        return type(tiny_run(corpus, cache_dir, out)).model_validate(cfg)

    run(cfg_for(tmp_path / "full"))
    cut = cfg_for(tmp_path / "cut")
    run(cut, stop_after=4)
    saved = load_file(
        str(tmp_path / "cut" / "checkpoints" / "step-0000003" / "objectives.safetensors")
    )
    assert list(saved) == ["hidden_mse.weight"] and saved["hidden_mse.weight"].shape == (64, 32)
    run(cut, resume=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and not any("hidden_mse" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    record = json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["hidden_mse"] > 0 and record["attention_kl"] > 0
    config = json.loads((tmp_path / "cut" / "model" / "config.json").read_text())
    assert config["hidden_size"] == 32

    # Resuming with a mix that has no projection (or another one) is refused in one line.
    changed = cfg_for(tmp_path / "cut")
    changed.objectives = changed.objectives[:1]
    changed.train.steps = 9
    with pytest.raises(DistilleryError, match="objective projections"):
        run(changed, resume=True)


def test_exported_student_loads_and_generates_with_plain_transformers(teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    ids = tokenizer("The minister said", return_tensors="pt").input_ids
    out = model.generate(
        ids,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out.shape[1] == ids.shape[1] + 12
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("The minister said")
    names = {p.name for p in teacher_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over torchrun")
def test_two_gloo_processes_match_one_process_with_a_learned_projection(
    corpus, cache_dir, tmp_path, teacher_dir
):
    """The objectives' projection is outside DDP: its gradients must be averaged too. A
    representation-only mix on an early layer leaves later blocks unused, which DDP must allow."""
    common = [
        f"--data={corpus}",
        f"--teacher={teacher_dir}",
        "model.preset=tiny",
        "model.overrides={num_hidden_layers: 2, hidden_size: 32}",
        "objectives=[{kind: hidden_mse, layers: [[1, 2]]}]",
        "data.seq_len=32",
        f"data.cache_dir={cache_dir}",
        "train.steps=3",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.tensorboard=false",
    ]
    run_one_and_two_processes("distill", common, tmp_path)
    for name in ("model.safetensors", "objectives.safetensors"):
        a, b = (
            load_file(str(tmp_path / run_dir / "checkpoints" / "step-0000003" / name))
            for run_dir in ("one", "two")
        )
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    # The training records only (a loaded machine can interleave evaluation records apart).
    norms = [
        [
            r["grad_norm"]
            for r in map(json.loads, (tmp_path / d / "metrics.jsonl").open())
            if "loss" in r
        ]
        for d in ("one", "two")
    ]
    assert norms[0] and norms[0] == pytest.approx(norms[1], rel=1e-4)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over torchrun")
def test_two_gloo_processes_match_one_process(corpus, cache_dir, tmp_path):
    """torchrun with 2 processes (gloo) ≈ 1 process with the same global batch."""
    common = [
        f"--data={corpus}",
        "model.preset=tiny",
        "data.seq_len=32",
        "data.vocab_size=512",
        f"data.cache_dir={cache_dir}",
        "train.steps=3",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.tensorboard=false",
    ]
    run_one_and_two_processes("train", common, tmp_path)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-5
    shutil.rmtree(tmp_path / "two")


def test_killed_process_resumes_to_the_same_weights(corpus, cache_dir, tmp_path):
    """SIGKILL a real `distillery train` after a checkpoint, `--resume`, compare weights."""
    import signal
    import time

    steps = 200
    args = [
        f"--data={corpus}",
        "model.preset=tiny",
        "data.seq_len=32",
        "data.vocab_size=512",
        f"data.cache_dir={cache_dir}",
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.checkpoint_every=10",
        "train.tensorboard=false",
    ]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distillery", "train", f"--out={out}", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-0000020").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "model").exists()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = tiny_run(corpus, cache_dir, tmp_path / "ref", steps=steps, batch_size=8)
    ref.train.log_every, ref.train.eval_batches, ref.train.warmup_steps = 10, 20, 20
    ref.train.lr = 1e-3
    run(ref)
    a, b = weights(tmp_path / "ref"), weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_divergence_stops_with_one_line_and_keeps_checkpoints(corpus, cache_dir, tmp_path):
    cfg = tiny_run(corpus, cache_dir, tmp_path / "nan", steps=6, lr=1e6, warmup_steps=0)
    cfg.train.grad_clip = None
    with pytest.raises(DistilleryError, match="not finite"):
        run(cfg)
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_a_diverged_grid_point_is_left_out_of_the_choice_and_not_retrained(
    corpus, cache_dir, tmp_path, capsys
):
    base = tiny_run(corpus, cache_dir, tmp_path / "unused", steps=6)
    base.train.grad_clip = None

    def build(train: TrainConfig, out: Path):
        return base.model_copy(update={"train": train, "out": out})

    grid = Tuning(lrs=[1e-3, 3e-3, 1e6], warmups=[0, 1], seed=7)
    chosen, record = tuned(grid, base.train, build, tmp_path / "tune", "arm", reuse=True)
    losses = {(g["lr"], g["warmup_steps"]): g["val_loss"] for g in record["grid"]}
    assert [p for p, v in losses.items() if v is None] == [(1e6, 0), (1e6, 1)]
    best = min((v, p) for p, v in losses.items() if v is not None)[1]
    assert (chosen.lr, chosen.warmup_steps) == (record["lr"], record["warmup_steps"]) == best
    assert (tmp_path / "tune" / "lr-1e+06-warmup-0" / "diverged.txt").is_file()
    assert "diverged" in grid_table({"arm": record}, "validation loss")[-1]
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "tune").rglob("config.yaml")}
    capsys.readouterr()
    assert tuned(grid, base.train, build, tmp_path / "tune", "arm", reuse=True)[1] == record
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing trained again
    assert capsys.readouterr().out.count("diverged before") == 2

    folder = tmp_path / "tune" / "lr-1e+06-warmup-0"  # the folder trained anew: the mark goes
    run(build(base.train.model_copy(update={"lr": 1e-3}), folder), overwrite=True)
    assert not (folder / "diverged.txt").exists() and (folder / "summary.json").is_file()

    def never(lr: float, warmup: int) -> float:
        raise Diverged("not finite")

    def broken(lr: float, warmup: int) -> float:
        raise DistilleryError("no teacher")

    with pytest.raises(DistilleryError, match="every grid point diverged"):
        choose(grid, never)
    with pytest.raises(DistilleryError, match="no teacher"):  # only divergence is skipped
        choose(grid, broken)


def test_resume_refuses_a_changed_config_and_logs_each_step_once(corpus, cache_dir, tmp_path):
    cfg = tiny_run(corpus, cache_dir, tmp_path / "r", steps=6, checkpoint_every=4)
    run(cfg, stop_after=4)
    changed = tiny_run(corpus, cache_dir, tmp_path / "r", steps=6, batch_size=8)
    with pytest.raises(DistilleryError, match=r"train\.batch_size 4 → 8"):
        run(changed, resume=True)
    run(cfg, resume=True)
    run(cfg, resume=True)  # resuming a finished run adds nothing
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [6]
    shorter = tiny_run(corpus, cache_dir, tmp_path / "r", steps=3)
    with pytest.raises(DistilleryError, match=r"past train\.steps"):
        run(shorter, resume=True)


def test_logged_lr_is_the_rate_each_step_used(corpus, cache_dir, tmp_path):
    cfg = tiny_run(corpus, cache_dir, tmp_path / "lr", steps=5, warmup_steps=3, lr=1e-3)
    run(cfg)
    records = [json.loads(x) for x in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in records if "lr" in r]
    assert logged == pytest.approx([1e-3 * lr_factor(s, cfg.train) for s in range(5)])


def test_a_failure_on_rank_0_stops_every_rank_with_one_line(tmp_path):
    cmd = [
        *TORCHRUN_2,
        "train",
        f"--data={tmp_path / 'absent.jsonl'}",
        f"--out={tmp_path / 'o'}",
        "model.preset=tiny",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    # Both ranks write to one stderr at once, so their lines may run together: count messages.
    assert proc.stderr.count("distillery: error: ") == 2, proc.stderr[-3000:]
    assert "not found" in proc.stderr
    assert "rank 1: stopping because rank 0 failed" in proc.stderr
    assert "Connection reset" not in proc.stderr


def test_compute_params_matches_a_hand_count():
    """N of the FLOPs meter for a known Llama: per block q,k,v,o (4·h²), gate/up/down (3·h·i)
    and two norms (2·h); the final norm (h); the tied output head (V·h) counted, the input
    embedding lookup not."""
    from tests.conftest import tiny_llama

    h, layers, vocab = 32, 3, 101
    model = tiny_llama(vocab, hidden=h, layers=layers)
    i = model.config.intermediate_size
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = layers * (4 * h * h + 3 * h * i + 2 * h) + h + vocab * h
    assert compute_params(model) == expected


def test_data_offset_continues_the_same_data_stream(corpus, cache_dir, tmp_path):
    """With a negligible learning rate the weights stay put, so each step's logged loss is a
    function of its batch: an offset of 2 sees batches 2 and 3 of the seed's order."""

    def losses(out, **train):
        run(tiny_run(corpus, cache_dir, tmp_path / out, lr=1e-12, checkpoint_every=0, **train))
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]

    whole = losses("whole", steps=4)
    later = losses("later", steps=2, data_offset=2)
    assert later == pytest.approx(whole[2:], abs=1e-5)
    assert later != pytest.approx(whole[:2], abs=1e-3)


def test_a_grown_student_trains_and_exports_deeper(corpus, cache_dir, tmp_path, teacher_dir):
    """``model.grow``: a 4-layer folder grown by 2 identity layers on top trains as 6 layers."""
    cfg = tiny_run(corpus, cache_dir, tmp_path / "grown", steps=2, checkpoint_every=0)
    cfg.model = ModelSpec(path=teacher_dir, preset=None, grow={"kind": "top", "layers": 2})
    summary = run(cfg)
    assert summary["layers"] == 6
    assert summary["compute_params"] > compute_params(load_pretrained(teacher_dir))
