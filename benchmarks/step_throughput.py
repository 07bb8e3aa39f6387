"""Training vs distillation step throughput, measured side by side in one run.

    python benchmarks/step_throughput.py [--teacher mini] [--student-layers 2] [--steps 10]
    python benchmarks/step_throughput.py --teacher small --student-layers 1 --cache-articles 300

Builds a teacher and a smaller student from a preset (random weights: speed does not depend
on what they learnt), then times optimizer steps of (a) the teacher trained alone, (b) the
student trained alone, (c) the student distilled from the frozen teacher (CE + forward KL),
each through the real engine, interleaved round-robin so machine noise hits all arms alike.
With ``--cache-articles N`` the data is the first N BBC articles, the teacher is cached once
(``cache-teacher``: top-k at T=2, timed apart) and arm (d) distils from the cache instead.
Prints tokens/s and ratios to arm (b). Absolute numbers are only meaningful on the named device.
"""

from __future__ import annotations

import argparse
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
from distillery.models import build_model, compute_params
from distillery.recipes.common import export_model, prepare_data
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from distillery.teachers.cache import CachedTeacher, build_teacher_cache, cache_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="mini")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--cache-articles", type=int, default=0, help="add the cached arm")
    parser.add_argument("--top-k", type=int, default=32)
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
    student = build_model(args.teacher, len(tokenizer), {"num_hidden_layers": args.student_layers})
    scratch = build_model(args.teacher, len(tokenizer), {"num_hidden_layers": args.student_layers})
    frozen = build_model(args.teacher, len(tokenizer)).to(device)
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

    def engine(model: torch.nn.Module, loss: DistillStep, folder: str) -> Engine:
        per_token = 6.0 * compute_params(model) + loss.teacher_flops_per_token()
        return Engine(
            model, loss, train, cfg, tmp / folder, device=device, flops_per_token=per_token
        )

    arms = {
        "teacher train": engine(teacher, DistillStep(ce), "a"),
        "student train": engine(scratch, DistillStep(ce), "b"),
        "student distill": engine(student, DistillStep(kd, live), "c"),
    }
    cache_note = ""
    if args.cache_articles:
        teacher_dir = export_model(frozen, tokenizer, tmp / "teacher")
        key = {**cache_key(teacher_dir, tokenizer, train), "top_k": args.top_k, "temperature": 2.0}
        meta = build_teacher_cache(live, train, tmp / "cache", key=key, device=device)
        cached = CachedTeacher(tmp / "cache", train, key)
        twin = build_model(args.teacher, len(tokenizer), {"num_hidden_layers": args.student_layers})
        twin.load_state_dict(student.state_dict())
        arms["student distill (cache)"] = engine(twin, DistillStep(kd, cached), "d")
        cache_note = (
            f"cache: {train.num_blocks} blocks, top-{args.top_k}, built once in "
            f"{meta['seconds']:.1f} s; teacher/student compute params "
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
        f"precision {args.precision}, batch {args.batch_size}x{args.seq_len}, "
        f"vocab {len(tokenizer)}"
    )
    base = tokens / seconds["student train"]
    print(f"{'arm':<24} {'tokens/s':>10} {'vs student train':>17}")
    for name in arms:
        rate = tokens / seconds[name]
        print(f"{name:<24} {rate:>10,.0f} {rate / base:>16.2f}x")
    if cache_note:
        ratio = seconds["student distill"] / seconds["student distill (cache)"]
        print(f"{cache_note}\ndistillation from the cache vs the live teacher: {ratio:.2f}x")


if __name__ == "__main__":
    main()
