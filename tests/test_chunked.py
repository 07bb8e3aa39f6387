"""Chunked logit losses: equal to the unchunked ones, padded vocabularies, bounded memory."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from distillery.data import shift_labels
from distillery.errors import DistilleryError
from distillery.models.heads import check_plain_head, head_inputs
from distillery.objectives.chunked import chunked_loss
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from tests.conftest import tiny_llama

ALL_TERMS = [
    {"kind": "ce"},
    {"kind": "hard_labels", "weight": 0.5},
    {"kind": "forward_kl", "temperature": 2.0},
    {"kind": "reverse_kl", "temperature": 1.5},
    {"kind": "jsd", "beta": 0.3, "temperature": 2.0},
    {"kind": "tvd"},
]


def tiny(vocab: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(vocab, hidden=hidden, layers=layers, seed=seed)


def test_chunked_sums_equal_unchunked_values_and_gradients():
    torch.manual_seed(0)  # the heads' initialisation: independent of which tests ran before
    g = torch.Generator().manual_seed(1)
    n, h, ht, v = 141, 16, 24, 123
    s_hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(n, ht, generator=g, dtype=torch.float64)
    s_head = nn.Linear(h, v, bias=False).double()
    t_head = nn.Linear(ht, v + 5, bias=False).double()  # padded: 5 rows that are no tokens
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    mask = labels != -100
    mix = DistillStep(terms_from_config(ALL_TERMS), teacher=_NoTeacher(), vocab=v)
    full_signals = {
        "student_logits": s_head(s_hidden),
        "teacher_logits": t_head(t_hidden)[:, :v].detach(),
        "labels": labels,
        "mask": mask,
    }
    expected = mix.term_sums(full_signals)
    weights = torch.arange(1, len(ALL_TERMS) + 1, dtype=torch.float32)
    total, sums = chunked_loss(
        mix.term_sums,
        weights,
        s_hidden,
        s_head,
        labels,
        mask,
        chunk_size=10,
        teacher_logits=lambda part, _student: t_head(t_hidden[part]),
        vocab=v,
    )
    assert torch.allclose(sums, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(total, (weights * expected).sum(), rtol=1e-5)
    assert not sums.requires_grad  # only the weighted total is differentiable
    g_expected = torch.autograd.grad((weights * expected).sum(), [s_hidden, s_head.weight])
    g_got = torch.autograd.grad(3.0 * total, [s_hidden, s_head.weight])  # scaled upstream
    for a, b in zip(g_got, g_expected, strict=True):
        assert torch.allclose(a, 3.0 * b, rtol=1e-4, atol=1e-6)
    assert t_head.weight.grad is None


class _NoTeacher:
    """Stands in where DistillStep needs a teacher object but the test feeds signals itself."""

    compute_params = 0


def test_head_inputs_capture_hidden_and_skip_the_projection():
    model = tiny(97)
    ids = torch.randint(0, 97, (2, 11))
    full = model(input_ids=ids).logits
    with head_inputs(model) as captured:
        empty = model(input_ids=ids).logits
    assert empty.shape == (2, 0, 97)
    assert torch.allclose(model.get_output_embeddings()(captured["hidden"]), full, atol=1e-5)
    assert not model.get_output_embeddings()._forward_pre_hooks  # removed on exit


@pytest.mark.parametrize("chunk", [7, 64])
def test_loss_mix_chunked_equals_unchunked_on_real_models(chunk):
    student = tiny(128, hidden=32, layers=2, seed=1)
    teacher = LiveTeacher(tiny(136, hidden=48, layers=3, seed=2))  # padded differently
    ids = torch.randint(0, 120, (3, 17))
    labels = shift_labels(ids)
    terms = terms_from_config(ALL_TERMS)
    plain = DistillStep(terms, teacher, vocab=120)
    chunked = DistillStep(terms, teacher, vocab=120, chunk_size=chunk)
    twin = copy.deepcopy(student)
    total_a, sums_a = plain(student, ids, labels)
    total_b, sums_b = chunked(twin, ids, labels)
    assert torch.allclose(total_a, total_b, rtol=1e-5)
    for name in sums_a:
        assert torch.allclose(sums_a[name], sums_b[name], rtol=1e-5, atol=1e-5), name
    total_a.backward()
    total_b.backward()
    for (name, p), q in zip(student.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    assert all(p.grad is None for p in teacher.model.parameters())


def test_models_that_rescale_logits_are_refused_for_chunking():
    model = tiny(64)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(DistilleryError, match="logit_chunk_size=0"):
        check_plain_head(model, "teacher")


def test_distillation_with_chunks_trains_like_without(corpus, cache_dir, tmp_path, teacher_dir):
    from safetensors.torch import load_file

    from distillery.recipes.run import run
    from tests.conftest import tiny_run

    outs = {}
    for chunk in (0, 24):
        cfg = tiny_run(corpus, cache_dir, tmp_path / f"c{chunk}", teacher=teacher_dir, steps=3)
        cfg.objectives = [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}]
        cfg.train.logit_chunk_size = chunk
        cfg.teacher.precision = "fp32"  # chunking is exact; a bf16 teacher rounds per shape
        run(type(cfg).model_validate(cfg.model_dump()), name="distill")
        outs[chunk] = load_file(str(tmp_path / f"c{chunk}" / "model" / "model.safetensors"))
    moved = max((outs[0][k] - outs[24][k]).abs().max().item() for k in outs[0])
    assert moved < 1e-5


BIG_VOCAB_SCRIPT = r"""
import json, resource, sys, torch
from distillery.step import DistillStep, terms_from_config
from distillery.data import shift_labels
from distillery.teachers import LiveTeacher
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
chunk = int(sys.argv[1])
def model(h):
    return LlamaForCausalLM(LlamaConfig(hidden_size=h, intermediate_size=2 * h,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=262144))
student, teacher = model(16), LiveTeacher(model(32))
ids = torch.randint(0, 262144, (2, 256))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mix = DistillStep(terms_from_config([{"kind": "ce"}, {"kind": "forward_kl"}]), teacher,
              chunk_size=chunk)
total, _ = mix(student, ids, shift_labels(ids))
total.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": total.item(), "extra_mib": (peak - before) / 1024}))
"""


def test_vocabulary_of_262144_runs_in_bounded_memory():
    """512 positions × 262,144 tokens: one fp32 logits tensor alone is 512 MiB."""
    results = {}
    for chunk in (0, 32):
        proc = subprocess.run(
            [sys.executable, "-c", BIG_VOCAB_SCRIPT, str(chunk)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[chunk] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results[32]["loss"] == pytest.approx(results[0]["loss"], rel=1e-4)
    assert results[0]["extra_mib"] > 2000  # the full-vocabulary path holds several copies
    assert results[32]["extra_mib"] < results[0]["extra_mib"] / 4


def test_evaluation_by_chunks_equals_evaluation_on_whole_logits(
    corpus, cache_dir, tmp_path, teacher_dir, monkeypatch
):
    from distillery.distributed import DistEnv
    from distillery.eval import metrics
    from distillery.models import heads, load_pretrained
    from distillery.recipes.common import prepare_data
    from tests.conftest import tiny_run

    cfg = tiny_run(corpus, cache_dir, tmp_path / "r")
    tokenizer, _, val = prepare_data(cfg.data, DistEnv(), teacher_dir)
    teacher = LiveTeacher(load_pretrained(teacher_dir))
    student = tiny(teacher.head.weight.shape[0] + 3, hidden=32, layers=1, seed=4)  # padded
    device = torch.device("cpu")

    def evaluate() -> dict[str, float]:
        return metrics.evaluate_model(
            student, val, device=device, max_batches=2, teacher=teacher, vocab=len(tokenizer)
        )

    monkeypatch.setattr(heads, "CHUNK_LOGITS", 37 * len(tokenizer))  # 37 positions
    chunked = evaluate()
    monkeypatch.setattr(metrics, "has_plain_head", lambda model: False)
    whole = evaluate()
    assert chunked.keys() == whole.keys() and chunked["eval_tokens"] > 37
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("mode", ["compiled", "bf16"])
def test_fast_chunks_match_a_float64_reference(mode):
    """The compiled chunks (ragged last chunk padded) equal float32 autograd; bf16 matmuls stay
    within bf16 rounding of a float64 reference, for values and both gradients."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    n, h, v = 47, 16, 123
    s_hidden = torch.randn(n, h, generator=g, requires_grad=True)
    s_head = nn.Linear(h, v, bias=True)
    teacher = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:5] = -100
    mask = labels != -100
    terms = [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}, {"kind": "jsd"}]
    mix = DistillStep(terms_from_config(terms), teacher=_NoTeacher(), vocab=v)
    weights = torch.tensor([1.0, 2.0, 0.5])
    # Reference: float64, written as one plain autograd graph over all positions.
    ref_hidden = s_hidden.detach().double().requires_grad_(True)
    ref_w, ref_b = (p.detach().double().requires_grad_(True) for p in (s_head.weight, s_head.bias))
    signals = {
        "student_logits": ref_hidden @ ref_w.t() + ref_b,
        "teacher_logits": teacher.double(),
        "labels": labels,
        "mask": mask,
    }
    ref_total = (weights.double() * mix.term_sums(signals).double()).sum()
    ref_grads = torch.autograd.grad(ref_total, [ref_hidden, ref_w, ref_b])
    total, _ = chunked_loss(
        mix.term_sums,
        weights,
        s_hidden,
        s_head,
        labels,
        mask,
        chunk_size=10,
        teacher_logits=lambda part, _student: teacher[part],
        matmul_dtype=torch.bfloat16 if mode == "bf16" else None,
        compile=mode == "compiled",
    )
    grads = torch.autograd.grad(total, [s_hidden, s_head.weight, s_head.bias])
    tol = 1e-5 if mode == "compiled" else 2e-2  # bf16 keeps 8 bits of mantissa
    assert abs(total.item() - ref_total.item()) <= tol * abs(ref_total.item())
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got.double() - want).norm() <= tol * want.norm()
