"""Reverse KL, generalized JSD(β) and TVD against float64 references written plainly."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.config import RunConfig, build_config
from distillery.objectives import generalized_jsd, get_objective, reverse_kl, total_variation
from distillery.objectives.logits import forward_kl

N, V = 3 * 47, 123


def softmax_rows(logits: torch.Tensor, t: float) -> list[list[float]]:
    """Plain per-row softmax with max subtraction, as Python floats."""
    rows = []
    for row in (logits.double() / t).tolist():
        top = max(row)
        exps = [math.exp(x - top) for x in row]
        total = sum(exps)
        rows.append([e / total for e in exps])
    return rows


def reference(kind: str, student, teacher, mask, t: float, beta: float = 0.5) -> float:
    s_rows, t_rows = softmax_rows(student, t), softmax_rows(teacher, t)
    total = 0.0
    for i, keep in enumerate(mask.tolist()):
        if not keep:
            continue
        p, q = t_rows[i], s_rows[i]  # p teacher, q student
        if kind == "forward_kl":
            total += sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)
        elif kind == "reverse_kl":
            total += sum(b * math.log(b / a) for a, b in zip(p, q, strict=True) if b > 0)
        elif kind == "tvd":
            total += 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
            kl_p = sum(a * math.log(a / c) for a, c in zip(p, m, strict=True) if a > 0)
            kl_q = sum(b * math.log(b / c) for b, c in zip(q, m, strict=True) if b > 0)
            total += beta * kl_p + (1 - beta) * kl_q
    return total * t * t


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(7)
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(N, generator=g) > 0.3
    return student, teacher, mask


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize(
    ("kind", "fn", "params"),
    [
        ("reverse_kl", reverse_kl, {}),
        ("tvd", total_variation, {}),
        ("jsd", generalized_jsd, {"beta": 0.5}),
        ("jsd", generalized_jsd, {"beta": 0.1}),
    ],
)
def test_values_match_reference(logits, kind, fn, params, t):
    student, teacher, mask = logits
    value = fn(student, teacher, mask, temperature=t, **params)
    assert value.item() == pytest.approx(
        reference(kind, student, teacher, mask, t, **params), rel=1e-5
    )
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all()
    assert grad[~mask].abs().max() == 0


def test_gradients_match_a_float64_finite_difference(logits):
    student, teacher, mask = logits
    direction = torch.randn(
        student.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    for fn in (reverse_kl, total_variation, generalized_jsd):
        (grad,) = torch.autograd.grad(fn(student, teacher, mask, temperature=2.0), student)
        eps = 1e-4
        plus = reference_of(fn, student.detach() + eps * direction, teacher, mask)
        minus = reference_of(fn, student.detach() - eps * direction, teacher, mask)
        numeric = (plus - minus) / (2 * eps)
        assert (grad * direction).sum().item() == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def reference_of(fn, student, teacher, mask) -> float:
    kind = {reverse_kl: "reverse_kl", total_variation: "tvd", generalized_jsd: "jsd"}[fn]
    return reference(kind, student, teacher, mask, 2.0)


def test_jsd_end_points_and_limits(logits):
    student, teacher, mask = logits
    teacher = teacher * 3  # a sharper teacher, so forward and reverse KL clearly differ
    fwd = forward_kl(student, teacher, mask, temperature=2.0)
    rev = reverse_kl(student, teacher, mask, temperature=2.0)
    assert generalized_jsd(student, teacher, mask, beta=0.0, temperature=2.0) == fwd
    assert generalized_jsd(student, teacher, mask, beta=1.0, temperature=2.0) == rev
    # GKD: JSD(β)/β → forward KL as β → 0, JSD(β)/(1−β) → reverse KL as β → 1 (in float64).
    small = 1e-9
    for beta, limit in ((small, "forward_kl"), (1 - small, "reverse_kl")):
        scaled = reference("jsd", student, teacher, mask, 2.0, beta=beta) / small
        assert scaled == pytest.approx(reference(limit, student, teacher, mask, 2.0), rel=1e-4)
    assert fwd.item() == pytest.approx(reference("forward_kl", student, teacher, mask, 2.0), 1e-5)
    assert fwd.item() != pytest.approx(rev.item(), rel=1e-2)  # the two limits differ here


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tvd"])
def test_identical_is_zero_and_all_masked_is_zero(logits, name):
    student, _, mask = logits
    objective = get_objective(name)
    same = {"student_logits": student, "teacher_logits": student.detach(), "mask": mask}
    assert abs(objective(same, temperature=3.0).item()) < 1e-5
    none = {**same, "mask": torch.zeros_like(mask)}
    value = objective(none, temperature=3.0)
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


def test_configs_accept_the_new_kinds():
    cfg = build_config(
        RunConfig,
        overrides=[
            "teacher=/t",
            "objectives=[{kind: jsd, beta: 0.9, temperature: 2}, {kind: reverse_kl}, {kind: tvd}]",
        ],
    )
    assert [o.kind for o in cfg.objectives] == ["jsd", "reverse_kl", "tvd"]
    with pytest.raises(Exception, match="beta"):
        build_config(RunConfig, overrides=["teacher=/t", "objectives=[{kind: jsd, beta: 2}]"])


# ----------------------------------------------------------------- ULD (another vocabulary)


def uld_reference(student, teacher, mask, t: float, top_k: int | None = None) -> float:
    """Plain ULD: each row's probabilities sorted by Python, the shorter list padded with zeros,
    the first ``top_k`` ranks (all if None) compared by L1; summed over ``mask``, times T²."""
    total = 0.0
    rows = zip(mask.tolist(), softmax_rows(student, t), softmax_rows(teacher, t), strict=True)
    for keep, s, p in rows:
        if not keep:
            continue
        s, p = sorted(s, reverse=True), sorted(p, reverse=True)
        width = max(len(s), len(p))
        s, p = s + [0.0] * (width - len(s)), p + [0.0] * (width - len(p))
        ranks = width if top_k is None else top_k
        total += sum(abs(a - b) for a, b in zip(s[:ranks], p[:ranks], strict=True))
    return total * t * t


def test_uld_by_hand():
    """Two positions, hand-computed. Student p = (0.5, 0.25, 0.25) (logits log p), teacher
    over 4 tokens (0.1, 0.6, 0.2, 0.1): sorted (0.5, 0.25, 0.25, 0) vs (0.6, 0.2, 0.1, 0.1) →
    0.1 + 0.05 + 0.15 + 0.1 = 0.4. Second row: a uniform student (1/3 each) and a one-hot-ish
    teacher (1, 0, 0, 0 in the limit): 2/3 + 1/3 + 1/3 + 0 = 4/3. top_k=2: 0.1 + 0.05 and
    2/3 + 1/3. A third, masked row counts nothing."""
    from distillery.objectives import universal_logit_distance as uld

    student = torch.tensor(
        [[0.5, 0.25, 0.25], [1.0, 1.0, 1.0], [9.0, 0.0, 0.0]], dtype=torch.float64
    ).log()
    teacher = torch.tensor(
        [[0.1, 0.6, 0.2, 0.1], [1.0, 1e-30, 1e-30, 1e-30], [1.0, 1.0, 1.0, 1.0]],
        dtype=torch.float64,
    ).log()
    mask = torch.tensor([True, True, False])
    assert uld(student, teacher, mask).item() == pytest.approx(0.4 + 4 / 3, abs=1e-6)
    assert uld(student, teacher, mask, top_k=2).item() == pytest.approx(0.15 + 1.0, abs=1e-6)
    only_first = torch.tensor([True, False, True])  # teacher_mask drops the second row
    assert uld(student, teacher, mask, only_first).item() == pytest.approx(0.4, abs=1e-6)
    # Symmetric in the two vocabularies' sizes: swapping the roles gives the same distance.
    assert uld(teacher, student, mask).item() == pytest.approx(0.4 + 4 / 3, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 5])
def test_uld_matches_reference_across_vocabularies(logits, t, top_k):
    """ULD between a student over 123 tokens and a teacher over 67 (another tokenizer) equals
    the Python reference; gradient finite, zero on masked rows."""
    student, teacher, mask = logits
    teacher = teacher[:, :67] * 1.5
    fn = get_objective("uld")
    signals = {"student_logits": student, "teacher_logits": teacher, "mask": mask}
    value = fn(signals, temperature=t, top_k=top_k)
    assert value.item() == pytest.approx(uld_reference(student, teacher, mask, t, top_k), 1e-6)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all() and grad[~mask].abs().max() == 0


def test_uld_gradient_matches_a_float64_finite_difference(logits):
    student, teacher, mask = logits
    teacher = teacher[:, :80]
    direction = torch.randn(
        student.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    fn = get_objective("uld").fn
    (grad,) = torch.autograd.grad(fn(student, teacher, mask, temperature=2.0), student)
    eps = 1e-6  # small: the sort order must not change between the two sides
    plus = uld_reference(student.detach() + eps * direction, teacher, mask, 2.0)
    minus = uld_reference(student.detach() - eps * direction, teacher, mask, 2.0)
    numeric = (plus - minus) / (2 * eps)
    assert (grad * direction).sum().item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_uld_identical_is_zero_and_all_masked_is_zero(logits):
    student, _, mask = logits
    fn = get_objective("uld")
    same = {"student_logits": student, "teacher_logits": student.detach()[:, torch.randperm(V)]}
    assert abs(fn({**same, "mask": mask}, temperature=2.0).item()) < 1e-4  # permuted: 0
    value = fn({**same, "mask": torch.zeros_like(mask)}, temperature=2.0)
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


def test_uld_config_and_its_bounds():
    cfg = build_config(
        RunConfig,
        overrides=["teacher=/t", "objectives=[{kind: ce}, {kind: uld, temperature: 2, top_k: 64}]"],
    )
    assert cfg.objectives[1].top_k == 64 and cfg.objectives[1].temperature == 2.0
    assert get_objective("uld").cross_vocab and not get_objective("forward_kl").cross_vocab
    with pytest.raises(Exception, match="top_k"):
        build_config(RunConfig, overrides=["teacher=/t", "objectives=[{kind: uld, top_k: 0}]"])
