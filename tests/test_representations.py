"""Representation objectives: hidden-state cosine/MSE (with projection), attention KL, layer
maps and head matching — against float64 references written plainly, and through the mix."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from distillery.data import shift_labels
from distillery.errors import DistilleryError
from distillery.objectives import get_objective
from distillery.objectives.logits import IGNORE_INDEX
from distillery.objectives.representations import layer_pairs, match_heads
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from tests.conftest import tiny_llama

L, N, D, A, T = 2, 15, 6, 3, 5
VOCAB = 96


# --------------------------------------------------------------------------- references (float64)


def ref_cosine(s, t, mask):
    total = 0.0
    for n in range(s.shape[1]):
        if not mask[n]:
            continue
        per_layer = []
        for layer in range(s.shape[0]):
            a, b = s[layer, n], t[layer, n]
            dot = sum(a[k] * b[k] for k in range(a.shape[0]))
            norm_a = torch.sqrt(sum(a[k] * a[k] for k in range(a.shape[0])))
            norm_b = torch.sqrt(sum(b[k] * b[k] for k in range(b.shape[0])))
            per_layer.append(1.0 - dot / (norm_a * norm_b))
        total = total + sum(per_layer) / len(per_layer)
    return total


def ref_mse(s, t, mask):
    total = 0.0
    for n in range(s.shape[1]):
        if mask[n]:
            per_layer = [((s[layer, n] - t[layer, n]) ** 2).mean() for layer in range(s.shape[0])]
            total = total + sum(per_layer) / len(per_layer)
    return total


def ref_attention_kl(s, t, mask):
    total = 0.0
    for n in range(s.shape[1]):
        if not mask[n]:
            continue
        values = []
        for layer in range(s.shape[0]):
            for head in range(s.shape[2]):
                kl = 0.0
                for k in range(s.shape[3]):
                    p, q = t[layer, n, head, k], s[layer, n, head, k]
                    if p > 0:
                        kl = kl + p * (torch.log(p) - torch.log(q))
                values.append(kl)
        total = total + sum(values) / len(values)
    return total


def _mask(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, generator=g) > 0.3
    mask[0] = True
    return mask


def _states(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, N, D, generator=g)


def _attn(seed: int) -> torch.Tensor:
    """Causal attention rows (L, N, A, T): query n = n % T sees keys 0..n%T."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(L, N, A, T, generator=g)
    causal = torch.arange(T)[None, :] <= (torch.arange(N) % T)[:, None]  # (N, T)
    return scores.masked_fill(~causal[None, :, None, :], float("-inf")).softmax(-1)


CASES = {
    "hidden_cosine": (ref_cosine, _states, "student_states", "teacher_states"),
    "hidden_mse": (ref_mse, _states, "student_states", "teacher_states"),
    "attention_kl": (ref_attention_kl, _attn, "student_attentions", "teacher_attentions"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference_value_and_grad(name):
    ref, make, s_key, t_key = CASES[name]
    mask = _mask()
    student, teacher = make(1), make(2)
    if name == "attention_kl":  # differentiate through logits so the rows stay distributions
        logits = student.clamp_min(1e-30).log().requires_grad_(True)
        x, x64 = logits.softmax(-1), logits.detach().double().requires_grad_(True)
        ours = get_objective(name)({s_key: x, t_key: teacher, "mask": mask})
        theirs = ref(x64.softmax(-1), teacher.double(), mask)
        leaf, leaf64 = logits, x64
    else:
        leaf = student.clone().requires_grad_(True)
        leaf64 = student.double().requires_grad_(True)
        ours = get_objective(name)({s_key: leaf, t_key: teacher, "mask": mask})
        theirs = ref(leaf64, teacher.double(), mask)
    assert ours.dtype == torch.float32 and ours.ndim == 0
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(ours, leaf)
    (g64,) = torch.autograd.grad(theirs, leaf64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)
    assert ours.item() > 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
def test_identical_inputs_give_zero(name):
    _, make, s_key, t_key = CASES[name]
    x = make(3)
    value = get_objective(name)({s_key: x, t_key: x.clone(), "mask": _mask()})
    assert abs(value.item()) < 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_positions_change_nothing_and_get_zero_grad(name):
    _, make, s_key, t_key = CASES[name]
    mask = _mask(4)
    student, teacher = make(5), make(6)
    poisoned = student.clone()
    poisoned[:, ~mask] = float("nan")
    poisoned_t = teacher.clone()
    poisoned_t[:, ~mask] = float("inf")
    leaf = poisoned.requires_grad_(True)
    fn = get_objective(name)
    clean = fn({s_key: student, t_key: teacher, "mask": mask})
    value = fn({s_key: leaf, t_key: poisoned_t, "mask": mask})
    torch.testing.assert_close(value, clean)
    (g,) = torch.autograd.grad(value, leaf)
    assert torch.isfinite(g).all()
    assert torch.equal(g[:, ~mask], torch.zeros_like(g[:, ~mask]))


def test_mse_is_not_scale_free_and_cosine_is():
    s, t, mask = _states(7), _states(8), _mask()
    cos, mse = get_objective("hidden_cosine"), get_objective("hidden_mse")
    args = {"teacher_states": t, "mask": mask}
    torch.testing.assert_close(
        cos({"student_states": 3.0 * s, **args}), cos({"student_states": s, **args})
    )
    assert mse({"student_states": 3.0 * s, **args}) > mse({"student_states": s, **args})


# --------------------------------------------------------------------------- layer maps, heads


def test_layer_pairs():
    assert layer_pairs("uniform", 2, 4) == [(1, 2), (2, 4)]
    assert layer_pairs("uniform", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert layer_pairs("uniform", 4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert layer_pairs("uniform", 4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # halves round up
    assert layer_pairs("uniform", 8, 2)[0] == (1, 1)  # a deeper student never maps to 0
    assert layer_pairs("last", 2, 6) == [(2, 6)]
    assert layer_pairs("embeddings", 2, 6) == [(0, 0)]
    assert layer_pairs([[0, 0], [1, 3]], 2, 4) == [(0, 0), (1, 3)]
    with pytest.raises(DistilleryError, match=r"\[3, 4\] is out of range"):
        layer_pairs([(3, 4)], 2, 4)
    with pytest.raises(DistilleryError, match="attention maps"):
        layer_pairs("embeddings", 2, 4, attention=True)


def test_match_heads():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 2, 3, 3, generator=g)
    t = torch.rand(2, 4, 3, 3, generator=g)
    s_map, t_map = match_heads(s, t, "auto")
    assert torch.equal(s_map, s)
    torch.testing.assert_close(t_map[:, 0], (t[:, 0] + t[:, 1]) / 2)
    torch.testing.assert_close(t_map[:, 1], (t[:, 2] + t[:, 3]) / 2)
    s_avg, t_avg = match_heads(s, t, "average")
    assert s_avg.shape == t_avg.shape == (2, 1, 3, 3)
    torch.testing.assert_close(t_avg[:, 0], t.mean(1))
    _, same_t = match_heads(s, s.flip(1), "auto")
    assert torch.equal(same_t, s.flip(1))  # equal counts: one to one
    three = torch.rand(2, 3, 3, 3, generator=g)
    assert match_heads(s, three, "auto")[1].shape[1] == 1  # not divisible: averaged
    with pytest.raises(DistilleryError, match="average"):
        match_heads(s, three, "map")


# --------------------------------------------------------------------------- through the mix


def _llama(seed: int, hidden: int = 32, layers: int = 2, heads: int = 4) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, hidden=hidden, layers=layers, heads=heads, seed=seed).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    return ids, shift_labels(ids)


def test_hidden_terms_through_the_mix_match_a_manual_computation(batch):
    """Student 2 layers × 24 wide, teacher 4 × 32: uniform map, learned projection."""
    ids, labels = batch
    student, teacher_model = _llama(1, hidden=24), _llama(2, layers=4)
    terms = terms_from_config(
        [
            {"kind": "hidden_mse", "layers": "uniform", "weight": 2.0},
            {"kind": "hidden_mse", "layers": "embeddings"},
            {"kind": "hidden_cosine", "layers": [[2, 3]]},
        ]
    )
    mix = DistillStep(terms, LiveTeacher(teacher_model), student=student)
    assert [t.pairs for t in mix.terms] == [[(1, 2), (2, 4)], [(0, 0)], [(2, 3)]]
    assert set(mix.modules) == {"hidden_mse", "hidden_mse_2", "hidden_cosine"}
    total, sums = mix(student, ids, labels)

    mask = labels.reshape(-1) != IGNORE_INDEX
    with torch.no_grad():
        hs = student(input_ids=ids, output_hidden_states=True).hidden_states
        ht = teacher_model(input_ids=ids, output_hidden_states=True).hidden_states

    def mapped(pairs, proj):
        s = torch.stack([proj(hs[i]).flatten(0, 1) for i, _ in pairs]).double()
        t = torch.stack([ht[j].flatten(0, 1) for _, j in pairs]).double()
        return s, t

    p = mix.modules
    expected = {
        "hidden_mse": ref_mse(*mapped([(1, 2), (2, 4)], p["hidden_mse"]), mask),
        "hidden_mse_2": ref_mse(*mapped([(0, 0)], p["hidden_mse_2"]), mask),
        "hidden_cosine": ref_cosine(*mapped([(2, 3)], p["hidden_cosine"]), mask),
    }
    for name, value in expected.items():
        torch.testing.assert_close(sums[name].double(), value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        total, 2.0 * sums["hidden_mse"] + sums["hidden_mse_2"] + sums["hidden_cosine"]
    )
    total.backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in mix.parameters())
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_attention_kl_through_the_mix_maps_heads(batch):
    ids, labels = batch
    student, teacher_model = _llama(3, heads=2), _llama(4, layers=4, heads=4)
    mix = DistillStep(
        terms_from_config([{"kind": "attention_kl", "layers": "uniform"}]),
        LiveTeacher(teacher_model),
        student=student,
    )
    assert student.config._attn_implementation == "eager"
    assert not mix.parameters()
    _, sums = mix(student, ids, labels)
    mask = labels.reshape(-1) != IGNORE_INDEX
    with torch.no_grad():
        sa = student(input_ids=ids, output_attentions=True).attentions
        ta = teacher_model(input_ids=ids, output_attentions=True).attentions
    rows_s, rows_t = [], []
    for i, j in [(1, 2), (2, 4)]:
        t = ta[j - 1]
        grouped = torch.stack([(t[:, 0] + t[:, 1]) / 2, (t[:, 2] + t[:, 3]) / 2], dim=1)
        rows_s.append(sa[i - 1].transpose(1, 2).flatten(0, 1))
        rows_t.append(grouped.transpose(1, 2).flatten(0, 1))
    expected = ref_attention_kl(torch.stack(rows_s).double(), torch.stack(rows_t).double(), mask)
    torch.testing.assert_close(sums["attention_kl"].double(), expected, rtol=1e-4, atol=1e-6)
    assert sums["attention_kl"].item() > 1e-3


def test_identical_teacher_and_student_give_zero_for_every_representation_term(batch):
    ids, labels = batch
    teacher_model = _llama(5, layers=2)
    student = copy.deepcopy(teacher_model)
    terms = terms_from_config(
        [
            {"kind": "hidden_cosine", "layers": "uniform"},
            {"kind": "hidden_mse", "layers": [[0, 0], [1, 1], [2, 2]]},
            {"kind": "attention_kl", "layers": "uniform", "heads": "map"},
            {"kind": "forward_kl"},
        ]
    )
    mix = DistillStep(terms, LiveTeacher(teacher_model), student=student)
    assert not mix.parameters()  # same width: no projection
    _, sums = mix(student, ids, labels)
    for name, value in sums.items():
        assert abs(value.item()) < 1e-4, name


def _full_mix(student, teacher_model, chunk_size: int) -> DistillStep:
    terms = terms_from_config(
        [
            {"kind": "ce", "weight": 0.5},
            {"kind": "forward_kl", "temperature": 2.0},
            {"kind": "hidden_cosine", "layers": "uniform", "weight": 0.7},
            {"kind": "attention_kl", "layers": "last", "heads": "average", "weight": 0.3},
        ]
    )
    return DistillStep(terms, LiveTeacher(teacher_model), student=student, chunk_size=chunk_size)


def test_chunked_and_unchunked_mix_agree_with_representation_terms(batch):
    ids, labels = batch
    teacher_model = _llama(6, hidden=48, layers=4)
    grads = []
    for chunk in (0, 5):
        student = _llama(7).train()
        torch.manual_seed(11)  # the projection starts the same
        mix = _full_mix(student, teacher_model, chunk)
        total, sums = mix(student, ids, labels)
        total.backward()
        params = [*student.parameters(), *mix.parameters()]
        grads.append(([p.grad.clone() for p in params], total.detach(), sums))
    (g0, t0, s0), (g1, t1, s1) = grads
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    for name in s0:
        torch.testing.assert_close(s1[name], s0[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_micro_batches_add_up_with_representation_terms(batch):
    ids, labels = batch
    teacher_model = _llama(8, hidden=48, layers=4)
    student = _llama(9)
    mix = _full_mix(student, teacher_model, 0)
    count = int((labels != IGNORE_INDEX).sum())
    params = [*student.parameters(), *mix.parameters()]

    big, _ = mix(student, ids, labels)
    (big / count).backward()
    big_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    for rows in (slice(0, 1), slice(1, 3)):
        part, _ = mix(student, ids[rows], labels[rows])
        (part / count).backward()
    for g_big, p in zip(big_grads, params, strict=True):
        torch.testing.assert_close(p.grad, g_big, rtol=1e-4, atol=1e-7)


def test_representation_config_errors_are_one_line_and_early():
    def refused(entries, student, teacher_model) -> str:
        with pytest.raises(DistilleryError) as err:
            DistillStep(terms_from_config(entries), LiveTeacher(teacher_model), student=student)
        assert "\n" not in str(err.value)
        return str(err.value)

    with pytest.raises(DistilleryError, match=r"no parameter\(s\) \['layers'\]"):
        terms_from_config([{"kind": "forward_kl", "layers": "last"}])
    with pytest.raises(DistilleryError, match=r"no parameter\(s\) \['heads'\]"):
        terms_from_config([{"kind": "hidden_mse", "heads": "map"}])
    student, teacher_model = _llama(1), _llama(2, layers=4)
    assert "[1, 9] is out of range" in refused(
        [{"kind": "hidden_mse", "layers": [[1, 9]]}], student, teacher_model
    )
    three_heads = _llama(3, hidden=24, heads=3)
    assert "use heads: average" in refused(
        [{"kind": "attention_kl", "heads": "map"}], student, three_heads
    )
    student.config.attention_dropout = 0.1
    assert "attention_dropout=0" in refused([{"kind": "attention_kl"}], student, teacher_model)


def test_nan_in_masked_student_states_gives_the_projection_a_finite_gradient(batch):
    ids, labels = batch
    student, teacher_model = _llama(4, hidden=24), _llama(5, layers=4)
    mix = DistillStep(
        terms_from_config([{"kind": "hidden_mse", "layers": "uniform"}]),
        LiveTeacher(teacher_model),
        student=student,
    )
    out = student(input_ids=ids, output_hidden_states=True)
    teacher = mix.teacher.run(ids, hidden_states=True)
    mask = labels.reshape(-1) != IGNORE_INDEX
    poisoned = [h.clone() for h in out.hidden_states]
    for h in poisoned:
        h.view(-1, h.shape[-1])[~mask] = float("nan")
    clean = mix._representation_sum(mix.terms[0], out, teacher, mask)

    class Poisoned:
        hidden_states = poisoned

    value = mix._representation_sum(mix.terms[0], Poisoned, teacher, mask)
    torch.testing.assert_close(value, clean)
    value.backward()
    (weight,) = mix.parameters()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
