"""Training vs distillation step throughput, measured side by side in one run.

    python benchmarks/step_throughput.py [--teacher mini] [--student-layers 2] [--steps 10]
    python benchmarks/step_throughput.py --teacher small --student-layers 1 --cache-articles 300

Builds a teacher and a smaller student from a preset (random weights: speed does not depend
on what they learnt), then times optimizer steps of (a) the teacher trained alone, (b) the
student trained alone, (c) the student distilled from the frozen teacher (CE + forward KL),
each through the real engine, and (e) the frozen teacher's forward alone on the same batches,
interleaved round-robin so machine noise hits all arms alike. The step overhead is
(c) / ((b) + (e)): what a distillation step costs beyond a student step and a teacher forward.
With ``--cache-articles N`` the data is the first N BBC articles, the teacher is cached once
(``cache-teacher``: top-k at T=2, timed apart: build tokens/s and bytes a position) and arm (d)
distils from the cache instead. The teacher runs at ``--teacher-precision`` (bf16 where fast).
Prints tokens/s and ratios to arm (b). Absolute numbers are only meaningful on the named device.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from distillery.config import DataConfig, TrainConfig
from distillery.data import bbc_news_labelled
from distillery.distributed import DistEnv, resolve_device
from distillery.engine import Engine, seed_everything
from distillery.engine.schedule import autocast_context
from distillery.models import build_model, compute_params
from distillery.recipes.common import export_model, prepare_data
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from distillery.teachers.cache import CachedTeacher, build_teacher_cache, cache_key
from distillery.teachers.factory import lean_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="mini")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student", help="a student preset (default: the teacher's, fewer layers)")
    parser.add_argument("--logit-chunk-size", type=int, default=0, help="train.logit_chunk_size")
    parser.add_argument("--compile-loss", action="store_true", help="train.compile_loss")
    parser.add_argument("--logit-matmul", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU (0: not shown)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--cache-articles", type=int, default=0, help="add the cached arm")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--codec", default="compact", choices=["compact", "exact"])
    parser.add_argument(
        "--teacher-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"]
    )
    args = parser.parse_args()

    device = resolve_device("auto")
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    data_cfg = DataConfig(seq_len=args.seq_len, vocab_size=args.vocab_size)
    if args.cache_articles:
        subset = tmp / "articles.jsonl"
        articles = bbc_news_labelled()[: args.cache_articles]
        subset.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in articles))
        data_cfg = data_cfg.model_copy(update={"source": str(subset)})
    tokenizer, train, _ = prepare_data(data_cfg, DistEnv())
    seed_everything(0)
    teacher = build_model(args.teacher, len(tokenizer))
    shape = {} if args.student else {"num_hidden_layers": args.student_layers}
    student = build_model(args.student or args.teacher, len(tokenizer), shape)
    scratch = build_model(args.student or args.teacher, len(tokenizer), shape)
    frozen = build_model(args.teacher, len(tokenizer)).to(device)
    fp32_copy = copy.deepcopy(frozen)  # exported for the cache key before any cast
    frozen = lean_teacher(frozen, args.teacher_precision, device)
    ce = terms_from_config([{"kind": "ce"}])
    kd = terms_from_config([{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}])
    live = LiveTeacher(frozen)
    total = args.steps * args.rounds + 2
    cfg = TrainConfig(
        steps=total,
        batch_size=args.batch_size,
        warmup_steps=1,
        precision=args.precision,
        tensorboard=False,
        log_every=10**6,
    )

    chunked = {
        "chunk_size": args.logit_chunk_size,
        "vocab": len(tokenizer),
        "compile_loss": args.compile_loss,
        "matmul_dtype": torch.bfloat16 if args.logit_matmul == "bf16" else None,
    }

    def engine(model: torch.nn.Module, loss: DistillStep, folder: str) -> Engine:
        per_token = 6.0 * compute_params(model) + loss.teacher_flops_per_token()
        return Engine(
            model, loss, train, cfg, tmp / folder, device=device, flops_per_token=per_token
        )

    arms = {
        "teacher train": engine(teacher, DistillStep(ce, **chunked), "a"),
        "student train": engine(scratch, DistillStep(ce, **chunked), "b"),
        "student distill": engine(student, DistillStep(kd, live, **chunked), "c"),
    }
    arms["teacher forward"] = _TeacherForward(live, arms["student distill"])
    cache_note = ""
    if args.cache_articles:
        teacher_dir = export_model(fp32_copy, tokenizer, tmp / "teacher")
        key = {**cache_key(teacher_dir, tokenizer, train), "top_k": args.top_k, "temperature": 2.0}
        meta = build_teacher_cache(
            live, train, tmp / "cache", key=key, device=device, codec=args.codec
        )
        cached = CachedTeacher(tmp / "cache", train, key)
        twin = build_model(args.student or args.teacher, len(tokenizer), shape)
        twin.load_state_dict(student.state_dict())
        arms["student distill (cache)"] = engine(twin, DistillStep(kd, cached, **chunked), "d")
        cache_note = (
            f"cache: {train.num_blocks} blocks, top-{args.top_k}, {args.codec} codec, "
            f"{meta['bytes_per_position']:.0f} bytes a position (v1 stored {8 * args.top_k + 4}), "
            f"built once in {meta['seconds']:.1f} s "
            f"({train.num_blocks * args.seq_len / meta['seconds']:,.0f} tokens/s); "
            f"teacher/student compute params "
            f"{compute_params(frozen) / compute_params(student):.1f}x"
        )
    seconds = dict.fromkeys(arms, 0.0)
    step = 0
    for arm in arms.values():  # warm-up (allocations, kernels)
        arm.train_step(0)
    for _ in range(args.rounds):
        for name, arm in arms.items():
            start = time.perf_counter()
            for k in range(args.steps):
                arm.train_step(step + 1 + k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
        step += args.steps
    tokens = args.steps * args.rounds * args.batch_size * args.seq_len
    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device: {device} ({where}), threads {torch.get_num_threads()}, "
        f"precision {args.precision}, teacher {args.teacher_precision} "
        f"({next(frozen.parameters()).dtype}), batch {args.batch_size}x{args.seq_len}, "
        f"vocab {len(tokenizer)}"
    )
    base = tokens / seconds["student train"]
    print(f"{'arm':<24} {'tokens/s':>10} {'vs student train':>17}")
    for name in arms:
        rate = tokens / seconds[name]
        print(f"{name:<24} {rate:>10,.0f} {rate / base:>16.2f}x")
    flops = (6.0 * compute_params(student) + 2.0 * compute_params(frozen)) * tokens
    tflops = flops / seconds["student distill"] / 1e12
    mfu = (
        f", MFU {tflops / args.peak_tflops:.1%} of {args.peak_tflops:g}" if args.peak_tflops else ""
    )
    print(f"distill step: {tflops:.2f} TFLOP/s counted as 6·N_s + 2·N_t per token{mfu}")
    parts = seconds["student train"] + seconds["teacher forward"]
    overhead = seconds["student distill"] / parts
    print(f"step overhead: distill step / (student step + teacher forward) = {overhead:.3f}")
    result = {"args": vars(args), "device": str(device), "tokens": tokens, "seconds": seconds}
    result.update(step_overhead=overhead, distill_tflops=tflops)
    if cache_note:
        ratio = seconds["student distill"] / seconds["student distill (cache)"]
        print(f"{cache_note}\ndistillation from the cache vs the live teacher: {ratio:.2f}x")
        result["cache"] = {**meta, "speedup_vs_live": ratio}
    print(json.dumps(result))


class _TeacherForward:
    """The teacher's forward on the batches the distillation arm reads, as its step runs it."""

    def __init__(self, teacher: LiveTeacher, distill: Engine) -> None:
        self.teacher, self.distill = teacher, distill

    def train_step(self, step: int) -> None:
        engine = self.distill
        chunked = bool(engine.step.chunk_size)
        for input_ids, _ in engine._step_batches(step):
            with autocast_context(engine.device, engine.cfg.precision):
                self.teacher.run(input_ids.to(engine.device), logits=not chunked)


if __name__ == "__main__":
    main()
