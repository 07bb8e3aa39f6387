"""Tests for distillery.objectives: loss values, gradients, masks, T², accumulation, the mix.

The references below are written plainly in float64 (explicit per-position loops, softmax from
``exp`` with max-subtraction) and never call the torch loss helpers the objectives use.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import inspect

import pytest
import torch
from transformers import LlamaForCausalLM

from distillery.config import CrossEntropyObjective, ForwardKLObjective, HardLabelsObjective
from distillery.data import shift_labels
from distillery.errors import DistilleryError
from distillery.objectives import OBJECTIVES, get_objective, register_objective
from distillery.objectives.logits import IGNORE_INDEX, cross_entropy, forward_kl, hard_labels
from distillery.step import DistillStep, Term, terms_from_config
from distillery.teachers import LiveTeacher, TeacherOutput
from tests.conftest import tiny_llama

N = 3 * 47  # positions (odd on purpose)
V = 123  # vocabulary (odd on purpose)
NAMES = ("ce", "hard_labels", "forward_kl")
PARAMS = {"ce": {}, "hard_labels": {}, "forward_kl": {"temperature": 2.0}}


# --------------------------------------------------------------------------- references


def _ref_probs(row: torch.Tensor) -> torch.Tensor:
    """Softmax of one row as exp(x - max) / Σ exp(x - max)."""
    shifted = row - row.detach().max()
    e = torch.exp(shifted)
    return e / e.sum()


def ref_ce(s: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        if bool(mask[i]):
            total = total - torch.log(_ref_probs(s[i])[int(labels[i])])
    return total


def ref_hard(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        if bool(mask[i]):
            row = t[i].tolist()
            top = max(range(len(row)), key=row.__getitem__)
            total = total - torch.log(_ref_probs(s[i])[top])
    return total


def ref_plain_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over masked-in rows of KL(p_t ‖ p_s) = Σ_v p log(p / q), with 0 · log 0 = 0."""
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        if bool(mask[i]):
            p, q = _ref_probs(t[i]), _ref_probs(s[i])
            safe_p = torch.where(p > 0, p, torch.ones_like(p))  # keeps log finite where p = 0
            terms = torch.where(p > 0, p * torch.log(safe_p / q), torch.zeros_like(p))
            total = total + terms.sum()
    return total


def ref_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temperature: float):
    return temperature**2 * ref_plain_kl(s / temperature, t / temperature, mask)


def reference(name: str, sig: dict, **params) -> torch.Tensor:
    s, t, labels, mask = sig["student_logits"], sig["teacher_logits"], sig["labels"], sig["mask"]
    if name == "ce":
        return ref_ce(s, labels, mask)
    if name == "hard_labels":
        return ref_hard(s, t, mask)
    return ref_kl(s, t, mask, params["temperature"])


# --------------------------------------------------------------------------- data


def make_signals(seed: int = 0, n: int = N, v: int = V, keep: float = 0.7) -> dict:
    """Float64 student/teacher logits, labels (-100 where masked out) and the mask."""
    g = torch.Generator().manual_seed(seed)
    s = 3.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    t = 3.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) < keep
    mask[0], mask[1] = True, False  # both kinds present whatever the seed
    labels = torch.randint(0, v, (n,), generator=g)
    labels[~mask] = IGNORE_INDEX
    return {
        "student_logits": s.requires_grad_(),
        "teacher_logits": t,
        "labels": labels,
        "mask": mask,
    }


def with_student(sig: dict, student: torch.Tensor) -> dict:
    return {**sig, "student_logits": student}


def grad_of(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, x)
    return g


# --------------------------------------------------------------------------- 1. vs reference


@pytest.mark.parametrize("name", NAMES)
def test_objective_matches_float64_reference_value_and_grad(name):
    sig = make_signals(seed=1)
    s = sig["student_logits"]
    obj = get_objective(name)
    out = obj(sig, **PARAMS[name])
    ref = reference(name, sig, **PARAMS[name])
    assert out.ndim == 0 and out.dtype == torch.float32
    assert ref.item() > 1.0  # a real, non-trivial sum
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_of(out, s), grad_of(ref, s), rtol=1e-5, atol=1e-6)


def test_direct_functions_match_reference():
    sig = make_signals(seed=2)
    s, t, labels, mask = (sig[k] for k in ("student_logits", "teacher_logits", "labels", "mask"))
    torch.testing.assert_close(
        cross_entropy(s, labels, mask).double(), ref_ce(s, labels, mask), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        hard_labels(s, t, mask).double(), ref_hard(s, t, mask), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        forward_kl(s, t, mask, temperature=1.0).double(), ref_kl(s, t, mask, 1.0), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_returns_0dim_float32_sum(name, dtype):
    sig = make_signals(seed=3, n=7, v=11)
    sig = {
        **sig,
        "student_logits": sig["student_logits"].detach().to(dtype),
        "teacher_logits": sig["teacher_logits"].to(dtype),
    }
    out = get_objective(name)(sig, **PARAMS[name])
    assert out.shape == () and out.dtype == torch.float32


def test_forward_kl_zero_probability_teacher_tokens():
    """Teacher logits of -inf (probability 0) contribute 0·log 0 = 0, not NaN."""
    sig = make_signals(seed=4)
    t = sig["teacher_logits"].clone()
    t[:, ::3] = float("-inf")
    s = sig["student_logits"]
    out = forward_kl(s, t, sig["mask"], temperature=1.5)
    ref = ref_kl(s, t, sig["mask"], 1.5)
    assert torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)
    g = grad_of(out, s)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, grad_of(ref, s), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 2. masks


def _poison_masked(sig: dict, value: float) -> dict:
    """Same signals, with every masked-out row of both logits set to ``value``."""
    out = dict(sig)
    mask = sig["mask"]
    s = sig["student_logits"].detach().clone()
    t = sig["teacher_logits"].clone()
    s[~mask] = value
    t[~mask] = value
    if value == 1e30:  # huge and of both signs, still finite in float32
        s[~mask, ::2] = -1e30
    out["student_logits"] = s.requires_grad_()
    out["teacher_logits"] = t
    return out


@pytest.mark.parametrize("name", NAMES)
def test_masked_out_huge_logits_change_nothing(name):
    sig = make_signals(seed=5)
    obj = get_objective(name)
    clean = obj(sig, **PARAMS[name])
    clean_grad = grad_of(clean, sig["student_logits"])
    poisoned = _poison_masked(sig, 1e30)
    out = obj(poisoned, **PARAMS[name])
    g = grad_of(out, poisoned["student_logits"])
    mask = sig["mask"]
    torch.testing.assert_close(out, clean, rtol=1e-6, atol=0)
    assert torch.all(g[~mask] == 0)
    torch.testing.assert_close(g[mask], clean_grad[mask], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", NAMES)
def test_masked_out_nonfinite_logits_do_not_change_value(name, value):
    sig = make_signals(seed=6)
    obj = get_objective(name)
    clean = obj(sig, **PARAMS[name])
    out = obj(_poison_masked(sig, value), **PARAMS[name])
    assert torch.isfinite(out)
    torch.testing.assert_close(out, clean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", NAMES)
def test_masked_out_nonfinite_logits_get_exactly_zero_grad(name, value):
    """Padding rows can hold NaN/inf logits; their gradient must be 0, not NaN."""
    sig = make_signals(seed=7)
    obj = get_objective(name)
    clean_grad = grad_of(obj(sig, **PARAMS[name]), sig["student_logits"])
    poisoned = _poison_masked(sig, value)
    g = grad_of(obj(poisoned, **PARAMS[name]), poisoned["student_logits"])
    mask = sig["mask"]
    assert torch.isfinite(g).all(), "NaN/inf gradient leaked out of masked-out rows"
    assert torch.all(g[~mask] == 0)
    torch.testing.assert_close(g[mask], clean_grad[mask], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_batch_is_exactly_zero_with_zero_grad(name):
    sig = make_signals(seed=8)
    sig["mask"] = torch.zeros(N, dtype=torch.bool)
    sig["labels"] = torch.full((N,), IGNORE_INDEX)
    out = get_objective(name)(sig, **PARAMS[name])
    assert out.item() == 0.0
    g = grad_of(out, sig["student_logits"])
    assert torch.isfinite(g).all() and torch.all(g == 0)


@pytest.mark.parametrize("name", NAMES)
def test_nan_in_a_counted_position_is_not_hidden(name):
    """A NaN student row that counts must surface as NaN, not be silently dropped."""
    sig = make_signals(seed=9)
    s = sig["student_logits"].detach().clone()
    s[0] = float("nan")  # mask[0] is True
    out = get_objective(name)(with_student(sig, s), **PARAMS[name])
    assert torch.isnan(out)


# --------------------------------------------------------------------------- 3. temperature


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_forward_kl_is_t_squared_times_softened_kl(temperature):
    sig = make_signals(seed=10)
    s, t, mask = sig["student_logits"], sig["teacher_logits"], sig["mask"]
    out = forward_kl(s, t, mask, temperature=temperature)
    plain = ref_plain_kl(s / temperature, t / temperature, mask)
    torch.testing.assert_close(out.double(), temperature**2 * plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        grad_of(out, s), grad_of(temperature**2 * plain, s), rtol=1e-5, atol=1e-6
    )


def test_t_squared_keeps_gradient_scale_at_high_temperature():
    sig = make_signals(seed=11)
    s, t, mask = sig["student_logits"], sig["teacher_logits"], sig["mask"]
    norms = {T: grad_of(forward_kl(s, t, mask, temperature=T), s).norm().item() for T in (4, 8)}
    assert 0.5 < norms[4] / norms[8] < 2.0
    # Without T² the gradient would shrink like 1/T²: a factor ~4 from T=4 to T=8.
    unscaled = (norms[4] / 16) / (norms[8] / 64)
    assert unscaled > 3.0


# --------------------------------------------------------------------------- 4. identities


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_forward_kl_of_identical_logits_is_zero(temperature):
    sig = make_signals(seed=12)
    s = sig["student_logits"]
    out = forward_kl(s, s.detach().clone(), sig["mask"], temperature=temperature)
    assert abs(out.item()) < 1e-6
    assert grad_of(out, s).abs().max().item() < 1e-6
    # a per-row constant shift is the same distribution
    shifted = s.detach() + 5.0 * torch.randn(N, 1, dtype=torch.float64)
    assert abs(forward_kl(s, shifted, sig["mask"], temperature=temperature).item()) < 1e-4


def test_forward_kl_of_different_logits_is_positive():
    sig = make_signals(seed=13)
    assert forward_kl(sig["student_logits"], sig["teacher_logits"], sig["mask"]).item() > 1.0


def test_hard_labels_is_ce_on_teacher_argmax():
    sig = make_signals(seed=14)
    s, t, mask = sig["student_logits"], sig["teacher_logits"], sig["mask"]
    top1 = torch.where(mask, t.argmax(-1), IGNORE_INDEX)
    hl = hard_labels(s, t, mask)
    ce = cross_entropy(s, top1, mask)
    torch.testing.assert_close(hl, ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_of(hl, s), grad_of(ce, s), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- 5. accumulation

SPLITS = (10, 50, 81)


def _uneven_signals() -> dict:
    sig = make_signals(seed=15)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[:10] = True  # first micro-batch all valid
    mask[10:60:7] = True  # second one sparse
    mask[60:] = True
    mask[60::9] = False  # third one mostly valid
    sig["mask"] = mask
    sig["labels"] = torch.where(mask, sig["labels"].clamp(min=0), IGNORE_INDEX)
    return sig


def _chunks(sig: dict, s: torch.Tensor):
    start = 0
    for size in SPLITS:
        part = {k: v[start : start + size] for k, v in sig.items()}
        part["student_logits"] = s[start : start + size]
        yield part
        start += size


@pytest.mark.parametrize("name", NAMES)
def test_micro_batch_sums_divided_once_equal_big_batch_mean(name):
    sig = _uneven_signals()
    obj, params = get_objective(name), PARAMS[name]
    s = sig["student_logits"]
    count = int(sig["mask"].sum())
    assert sum(SPLITS) == N

    big = obj(sig, **params) / count
    big_grad = grad_of(big, s)

    acc = torch.zeros((), dtype=torch.float64)
    acc_grad = torch.zeros_like(s)
    start = 0
    for part, size in zip(_chunks(sig, s.detach()), SPLITS, strict=True):
        leaf = part["student_logits"].clone().requires_grad_()
        loss = obj(with_student(part, leaf), **params) / count
        acc_grad[start : start + size] = grad_of(loss, leaf)
        acc = acc + loss.double()
        start += size
    torch.testing.assert_close(acc, big.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(acc_grad, big_grad, rtol=1e-6, atol=1e-9)

    # The wrong way (mean per micro-batch, then average) is visibly different.
    means = [obj(p, **params) / p["mask"].sum() for p in _chunks(sig, s.detach())]
    wrong = torch.stack(means).mean()
    assert abs(wrong.item() - big.item()) > 1e-3 * abs(big.item())


# --------------------------------------------------------------------------- 6. registry


def test_registry_metadata():
    assert set(NAMES) <= set(OBJECTIVES)
    assert get_objective("forward_kl").needs_teacher is True
    assert get_objective("hard_labels").needs_teacher is True
    assert get_objective("ce").needs_teacher is False
    assert "temperature" in get_objective("forward_kl").params
    assert get_objective("ce").params == ()
    assert get_objective("ce").signals == ("student_logits", "labels", "mask")
    assert get_objective("forward_kl").fn is forward_kl


def test_unknown_objective_lists_available_names():
    with pytest.raises(DistilleryError) as err:
        get_objective("reverse_kl_typo")
    msg = str(err.value)
    assert "reverse_kl_typo" in msg
    for name in NAMES:
        assert name in msg


def test_register_objective_rejects_duplicates_and_unknown_signals():
    before = dict(OBJECTIVES)
    with pytest.raises(ValueError):
        register_objective("ce")(lambda student_logits, labels, mask: student_logits.sum())
    with pytest.raises(ValueError):
        register_objective("_test_bad_signal")(lambda student_logits, logits2: logits2)
    assert before == OBJECTIVES


def test_terms_from_config_names_weights_and_params():
    terms = terms_from_config(
        [
            {"kind": "forward_kl", "weight": 0.5, "temperature": 1.0},
            {"kind": "ce"},
            {"kind": "forward_kl", "temperature": 4.0},
            {"kind": "forward_kl", "temperature": 8.0},
        ]
    )
    assert [t.name for t in terms] == ["forward_kl", "ce", "forward_kl_2", "forward_kl_3"]
    assert [t.weight for t in terms] == [0.5, 1.0, 1.0, 1.0]
    assert [t.params for t in terms] == [
        {"temperature": 1.0},
        {},
        {"temperature": 4.0},
        {"temperature": 8.0},
    ]
    assert terms[1].objective is get_objective("ce")


def test_terms_from_config_accepts_pydantic_entries():
    terms = terms_from_config(
        [CrossEntropyObjective(weight=0.25), ForwardKLObjective(), HardLabelsObjective()]
    )
    assert [t.name for t in terms] == ["ce", "forward_kl", "hard_labels"]
    assert terms[0].weight == 0.25
    # The schema's default is the function's own (declared once, in its signature).
    assert terms[1].params == {"temperature": 1.0}
    assert (
        ForwardKLObjective().temperature
        == inspect.signature(forward_kl).parameters["temperature"].default
    )


def test_terms_from_config_rejects_unknown_parameter_and_kind():
    with pytest.raises(DistilleryError, match="temperature"):
        terms_from_config([{"kind": "ce", "temperature": 2.0}])
    with pytest.raises(DistilleryError, match="nope"):
        terms_from_config([{"kind": "nope"}])


# --------------------------------------------------------------------------- 7. DistillStep

VOCAB = 128


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, hidden=64, seed=seed).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0  # right padding
    attn[2, 4:] = 0
    return ids, shift_labels(ids, attn)


def _mix_terms() -> list[Term]:
    return terms_from_config(
        [
            {"kind": "ce", "weight": 0.5},
            {"kind": "forward_kl", "weight": 2.0, "temperature": 2.0},
            {"kind": "hard_labels", "weight": 0.25},
        ]
    )


def test_loss_mix_total_is_weighted_sum_and_terms_match_objectives(batch):
    ids, labels = batch
    student, teacher_model = _tiny_llama(1), _tiny_llama(2)
    mix = DistillStep(_mix_terms(), teacher=LiveTeacher(teacher_model))
    total, sums = mix(student, ids, labels)
    assert set(sums) == {"ce", "forward_kl", "hard_labels"}
    expected = 0.5 * sums["ce"] + 2.0 * sums["forward_kl"] + 0.25 * sums["hard_labels"]
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)

    with torch.no_grad():
        s = student(input_ids=ids).logits.reshape(-1, VOCAB).double()
        t = teacher_model(input_ids=ids).logits.reshape(-1, VOCAB).double()
    flat = labels.reshape(-1)
    mask = flat != IGNORE_INDEX
    torch.testing.assert_close(sums["ce"].double(), ref_ce(s, flat, mask), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        sums["forward_kl"].double(), ref_kl(s, t, mask, 2.0), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        sums["hard_labels"].double(), ref_hard(s, t, mask), rtol=1e-4, atol=0
    )
    assert sums["forward_kl"].item() > 1e-4  # different models really differ
    assert mix.teacher_flops_per_token() == 2.0 * mix.teacher.compute_params > 0


def test_loss_mix_student_equal_to_teacher_and_gradient_flow(batch):
    ids, labels = batch
    teacher_model = _tiny_llama(3)
    student = copy.deepcopy(teacher_model).train()
    teacher = LiveTeacher(teacher_model)
    mix = DistillStep(_mix_terms(), teacher=teacher)
    total, sums = mix(student, ids, labels)
    count = int((labels != IGNORE_INDEX).sum())
    assert abs(sums["forward_kl"].item()) < 1e-5 * count

    total.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    for p in teacher_model.parameters():
        assert p.requires_grad is False and p.grad is None
    assert not teacher_model.training


def test_loss_mix_micro_batches_add_up(batch):
    """Rows split into micro-batches: Σ totals / global count == big-batch total / count."""
    ids, labels = batch
    student = _tiny_llama(4)
    mix = DistillStep(_mix_terms(), teacher=LiveTeacher(_tiny_llama(5)))
    count = int((labels != IGNORE_INDEX).sum())

    big, _ = mix(student, ids, labels)
    (big / count).backward()
    big_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)

    acc = 0.0
    for rows in (slice(0, 1), slice(1, 3)):
        part, _ = mix(student, ids[rows], labels[rows])
        (part / count).backward()
        acc += part.item() / count
    assert acc == pytest.approx(big.item() / count, rel=1e-5)
    for g_big, p in zip(big_grads, student.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g_big, rtol=1e-4, atol=1e-7)


def test_loss_mix_requires_teacher_and_terms():
    with pytest.raises(DistilleryError, match="teacher"):
        DistillStep(terms_from_config([{"kind": "ce"}, {"kind": "forward_kl"}]))
    with pytest.raises(DistilleryError):
        DistillStep([])
    ce_only = DistillStep(terms_from_config([{"kind": "ce"}]))
    assert ce_only.needs_teacher is False
    assert ce_only.teacher_flops_per_token() == 0.0


def test_loss_mix_rejects_teacher_with_other_vocabulary(batch):
    ids, labels = batch

    class WrongVocabTeacher:
        compute_params = 1

        def run(self, input_ids, **_):
            return TeacherOutput(logits=torch.zeros(*input_ids.shape, VOCAB + 1))

    mix = DistillStep(terms_from_config([{"kind": "forward_kl"}]), teacher=WrongVocabTeacher())
    with pytest.raises(DistilleryError, match="vocabulary"):
        mix(_tiny_llama(6), ids, labels)


def _expected_labels(ids: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
    b, t = ids.shape
    out = torch.full((b, t), IGNORE_INDEX, dtype=ids.dtype)
    for i in range(b):
        for j in range(t - 1):
            if attn is None or (attn[i, j] and attn[i, j + 1]):
                out[i, j] = ids[i, j + 1]
    return out


def test_shift_labels_last_column_and_padding():
    ids = torch.arange(1, 13).reshape(2, 6)
    original = ids.clone()
    plain = shift_labels(ids)
    assert plain.dtype == torch.int64
    assert torch.all(plain[:, -1] == IGNORE_INDEX)
    assert torch.equal(plain[:, :-1], ids[:, 1:])
    assert torch.equal(plain, _expected_labels(ids, None))

    attn = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])  # right and left padding
    padded = shift_labels(ids, attn)
    assert torch.equal(padded, _expected_labels(ids, attn))
    assert padded.tolist() == [[2, 3, 4, -100, -100, -100], [-100, -100, 10, 11, 12, -100]]
    assert torch.equal(ids, original)


# --------------------------------------------------------------------------- 8. bf16


def test_forward_kl_bf16_is_computed_in_float32():
    """Near-identical bf16 distributions: a bf16-precision computation is ~20% off here."""
    g = torch.Generator().manual_seed(16)
    base = 3.0 * torch.randn(N, V, generator=g)
    s16 = (base + 0.1 * torch.randn(N, V, generator=g)).bfloat16().requires_grad_()
    t16 = base.bfloat16()
    mask = torch.rand(N, generator=g) < 0.8
    out = forward_kl(s16, t16, mask, temperature=2.0)
    assert out.dtype == torch.float32

    s64 = s16.detach().double().requires_grad_()
    ref = ref_kl(s64, t16.double(), mask, 2.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=0)
    g16 = grad_of(out, s16)
    assert g16.dtype == torch.bfloat16 and torch.isfinite(g16).all()
    torch.testing.assert_close(g16.double(), grad_of(ref, s64), rtol=2e-2, atol=1e-4)


def test_step_without_its_teacher_is_the_task_loss_alone(batch):
    """``teacher_enabled`` off (codistillation before the peers teach): the teacher is never
    run, the teacher terms are neither computed nor reported, and the total is the CE term of
    the same step with its teacher."""

    class Refusing(LiveTeacher):
        def run(self, *args, **kwargs):  # type: ignore[override]
            raise AssertionError("the teacher ran")

    ids, labels = batch
    student = _tiny_llama(6)
    full = DistillStep(_mix_terms(), teacher=LiveTeacher(_tiny_llama(7)))
    _, with_teacher = full(student, ids, labels)
    alone = DistillStep(_mix_terms(), teacher=Refusing(_tiny_llama(7)))
    alone.teacher_enabled = False
    total, sums = alone(student, ids, labels)
    assert set(sums) == {"ce"}
    torch.testing.assert_close(total, 0.5 * with_teacher["ce"], rtol=1e-6, atol=0)
    assert alone.teacher_flops_per_token() == 0.0
    assert alone.flops_per_token(10) == 60.0


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_schema_is_its_function(name: str):
    """The config schema of an objective is built from the function's keyword-only parameters:
    the same names and defaults, and bounds that refuse what the function cannot take."""
    from distillery.config import objective_schema

    objective = get_objective(name)
    schema = objective_schema(name, "Probe")
    defaults = {
        p.name: p.default
        for p in inspect.signature(objective.fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    fields = schema.model_fields
    assert {k: fields[k].default for k in defaults} == defaults
    routing = {"logits": set(), "states": {"layers", "projection"}}
    routing["attentions"] = {"layers", "heads"}
    assert set(fields) == {"kind", "weight", *defaults, *routing[objective.reads]}
    if "temperature" in defaults:
        with pytest.raises(ValueError, match="greater than 0"):
            schema(temperature=0.0)
