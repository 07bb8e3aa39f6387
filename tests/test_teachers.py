"""Teacher signals: a live model and ensembles, whole or a chunk of positions at a time."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from distillery.data import shift_labels
from distillery.errors import DistilleryError
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import EnsembleTeacher, LiveTeacher
from tests.conftest import tiny_llama

VOCAB = 90  # the shared tokenizer's tokens; the models below pad their tables beyond it


def _llama(seed: int, rows: int, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    return tiny_llama(rows, hidden=hidden, layers=layers, seed=seed).eval()


@pytest.fixture(scope="module")
def members() -> list[LiveTeacher]:
    return [LiveTeacher(_llama(1, 96)), LiveTeacher(_llama(2, 100, hidden=48, layers=3))]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))


def test_mean_ensemble_is_the_weighted_mean_of_probabilities(members, ids):
    ensemble = EnsembleTeacher(members, vocab=VOCAB, weights=[3.0, 1.0])
    combined = ensemble.logits(ids)
    assert combined.shape == (3, 11, VOCAB)
    probs = [m.logits(ids)[..., :VOCAB].double().softmax(-1) for m in members]
    expected = 0.75 * probs[0] + 0.25 * probs[1]
    torch.testing.assert_close(combined.double().softmax(-1), expected, rtol=1e-5, atol=1e-7)
    assert combined.exp().sum(-1).sub(1).abs().max() < 1e-5  # already log-probabilities


def test_confident_ensemble_takes_the_most_confident_teacher_per_position(members, ids):
    ensemble = EnsembleTeacher(members, vocab=VOCAB, combine="confident")
    combined = ensemble.logits(ids).double()
    logp = [m.logits(ids)[..., :VOCAB].double().log_softmax(-1) for m in members]
    first = logp[0].max(-1).values >= logp[1].max(-1).values  # (B, T)
    assert first.any() and (~first).any()  # both teachers win somewhere
    expected = torch.where(first[..., None], logp[0], logp[1])
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["mean", "confident"])
def test_chunk_logits_equal_the_whole_logits(members, ids, combine):
    n = ids.numel()
    for teacher in [members[0], EnsembleTeacher(members, vocab=VOCAB, combine=combine)]:
        whole = teacher.logits(ids).reshape(n, -1)
        chunk_logits = teacher.run(ids, logits=False).chunk_logits
        parts = [chunk_logits(slice(s, s + 7), None) for s in range(0, n, 7)]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


def test_a_teacher_that_rescales_logits_is_chunked_from_its_whole_logits(ids):
    model = _llama(3, 96)
    model.config.logits_scaling = 2.0  # as Granite: head(hidden) is not the logits
    teacher = LiveTeacher(model)
    whole = teacher.logits(ids).reshape(ids.numel(), -1)
    got = teacher.run(ids, logits=False).chunk_logits(slice(5, 12), None)
    torch.testing.assert_close(got, whole[5:12])


def test_loss_mix_with_an_ensemble_chunked_equals_unchunked(members, ids):
    ensemble = EnsembleTeacher(members, vocab=VOCAB, weights=[1.0, 2.0])
    labels = shift_labels(ids)
    terms = terms_from_config([{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}])
    results = []
    for chunk in (0, 5):
        student = _llama(4, 92).train()
        total, sums = DistillStep(terms, ensemble, vocab=VOCAB, chunk_size=chunk)(
            student, ids, labels
        )
        total.backward()
        results.append((total.detach(), sums, [p.grad.clone() for p in student.parameters()]))
    (t0, s0, g0), (t1, s1, g1) = results
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1["forward_kl"], s0["forward_kl"], rtol=1e-5, atol=1e-5)
    assert s0["forward_kl"] > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    mix = DistillStep(terms, ensemble, vocab=VOCAB)
    assert mix.teacher_flops_per_token() == 2.0 * sum(m.compute_params for m in members)


def test_ensemble_refusals_are_one_line(members):
    with pytest.raises(DistilleryError, match="single teacher, not an ensemble"):
        DistillStep(
            terms_from_config([{"kind": "hidden_mse"}]),
            EnsembleTeacher(members, vocab=VOCAB),
            student=_llama(5, 96),
        )
    with pytest.raises(DistilleryError, match="give 2 non-negative weights"):
        EnsembleTeacher(members, vocab=VOCAB, weights=[1.0])
    with pytest.raises(DistilleryError, match="at least two"):
        EnsembleTeacher(members[:1], vocab=VOCAB)


def test_distilling_from_two_teachers_end_to_end(corpus, cache_dir, tmp_path, teacher_dir):
    """A second teacher trained on the first one's tokenizer; the student learns from both."""
    from distillery.config import RunConfig
    from distillery.models import compute_params, load_pretrained
    from distillery.recipes.run import run
    from tests.conftest import tiny_run

    second = tiny_run(corpus, cache_dir, tmp_path / "second", steps=4, seed=7).model_dump()
    second["data"]["tokenizer"] = str(teacher_dir)
    second["model"]["overrides"] = {"hidden_size": 48}
    run(RunConfig.model_validate(second), name="second")
    teachers = [teacher_dir, tmp_path / "second" / "model"]

    cfg = tiny_run(corpus, cache_dir, tmp_path / "student", steps=3).model_dump()
    cfg.update(
        teacher={"kind": "live", "path": [str(t) for t in teachers], "weights": [2.0, 1.0]},
        objectives=[{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}],
    )
    summary = run(RunConfig.model_validate(cfg), name="distill")
    n_teachers = sum(compute_params(load_pretrained(t)) for t in teachers)
    tokens = 3 * 4 * 32
    assert summary["flops"] == pytest.approx(
        (6 * summary["compute_params"] + 2 * n_teachers) * tokens
    )
    assert 0.0 <= summary["agreement"] <= 1.0  # against the ensemble's top-1
    first = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["forward_kl"] > 0

    with pytest.raises(Exception, match="weights: give one weight per teacher"):
        RunConfig.model_validate({**cfg, "teacher": {**cfg["teacher"], "weights": [1.0]}})
