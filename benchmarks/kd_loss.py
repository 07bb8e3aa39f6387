"""Peak memory, time and error of one distillation loss forward+backward: chunked vs naive.

    python benchmarks/kd_loss.py [--positions 1024] [--vocabs 32768 131072 262144]

For each vocabulary the same inputs (student hidden states and output projection, teacher
hidden states and projection) go through
  naive          both models' full fp32 logits, log-softmax, KL summed (what a plain loop does);
  chunked fp32   ``distillery.objectives.chunked.chunked_loss`` (``forward_kl`` at T=2), fp32;
  chunked bf16   the same with bf16 matmuls (``train.logit_matmul=bf16``) and the teacher's
                 head and hidden states in bf16 (the lean teacher, ``teacher.precision=bf16``);
  bf16 compiled  and the objectives' passes over each chunk fused by ``torch.compile``
                 (``train.compile_loss=true``; compiled in the untimed warm-up round);
  liger          Liger-Kernel's fused linear JSD at β=0 (forward KL), only where it is installed
                 and a GPU is present.
Peak memory: each arm's first pass in a fresh process (CPU: max RSS growth; GPU:
``max_memory_allocated``). Time: one process runs the arms round-robin ``--repeats`` times and
keeps each arm's fastest pass, so machine noise hits every arm alike. Error: on the first
``--error-positions`` positions, the loss and both gradients against a float64 reference.
Chunks hold ``--chunk-positions`` positions (0: from the memory budget ``models.heads.
chunk_rows``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ARMS = ("naive", "chunked fp32", "chunked bf16", "bf16 compiled", "liger")
T = 2.0


def naive_kd(s_hidden, s_head, t_hidden, t_head, mask) -> torch.Tensor:
    """The full-logits reference: what a straightforward implementation does."""
    student_logits = s_head(s_hidden).float()  # (N, V)
    with torch.no_grad():
        teacher_logits = t_head(t_hidden).float()  # (N, V)
    s_logp = F.log_softmax(student_logits / T, dim=-1)
    t_logp = F.log_softmax(teacher_logits / T, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() * T**2


def inputs(vocab: int, positions: int, hidden: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    s_head = nn.Linear(hidden, vocab, bias=False).to(device)
    t_head = nn.Linear(2 * hidden, vocab, bias=False).to(device).requires_grad_(False)
    return {
        "s_head": s_head,
        "t_head": t_head,
        "t_head_bf16": nn.Linear(2 * hidden, vocab, bias=False).to(device, torch.bfloat16),
        "s_hidden": torch.randn(positions, hidden, device=device, requires_grad=True),
        "t_hidden": torch.randn(positions, 2 * hidden, device=device),
        "labels": torch.randint(0, vocab, (positions,), device=device),
        "mask": torch.ones(positions, dtype=torch.bool, device=device),
    }


def loss_fn(arm: str, x: dict, chunk: int) -> Callable[[], torch.Tensor]:
    """The arm's loss on ``x`` as a closure (forward only; the caller calls backward)."""
    from distillery.objectives import get_objective
    from distillery.objectives.chunked import chunked_loss

    kl = get_objective("forward_kl")
    x["t_head_bf16"].weight.data.copy_(x["t_head"].weight)  # the same teacher, rounded
    if arm == "naive":
        return lambda: naive_kd(x["s_hidden"], x["s_head"], x["t_hidden"], x["t_head"], x["mask"])
    if arm == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSDLoss  # type: ignore

        fused = LigerFusedLinearJSDLoss(jsd_beta=0.0, temperature=T)
        return lambda: (
            fused(x["s_hidden"], x["s_head"].weight, x["t_hidden"], x["t_head"].weight)
            * T**2
            * x["mask"].sum()
        )
    bf16 = arm in ("chunked bf16", "bf16 compiled")
    t_head = x["t_head_bf16"] if bf16 else x["t_head"]
    t_hidden = x["t_hidden"].to(torch.bfloat16) if bf16 else x["t_hidden"]
    size = chunk or _budget_rows(x["s_head"].weight.shape[0])

    def run() -> torch.Tensor:
        total, _ = chunked_loss(
            lambda sig: kl(sig, temperature=T)[None],
            torch.ones(1, device=x["mask"].device),
            x["s_hidden"],
            x["s_head"],
            x["labels"],
            x["mask"],
            chunk_size=size,
            teacher_logits=lambda part, _student: t_head(t_hidden[part]),
            matmul_dtype=torch.bfloat16 if bf16 else None,
            compile=arm == "bf16 compiled",
        )
        return total

    return run


def _budget_rows(vocab: int) -> int:
    from distillery.models.heads import chunk_rows

    return chunk_rows(vocab)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(arm: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    """Extra peak memory (MiB) of the arm's first forward+backward in this fresh process."""
    import resource

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = inputs(vocab, args.positions, args.hidden, device)
    run = loss_fn(arm, x, args.chunk_positions)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = run()
    value.backward()
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mib": max(peak - base, 0) / 2**20, "loss": value.item()}


def timings(arms: list[str], args: argparse.Namespace, vocab: int) -> dict[str, dict]:
    """Each arm's fastest forward+backward (ms), the arms interleaved round-robin, and its first
    (warm-up: compilation included)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = inputs(vocab, args.positions, args.hidden, device)
    runs = {arm: loss_fn(arm, x, args.chunk_positions) for arm in arms}
    best, first = {arm: float("inf") for arm in arms}, {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for arm in arms:
            x["s_hidden"].grad = x["s_head"].weight.grad = None
            _sync(device)
            start = time.perf_counter()
            runs[arm]().backward()
            _sync(device)
            ms = (time.perf_counter() - start) * 1000
            if round_:
                best[arm] = min(best[arm], ms)
            else:
                first[arm] = ms
    return {"best": best, "first": first}


def errors(arms: list[str], args: argparse.Namespace, vocab: int) -> dict[str, dict[str, float]]:
    """Relative error (‖x − ref‖ / ‖ref‖) of the loss and the gradients of the student's hidden
    states and head, against float64, on ``--error-positions`` positions."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = inputs(vocab, args.error_positions, args.hidden, device)
    ref = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in x.items()
    }
    s_hidden = ref["s_hidden"].detach().requires_grad_(True)
    w = x["s_head"].weight.detach().double().requires_grad_(True)
    s_logp = F.log_softmax(s_hidden @ w.t() / T, dim=-1)
    t_logp = F.log_softmax(ref["t_hidden"] @ x["t_head"].weight.double().t() / T, dim=-1)
    value = (t_logp.exp() * (t_logp - s_logp)).sum() * T**2
    value.backward()
    truth = {"loss": value.detach(), "grad_hidden": s_hidden.grad, "grad_head": w.grad}
    out = {}
    for arm in arms:
        x["s_hidden"].grad = x["s_head"].weight.grad = None
        loss = loss_fn(arm, x, args.chunk_positions)()
        loss.backward()
        got = {
            "loss": loss.detach(),
            "grad_hidden": x["s_hidden"].grad,
            "grad_head": x["s_head"].weight.grad,
        }
        out[arm] = {
            f"err_{k}": float((got[k].double() - truth[k]).norm() / truth[k].norm()) for k in truth
        }
    return out


def _child(args: argparse.Namespace, what: str, vocab: int, arms: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", what, str(vocab), *[f"--arm={a}" for a in arms]]
    cmd += [f"--positions={args.positions}", f"--hidden={args.hidden}"]
    cmd += [f"--chunk-positions={args.chunk_positions}", f"--repeats={args.repeats}"]
    cmd += [f"--error-positions={args.error_positions}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _available_arms() -> list[str]:
    arms = list(ARMS[:4])
    try:
        import liger_kernel  # type: ignore  # noqa: F401

        if torch.cuda.is_available():
            arms.append("liger")
    except ImportError:
        pass
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-positions", type=int, default=0, help="0: from the budget")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (fastest kept)")
    parser.add_argument("--error-positions", type=int, default=64)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--arm", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled arm")
    args = parser.parse_args()
    if args.child:
        what, vocab = args.child[0], int(args.child[1])
        fns = {
            "memory": lambda: peak_memory(args.arm[0], args, vocab),
            "time": lambda: timings(args.arm, args, vocab),
            "error": lambda: errors(args.arm, args, vocab),
        }
        print(json.dumps(fns[what]()))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()
    arms = [a for a in _available_arms() if not (args.no_compile and a == "bf16 compiled")]
    print(
        f"device: {device}, {torch.get_num_threads()} threads; {args.positions} positions, "
        f"hidden {args.hidden}, one forward+backward of T²·KL at T=2; chunks of "
        f"{args.chunk_positions or 'budget'} positions; time: fastest of {args.repeats} "
        f"interleaved rounds; error: relative to float64 on {args.error_positions} positions"
    )
    print(
        f"{'vocab':>7} {'arm':<13} {'MiB':>7} {'mem×naive':>9} {'ms':>8} {'speed-up':>8} "
        f"{'err loss':>9} {'err ∇h':>8} {'err ∇W':>8}"
    )
    rows = []
    for vocab in args.vocabs:
        memory = {arm: _child(args, "memory", vocab, [arm]) for arm in arms}
        timed = _child(args, "time", vocab, arms)
        ms = timed["best"]
        err = _child(args, "error", vocab, arms)
        base = memory["naive"]
        for arm in arms:
            assert abs(memory[arm]["loss"] - base["loss"]) <= 2e-2 * abs(base["loss"]), arm
            row = {"vocab": vocab, "arm": arm, **memory[arm], "ms": ms[arm], **err[arm]}
            row["first_ms"] = timed["first"][arm]
            row["mem_ratio"] = memory[arm]["peak_mib"] / max(base["peak_mib"], 1e-9)
            row["speedup"] = ms["naive"] / ms[arm]
            rows.append(row)
            print(
                f"{vocab:>7} {arm:<13} {row['peak_mib']:>7,.0f} {row['mem_ratio']:>9.3f} "
                f"{row['ms']:>8,.0f} {row['speedup']:>7.2f}× {row['err_loss']:>9.1e} "
                f"{row['err_grad_hidden']:>8.1e} {row['err_grad_head']:>8.1e}"
            )
    result = {
        "device": device,
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "rows": rows,
    }
    print(json.dumps(result))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
