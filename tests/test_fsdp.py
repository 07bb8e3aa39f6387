"""``train.parallel: fsdp``: FSDP2 shards under torchrun (two gloo processes) train like DDP and
like one process, resume exactly, export a plain model, and a sharded teacher teaches the same.

One torchrun launch runs every sharded scenario in turn (this file is its worker), since
starting two processes costs more than the tiny runs themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from distillery.config import RunConfig
from distillery.errors import DistilleryError


def _config(corpus: Path, cache_dir: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """A tiny run (accumulating over micro-batches of one sequence), logging every step."""
    train = dict(steps=4, batch_size=4, micro_batch_size=1, lr=3e-3, warmup_steps=1)
    train |= dict(log_every=1, eval_every=2, eval_batches=2, checkpoint_every=2, tensorboard=False)
    train |= kw.pop("train", {})
    data = {"source": str(corpus), "seq_len": 32, "vocab_size": 512, "cache_dir": str(cache_dir)}
    return {"data": data, "model": {"preset": "tiny"}, "train": train, "out": str(out), **kw}


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    """Each training step's ``key`` from the metrics log."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)[key] for x in lines if "loss" in json.loads(x)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over torchrun")
def test_fsdp_two_processes(corpus, cache_dir, teacher_dir, tmp_path):
    from distillery.recipes.run import run

    fsdp = {"parallel": "fsdp"}
    distill = dict(
        teacher=str(teacher_dir),
        objectives=[{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}],
    )
    chunked = {**fsdp, "logit_chunk_size": 16}
    jobs = [
        {"name": "ddp", "config": _config(corpus, cache_dir, tmp_path / "ddp")},
        {"name": "fsdp", "config": _config(corpus, cache_dir, tmp_path / "fsdp", train=fsdp)},
        {"name": "cut", "config": _config(corpus, cache_dir, tmp_path / "cut", train=fsdp)},
        {"name": "whole-teacher", "config": _config(
            corpus, cache_dir, tmp_path / "whole-teacher", train=chunked, **distill)},
        {"name": "sharded-teacher", "shard_teacher": True, "config": _config(
            corpus, cache_dir, tmp_path / "sharded-teacher", train=chunked, **distill)},
    ]  # fmt: skip
    jobs[2]["stop_after"] = 3  # "dies" after step 3; its last checkpoint is step 2
    jobs.insert(3, {**jobs[2], "stop_after": None, "resume": True})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, __file__, str(tmp_path / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run(RunConfig.model_validate(_config(corpus, cache_dir, tmp_path / "one")))

    # The same loss curve as DDP and as one process (same global batch and data order).
    one, ddp, sharded = (_losses(tmp_path / d) for d in ("one", "ddp", "fsdp"))
    assert len(sharded) == 4 and sharded[-1] < sharded[0]
    assert sharded == pytest.approx(ddp, rel=1e-5) and sharded == pytest.approx(one, rel=1e-5)
    norms = [_losses(tmp_path / d, "grad_norm") for d in ("one", "fsdp")]  # clipped at 1.0
    assert min(norms[0]) > 1.0 and norms[1] == pytest.approx(norms[0], rel=1e-4)
    # The evaluation at step 2 ran on the sharded model, every rank at once.
    evals = [
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").open() if "val_loss" in x]
        for d in ("one", "fsdp")
    ]
    assert evals[1][0]["step"] == 2 and not evals[1][0].get("final")
    assert evals[1][0]["val_loss"] == pytest.approx(evals[0][0]["val_loss"], rel=1e-5)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    exported = _weights(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert _max_diff(exported, _weights(tmp_path / "one" / "model" / "model.safetensors")) < 1e-5
    # Resumed from step 2 of the same world size: the uninterrupted run's weights.
    ckpt = "checkpoints/step-0000004/model.safetensors"
    assert _max_diff(_weights(tmp_path / "cut" / ckpt), _weights(tmp_path / "fsdp" / ckpt)) == 0
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "fsdp")

    # The export is a whole model that plain transformers loads, equal to the sharded weights.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    for name, value in model.state_dict().items():
        if name in exported:
            assert torch.equal(value, exported[name]), name
    ids = torch.arange(8)[None]
    assert torch.isfinite(model(input_ids=ids).logits).all()

    # A sharded teacher (checked by the worker) teaches what the whole one does.
    marker = json.loads((tmp_path / "sharded-teacher" / "teacher-sharded.json").read_text())
    assert marker == {"training": True, "final_evaluation": False}
    control = json.loads((tmp_path / "whole-teacher" / "teacher-sharded.json").read_text())
    assert control == {"training": False, "final_evaluation": False}
    whole, split = (_losses(tmp_path / d) for d in ("whole-teacher", "sharded-teacher"))
    assert len(split) == 4 and split == pytest.approx(whole, rel=1e-5)
    metrics = [
        json.loads((tmp_path / d / "summary.json").read_text())["kl_teacher_student"]
        for d in ("whole-teacher", "sharded-teacher")
    ]
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-5)


@pytest.mark.parametrize(
    ("train", "extra", "message"),
    [
        ({"parallel": "fsdp", "compile": True}, {}, "compile"),
        ({"parallel": "fsdp"}, {"objectives": [{"kind": "ce"}, {"kind": "iit"}]}, "iit"),
    ],
)
def test_fsdp_refuses_what_it_cannot_run(tmp_path, train, extra, message):
    cfg = _config(tmp_path, tmp_path, tmp_path / "r", train=train, **extra)
    if "objectives" in extra:
        cfg["teacher"] = str(tmp_path)
    with pytest.raises(ValueError, match=message):
        RunConfig.model_validate(cfg)


def test_shard_plan_is_each_block_then_the_root():
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillery.parallel import shard_plan

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=40,
    )  # fmt: skip
    assert shard_plan(LlamaForCausalLM(config)) == [
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "",
    ]


def _with_teacher_sharding(build_teacher: Any, out: Path, shard: bool) -> Any:
    """``build_teacher`` with ``shard`` forced (the recipe shards under fsdp; the comparison
    run keeps a whole teacher), noting in ``out`` (rank 0) which of its two signals are
    sharded."""
    from distillery.parallel import is_sharded

    def sharded(*args: Any, **kw: Any) -> Any:
        signals = build_teacher(*args, **{**kw, "shard": shard})
        if int(os.environ["RANK"]) == 0:
            models = [getattr(s, "model", None) for s in signals]
            marker = {"training": is_sharded(models[0]), "final_evaluation": is_sharded(models[1])}
            (out / "teacher-sharded.json").write_text(json.dumps(marker))
        return signals

    return sharded


def _worker(jobs_file: str) -> None:
    """Under torchrun: each job of ``jobs_file`` through the ``train``/``distill`` recipe, in
    one process group (joined once: a group made again in the same process may hang)."""
    import torch.distributed as dist

    import distillery.recipes.run as recipe
    from distillery.teachers.factory import build_teacher

    dist.init_process_group("gloo")
    recipe.shutdown_distributed = lambda clean=True: dist.barrier()  # type: ignore[attr-defined]
    for job in json.loads(Path(jobs_file).read_text()):
        cfg = RunConfig.model_validate(job["config"])
        wrapped = _with_teacher_sharding(
            build_teacher, Path(cfg.out), job.get("shard_teacher", False)
        )
        recipe.build_teacher = wrapped  # type: ignore[attr-defined]
        try:
            recipe.run(cfg, resume=job.get("resume", False), stop_after=job.get("stop_after"))
        except DistilleryError as exc:
            raise SystemExit(f"{job['name']}: {exc}") from None
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
