"""Peak memory and time of one distillation loss forward+backward: chunked vs naive.

    python benchmarks/kd_loss.py [--positions 1024] [--vocabs 32768 131072 262144]

For each vocabulary, the same inputs (student hidden states and output projection, teacher
hidden states and projection) go through (a) a naive implementation — both models' full fp32
logits, log-softmax, KL summed — and (b) ``distillery.objectives.chunked.chunked_loss`` with
``forward_kl`` at T=2. Each measurement runs in a fresh process (CPU peak memory is the
process's max RSS growth; on a GPU, ``max_memory_allocated``). Prints MiB, ms and ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def naive_kd(s_hidden, s_head, t_hidden, t_head, mask, temperature: float) -> torch.Tensor:
    """The full-logits reference: what a straightforward implementation does."""
    student_logits = s_head(s_hidden).float()  # (N, V)
    with torch.no_grad():
        teacher_logits = t_head(t_hidden).float()  # (N, V)
    s_logp = F.log_softmax(student_logits / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() * temperature**2


def measure(
    mode: str, vocab: int, positions: int, hidden: int, chunk: int, repeats: int
) -> dict[str, float]:
    """Forward+backward in this process: peak extra memory (MiB) of the first pass, and the
    fastest of ``repeats`` further passes (ms; the minimum is the least disturbed by noise)."""
    import resource

    from distillery.objectives import get_objective
    from distillery.objectives.chunked import chunked_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    s_head = nn.Linear(hidden, vocab, bias=False).to(device)
    t_head = nn.Linear(2 * hidden, vocab, bias=False).to(device).requires_grad_(False)
    s_hidden = torch.randn(positions, hidden, device=device, requires_grad=True)
    t_hidden = torch.randn(positions, 2 * hidden, device=device)
    labels = torch.randint(0, vocab, (positions,), device=device)
    mask = torch.ones(positions, dtype=torch.bool, device=device)
    kl = get_objective("forward_kl")

    def loss() -> torch.Tensor:
        if mode == "naive":
            return naive_kd(s_hidden, s_head, t_hidden, t_head, mask, 2.0)
        total, _ = chunked_loss(
            lambda sig: kl(sig, temperature=2.0)[None],
            torch.ones(1, device=device),
            s_hidden,
            s_head,
            labels,
            mask,
            chunk_size=chunk,
            teacher_logits=lambda part, _student: t_head(t_hidden[part]),
        )
        return total

    # Peak memory from the first pass (RSS only grows), time from warmed-up ones.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = loss()
    value.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        s_hidden.grad = s_head.weight.grad = None
        start = time.perf_counter()
        loss().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    ms = min(times)
    return {"peak_mib": max(peak - base, 0) / 2**20, "ms": ms, "loss": value.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--chunk-positions", type=int, default=64, help="train.logit_chunk_size: positions/chunk"
    )
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (fastest kept)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, vocab = args.child[0], int(args.child[1])
        chunk = args.chunk_positions
        print(json.dumps(measure(mode, vocab, args.positions, args.hidden, chunk, args.repeats)))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()
    print(
        f"device: {device}; {args.positions} positions, hidden {args.hidden}, "
        f"chunks of {args.chunk_positions} positions, fp32, one forward+backward of T²·KL at T=2 "
        f"(time: fastest of {args.repeats})"
    )
    print(
        f"{'vocab':>8} {'naive MiB':>10} {'ours MiB':>9} {'mem ratio':>9} "
        f"{'naive ms':>9} {'ours ms':>8} {'time ratio':>10}"
    )
    rows = []
    for vocab in args.vocabs:
        result = {}
        for mode in ("naive", "chunked"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                str(vocab),
                f"--positions={args.positions}",
                f"--hidden={args.hidden}",
                f"--chunk-positions={args.chunk_positions}",
                f"--repeats={args.repeats}",
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result[mode] = json.loads(out.strip().splitlines()[-1])
        naive, ours = result["naive"], result["chunked"]
        assert abs(naive["loss"] - ours["loss"]) <= 1e-3 * abs(naive["loss"]), (naive, ours)
        rows.append(
            {"vocab": vocab, **{f"{k}_{m}": v for m, r in result.items() for k, v in r.items()}}
        )
        print(
            f"{vocab:>8} {naive['peak_mib']:>10,.0f} {ours['peak_mib']:>9,.0f} "
            f"{ours['peak_mib'] / max(naive['peak_mib'], 1e-9):>9.3f} {naive['ms']:>9,.0f} "
            f"{ours['ms']:>8,.0f} {ours['ms'] / naive['ms']:>10.2f}"
        )
    print(json.dumps({"device": device, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
