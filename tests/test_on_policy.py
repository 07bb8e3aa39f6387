"""On-policy distillation (GKD) and the skew KL divergences (DistiLLM).

Skew KL values against float64 references written with Python floats; the chunked path
against the unchunked one; λ = 0 bit for bit the supervised run; an on-policy run resumed to
the same weights; the FLOPs meter charging the sampling; the sampled rows' labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from distillery.config import RunConfig
from distillery.data import IGNORE_INDEX, global_batch_indices
from distillery.distributed import DistEnv
from distillery.models import compute_params, load_pretrained
from distillery.models.generation import Sampling
from distillery.objectives import forward_kl, get_objective, reverse_kl
from distillery.objectives.chunked import chunked_loss
from distillery.objectives.logits import skew_kl, skew_reverse_kl
from distillery.recipes.generate import prepare_prompts
from distillery.recipes.run import run
from distillery.step import DistillStep, OnPolicyStep, terms_from_config
from tests.conftest import tiny_llama
from tests.test_prompts import write_prompt_file

N, V = 3 * 47, 123


def softmax(row: list[float], t: float) -> list[float]:
    top = max(row)
    exps = [math.exp((x - top) / t) for x in row]
    return [e / sum(exps) for e in exps]


def skew_reference(student, teacher, mask, alpha: float, t: float, reverse: bool) -> float:
    total = 0.0
    for s_row, t_row, keep in zip(student.tolist(), teacher.tolist(), mask.tolist(), strict=True):
        if not keep:
            continue
        p, q = softmax(t_row, t), softmax(s_row, t)
        if reverse:
            p, q = q, p
        total += sum(a * math.log(a / (alpha * a + (1 - alpha) * b)) for a, b in zip(p, q,
                     strict=True) if a > 0)  # fmt: skip
    return total * t * t


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(11)
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    return student, teacher, torch.rand(N, generator=g) > 0.3


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("reverse", [False, True])
def test_skew_kl_matches_the_reference(logits, alpha, t, reverse):
    student, teacher, mask = logits
    fn = skew_reverse_kl if reverse else skew_kl
    value = fn(student, teacher, mask, alpha=alpha, temperature=t)
    expected = skew_reference(student, teacher, mask, alpha, t, reverse)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all() and grad[~mask].abs().max() == 0


def test_skew_kl_end_points_and_bound(logits):
    student, teacher, mask = logits
    for skew, plain in ((skew_kl, forward_kl), (skew_reverse_kl, reverse_kl)):
        zero = skew(student, teacher, mask, alpha=0.0, temperature=2.0)
        assert zero.item() == pytest.approx(plain(student, teacher, mask, temperature=2.0).item())
    # bounded by −log α per position even where the student puts no mass on the teacher's token
    far = torch.full((1, 5), -1e4, dtype=torch.float64)
    far[0, 0] = 0.0
    near = torch.full((1, 5), -1e4, dtype=torch.float64)
    near[0, 4] = 0.0
    one = torch.ones(1, dtype=torch.bool)
    assert skew_kl(far, near, one, alpha=0.1).item() == pytest.approx(-math.log(0.1), rel=1e-6)
    assert get_objective("skew_kl").params == ("alpha", "temperature")
    with pytest.raises(ValidationError):  # the bound lives in the registry's Alpha
        __import__("pydantic").TypeAdapter(get_objective("skew_kl").param_specs["alpha"][0])\
            .validate_python(1.0)  # fmt: skip


def test_skew_kl_goes_through_the_chunked_path():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    n, h, v = 77, 16, 97
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(h, v, bias=False).double()
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:9] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    terms = [{"kind": "skew_kl", "alpha": 0.2, "temperature": 2.0},
             {"kind": "skew_reverse_kl", "alpha": 0.3}]  # fmt: skip
    mix = DistillStep(terms_from_config(terms), teacher=object(), vocab=v)  # type: ignore[arg-type]
    weights = torch.tensor([1.0, 0.5])
    full = mix.term_sums({"student_logits": head(hidden), "teacher_logits": teacher,
                          "labels": labels, "mask": mask})  # fmt: skip
    total, sums = chunked_loss(mix.term_sums, weights, hidden, head, labels, mask, chunk_size=10,
                               teacher_logits=lambda part, _s: teacher[part], vocab=v)  # fmt: skip
    assert torch.allclose(sums, full.float(), rtol=1e-5)
    expected = torch.autograd.grad((weights * full).sum(), [hidden, head.weight])
    for got, want in zip(torch.autograd.grad(total, [hidden, head.weight]), expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------- on-policy runs
@pytest.fixture(scope="module")
def prompt_file(corpus, tmp_path_factory):
    return write_prompt_file(corpus, tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


def prompt_run(prompt_file, cache_dir, out, teacher, on_policy=None, **train) -> RunConfig:
    fields = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, eval_batches=1)
    return RunConfig.model_validate({
        "data": {"task": "prompts", "source": str(prompt_file), "seq_len": 40,
                 "cache_dir": str(cache_dir)},
        "model": {"preset": "tiny"},
        "teacher": str(teacher),
        "objectives": [{"kind": "jsd", "beta": 0.5}],
        "train": fields | train,
        "on_policy": on_policy,
        "out": str(out),
    })  # fmt: skip


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "model.safetensors"))


def test_fraction_zero_is_supervised_and_on_policy_resumes_exactly(
    prompt_file, cache_dir, teacher_dir, tmp_path
):
    """λ = 0 equals the supervised run bit for bit; λ = 1 resumed from a checkpoint ends at
    the uninterrupted run's weights (the same samples); its FLOPs add the sampling's."""
    supervised = run(prompt_run(prompt_file, cache_dir, tmp_path / "sup", teacher_dir))
    zero = run(prompt_run(prompt_file, cache_dir, tmp_path / "zero", teacher_dir,
                          {"fraction": 0.0, "max_new_tokens": 8}))  # fmt: skip
    a, b = weights(tmp_path / "sup"), weights(tmp_path / "zero")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert zero["flops"] == supervised["flops"] and zero["val_loss"] == supervised["val_loss"]

    spec = {"fraction": 1.0, "max_new_tokens": 8, "top_p": 0.9}
    full = run(prompt_run(prompt_file, cache_dir, tmp_path / "full", teacher_dir, spec,
                          checkpoint_every=2))  # fmt: skip
    cut = prompt_run(prompt_file, cache_dir, tmp_path / "cut", teacher_dir, spec,
                     checkpoint_every=2)  # fmt: skip
    assert run(cut, stop_after=3)["finished"] is False  # "dies" after step 3; checkpoint at 2
    resumed = run(cut, resume=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["flops"] == full["flops"]
    assert full["val_loss"] != supervised["val_loss"]
    # the supervised run's FLOPs plus 2·N per prompt token and per budgeted new token
    _, train, _ = prepare_prompts(cut.data, DistEnv(), teacher_dir)
    n = compute_params(load_pretrained(tmp_path / "full" / "model"))
    extra = 0.0
    for step in range(4):
        for row in global_batch_indices(train.num_blocks, step, 4, 0):
            p = int(train.prompt_lengths[row])
            extra += 2.0 * n * (p + min(8, 40 - p))
    assert full["flops"] == pytest.approx(supervised["flops"] + extra, rel=1e-9)


def test_sampled_rows_keep_the_prompt_and_label_only_the_sample(prompt_file, cache_dir,
                                                               teacher_dir):  # fmt: skip
    cfg = prompt_run(prompt_file, cache_dir, "unused", teacher_dir)
    tokenizer, train, _ = prepare_prompts(cfg.data, DistEnv(), teacher_dir)
    student = tiny_llama(len(tokenizer), seed=5)

    def make() -> OnPolicyStep:
        inner = DistillStep(terms_from_config([{"kind": "ce"}]), vocab=len(tokenizer))
        return OnPolicyStep(inner, student, Sampling(max_new_tokens=6), 0.5, seed=1,
                            batch_size=4, pad_token_id=tokenizer.pad_token_id,
                            stop_ids=[tokenizer.eos_token_id])  # fmt: skip

    step = make()
    decided = [step.is_on_policy(s) for s in range(200)]
    assert 70 < sum(decided) < 130  # λ = 0.5
    on = decided.index(True)
    ids, labels = train.examples(np.arange(4))
    samples = []
    for _ in range(2):  # two processes (or a resumed one) draw the same completions
        step = make()
        step.start_step(on)
        counts = step.counts(ids, labels)
        _, new_ids, new_labels = step._pending[0]
        samples.append(new_ids)
        step(student, ids, labels, counts=counts)  # consumes the samples
    assert torch.equal(samples[0], samples[1])
    for row in range(4):
        p = int(train.prompt_lengths[row])
        assert torch.equal(samples[0][row, :p], ids[row, :p])  # the prompt is kept
        assert (new_labels[row, : p - 1] == IGNORE_INDEX).all()  # never carries loss
        labelled = (new_labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert labelled.min() == p - 1 and len(labelled) <= 6
        assert torch.equal(new_labels[row, labelled], new_ids[row, labelled + 1])
    assert counts[0] == (new_labels != IGNORE_INDEX).sum()
    step.start_step(on + 1 + decided[on + 1 :].index(True))  # another step: other samples
    step.counts(ids, labels)
    assert not torch.equal(step._pending[0][1], samples[0])


def test_on_policy_config_is_checked(prompt_file, cache_dir, teacher_dir, tmp_path):
    with pytest.raises(ValidationError, match=r"data\.task: prompts"):
        RunConfig.model_validate({"on_policy": {"fraction": 0.5}, "teacher": str(teacher_dir),
                                  "objectives": [{"kind": "jsd"}]})  # fmt: skip
    with pytest.raises(ValidationError, match="reads the teacher"):
        cfg = prompt_run(prompt_file, cache_dir, tmp_path, teacher_dir).model_dump()
        RunConfig.model_validate(cfg | {"objectives": [{"kind": "ce"}], "on_policy": {}})
