"""A frozen teacher's forward at each precision: tokens/s side by side, and its KL to fp32.

    python benchmarks/teacher_forward.py [--arch gemma3] [--teacher DIR] [--json FILE]

Speed: a model built from a real architecture's config with random weights (speed does not
depend on what it learnt) — ``gemma3``: Gemma 3 270M's shapes (262,144-word tied vocabulary,
18 layers, width 640); ``llama3``: Llama 3's 128,256-word untied vocabulary on a small body —
run as a distillation run runs it (``teacher.precision``: ``teachers.factory.lean_teacher``,
then ``LiveTeacher.run(logits=False)`` and every chunk of logits made, as the chunked loss asks
for them). The precisions run round-robin, ``--rounds`` times, fastest kept.
Fidelity: with ``--teacher DIR`` (a trained model folder, e.g. the quickstart's teacher) on its
own tokenizer's BBC validation blocks, KL(p_fp32 ‖ p_precision) per token and top-1 agreement;
without it, on the random model (near-uniform outputs: a weak check).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from distillery.models.heads import chunk_rows, chunks
from distillery.teachers import LiveTeacher
from distillery.teachers.factory import lean_teacher

ARCHS = {
    "gemma3": dict(
        cls="Gemma3TextConfig",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        tie_word_embeddings=True,
    ),
    "llama3": dict(
        cls="LlamaConfig",
        vocab_size=128256,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}


def random_model(arch: str, layers: int | None) -> torch.nn.Module:
    import transformers

    shape = dict(ARCHS[arch])
    config = getattr(transformers, shape.pop("cls"))(**shape)
    if layers:
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types") and config.layer_types:
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def consume(teacher: LiveTeacher, batch: torch.Tensor, vocab: int) -> float:
    """One teacher pass as the chunked loss reads it; a checksum, so nothing is skipped."""
    out = teacher.run(batch, logits=False)
    assert out.chunk_logits is not None
    total = 0.0
    for part in chunks(batch.numel(), chunk_rows(vocab)):
        total += float(out.chunk_logits(part, None)[:, :8].sum())
    return total


def speed(args: argparse.Namespace, precisions: list[str]) -> dict[str, dict[str, float]]:
    base = random_model(args.arch, args.layers)
    vocab = base.config.vocab_size
    models = {
        p: LiveTeacher(lean_teacher(copy.deepcopy(base), p, torch.device("cpu")))
        for p in precisions
    }
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)
    best = {p: float("inf") for p in precisions}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for p in precisions:
            start = time.perf_counter()
            consume(models[p], batch, vocab)
            if round_:
                best[p] = min(best[p], time.perf_counter() - start)
    params = sum(t.numel() for t in base.parameters())
    return {
        p: {"seconds": s, "tokens_per_s": batch.numel() / s, "params": params}
        for p, s in best.items()
    }


@torch.no_grad()
def fidelity(args: argparse.Namespace, precisions: list[str]) -> dict[str, dict[str, float]]:
    """KL(fp32 ‖ precision) per token and top-1 agreement, on real text if a folder is given."""
    if args.teacher:
        from distillery.config import DataConfig
        from distillery.distributed import DistEnv
        from distillery.models import load_pretrained
        from distillery.recipes.common import prepare_data

        base = load_pretrained(Path(args.teacher), "teacher", "lm").eval()
        _, _, val = prepare_data(DataConfig(seq_len=args.seq_len), DistEnv(), Path(args.teacher))
        batches = [
            val.blocks(range(i, i + args.batch_size))
            for i in range(0, 4 * args.batch_size, args.batch_size)
        ]
    else:
        base = random_model(args.arch, args.layers)
        g = torch.Generator().manual_seed(1)
        vocab = base.config.vocab_size
        batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)]
    ref = LiveTeacher(base)
    out = {}
    for p in precisions:
        other = LiveTeacher(lean_teacher(copy.deepcopy(base), p, torch.device("cpu")))
        kl = agree = n = 0.0
        for batch in batches:
            want = torch.log_softmax(ref.logits(batch).float(), -1)
            got = torch.log_softmax(other.logits(batch).float(), -1)
            kl += float((want.exp() * (want - got)).sum())
            agree += float((want.argmax(-1) == got.argmax(-1)).sum())
            n += batch.numel()
        out[p] = {"kl_to_fp32_per_token": kl / n, "top1_agreement_with_fp32": agree / n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="gemma3")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers (0: the real count)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--teacher", help="a trained model folder for the KL to fp32")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    fast = speed(args, args.precisions)
    close = fidelity(args, args.precisions)
    print(
        f"device: {platform.machine()} CPU, {torch.get_num_threads()} threads; {args.arch} "
        f"shapes, {next(iter(fast.values()))['params']:,} params, batch {args.batch_size}x"
        f"{args.seq_len}; fastest of {args.rounds} interleaved rounds; KL on "
        f"{args.teacher or 'the random model'}"
    )
    print(
        f"{'precision':<10} {'tokens/s':>9} {'vs fp32':>8} {'KL(fp32‖·)/token':>17} "
        f"{'top-1 agree':>11}"
    )
    for p in args.precisions:
        ratio = fast["fp32"]["seconds"] / fast[p]["seconds"] if "fp32" in fast else float("nan")
        print(
            f"{p:<10} {fast[p]['tokens_per_s']:>9,.0f} {ratio:>7.2f}× "
            f"{close[p]['kl_to_fp32_per_token']:>17.2e} "
            f"{close[p]['top1_agreement_with_fp32']:>11.4f}"
        )
    result = {
        "device": f"{platform.machine()} CPU",
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "speed": fast,
        "fidelity": close,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
