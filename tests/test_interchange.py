"""Interchange interventions and IIT on real tiny Llamas: swaps reproduce the source, respect
causality, carry gradients where they should, and leave no hooks behind."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillery.errors import DistilleryError
from distillery.models.interchange import (
    iit_loss,
    interchange_logits,
    pair_batch,
    pair_index,
)
from distillery.models.interventions import capture_states, interchange, sample_positions
from distillery.models.surgery import decoder_layers
from distillery.objectives.logits import forward_kl

VOCAB, B, T, N_LAYERS = 101, 4, 12, 3


def tiny(seed: int = 0) -> LlamaForCausalLM:
    """A seeded random 3-block Llama in eval mode, fp32."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny()


@pytest.fixture
def ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(
        0, VOCAB, (B, T), generator=g
    )


def logits(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


def hook_counts(model: LlamaForCausalLM) -> list[tuple[int, int]]:
    return [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in decoder_layers(model)[1]]


# --------------------------------------------------------------------------- capture_states


def test_capture_matches_hf_hidden_states(model, ids):
    base, _ = ids
    with torch.no_grad(), capture_states(model, range(N_LAYERS + 1)) as states:
        out = model(input_ids=base, output_hidden_states=True, use_cache=False)
    assert sorted(states) == list(range(N_LAYERS + 1))
    for i in range(N_LAYERS):  # 0 = embeddings, i = output of block i
        torch.testing.assert_close(states[i], out.hidden_states[i], rtol=0, atol=0)
    # HF's last entry is after the final norm; ours is the last block's raw output.
    torch.testing.assert_close(model.model.norm(states[N_LAYERS]), out.hidden_states[N_LAYERS])
    assert not torch.allclose(states[N_LAYERS], out.hidden_states[N_LAYERS])


# --------------------------------------------------------------------------- interchange


@pytest.mark.parametrize("layer", range(N_LAYERS + 1))
def test_swap_everywhere_reproduces_source(model, ids, layer):
    base, source = ids
    all_positions = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        swapped = interchange_logits(model, base, source, layer, all_positions)
        expected = logits(model, source)
        assert not torch.allclose(logits(model, base), expected)
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-5)


def test_swap_nowhere_leaves_base_unchanged(model, ids):
    base, source = ids
    no_positions = torch.zeros(B, T, dtype=torch.bool)
    with torch.no_grad():
        for layer in range(N_LAYERS + 1):
            swapped = interchange_logits(model, base, source, layer, no_positions)
            torch.testing.assert_close(swapped, logits(model, base), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [1, 2])
def test_swap_is_causal(model, ids, layer):
    base, source = ids
    k = 5
    positions = torch.zeros(B, T, dtype=torch.bool)
    positions[:, k] = True
    with torch.no_grad():
        swapped = interchange_logits(model, base, source, layer, positions)
        plain = logits(model, base)
    torch.testing.assert_close(swapped[:, :k], plain[:, :k], rtol=1e-6, atol=1e-6)
    later = (swapped[:, k:] - plain[:, k:]).abs().amax(dim=-1)  # (B, T - k)
    assert (later > 1e-4).all(), "every position from the swap on should change"


def test_swapped_states_show_in_hf_hidden_states(model, ids):
    """Our hooks run before HF's output-capturing hooks, so HF reports the swapped states."""
    base, _ = ids
    model(input_ids=base, output_hidden_states=True)  # installs HF's hooks on the blocks
    positions = sample_positions((B, T), "fraction", 0.5, torch.Generator().manual_seed(0))
    replacement = torch.randn(B, T, 32)
    with torch.no_grad(), interchange(model, 2, positions, replacement):
        out = model(input_ids=base, output_hidden_states=True, use_cache=False)
    got = out.hidden_states[2]
    torch.testing.assert_close(got[positions], replacement[positions], rtol=0, atol=0)
    assert not torch.allclose(got[~positions], replacement[~positions])


def test_gradients_through_kept_and_swapped_positions(model, ids):
    base, _ = ids
    positions = torch.zeros(B, T, dtype=torch.bool)
    positions[:, 3:6] = True
    source = torch.randn(B, T, 32, requires_grad=True)
    with interchange(model, 1, positions, source):
        logits(model, base).square().sum().backward()
    assert source.grad[positions].abs().sum(-1).gt(0).all()
    assert source.grad[~positions].eq(0).all()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # kept positions reach block 0


def test_hooks_removed_after_context_and_exception(model, ids):
    base, source = ids
    assert hook_counts(model) == [(0, 0)] * N_LAYERS
    positions = torch.ones(B, T, dtype=torch.bool)
    for layer in range(N_LAYERS + 1):
        with torch.no_grad(), capture_states(model, [layer, 0, layer]):
            assert sum(f + p for f, p in hook_counts(model)) == (1 if layer == 0 else 2)
            model(input_ids=base)
        assert hook_counts(model) == [(0, 0)] * N_LAYERS
        with (
            pytest.raises(RuntimeError, match="boom"),
            interchange(model, layer, positions, torch.zeros(B, T, 32)),
        ):
            raise RuntimeError("boom")
        assert hook_counts(model) == [(0, 0)] * N_LAYERS
    # An error raised inside the hook itself (source states of the wrong length).
    short = torch.ones(B, T - 1, dtype=torch.bool)
    with (
        pytest.raises(DistilleryError, match="states are"),
        torch.no_grad(),
        interchange(model, 2, short, torch.zeros(B, T - 1, 32)),
    ):
        model(input_ids=source)
    assert hook_counts(model) == [(0, 0)] * N_LAYERS


def test_bad_inputs_raise_one_clear_error(model, ids):
    base, source = ids
    positions = torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(DistilleryError, match=r"choose 0\.\.3"):
        interchange_logits(model, base, source, 4, positions)
    with pytest.raises(DistilleryError, match=r"choose 0\.\.3"), capture_states(model, [-1]):
        pass
    with (
        pytest.raises(DistilleryError, match="bool mask"),
        interchange(model, 1, positions.long(), torch.zeros(B, T, 32)),
    ):
        pass
    with (
        pytest.raises(DistilleryError, match="do not match"),
        interchange(model, 1, positions, torch.zeros(B, T + 1, 32)),
    ):
        pass
    with pytest.raises(DistilleryError, match="same shape"):
        interchange_logits(model, base, source[:, :-1], 1, positions)
    with pytest.raises(DistilleryError, match="at least 2"):
        pair_index(1)
    with pytest.raises(DistilleryError, match="choose one of"):
        sample_positions((B, T), "random")  # type: ignore[arg-type]
    with pytest.raises(DistilleryError, match="fraction"):
        sample_positions((B, T), "span", 0.0)
    assert hook_counts(model) == [(0, 0)] * N_LAYERS


def test_gradient_checkpointing_keeps_swap_on_recompute(ids):
    """transformers 5 checkpoints ``forward``, not ``__call__``: hooks stay outside the
    recomputation, so backward after leaving the context gives the same gradients."""
    base, source = ids
    positions = sample_positions((B, T), "span", 0.4, torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        m = tiny().train()
        if checkpointing:
            m.activation_checkpointing_enable()
        mlp, calls = m.model.layers[2].mlp, []
        mlp.forward = lambda x, f=mlp.forward, calls=calls: calls.append(1) or f(x)
        out = interchange_logits(m, base, source, 2, positions)
        assert len(calls) == 2  # source and base runs
        out.logsumexp(-1).sum().backward()
        assert len(calls) == (3 if checkpointing else 2)  # the base run's block 2 recomputed
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- IIT loss


def test_identical_student_has_zero_iit_loss(model, ids):
    base, source = ids
    student = copy.deepcopy(model)
    positions = sample_positions((B, T), "fraction", 0.5, torch.Generator().manual_seed(2))
    for layer in range(N_LAYERS + 1):
        loss = iit_loss(student, model, base, source, (layer, layer), positions, forward_kl)
        assert loss.ndim == 0
        assert abs(loss.item()) < 1e-5
    # A misaligned pair of the same weights is not a counterfactual match.
    assert iit_loss(student, model, base, source, (1, 2), positions, "forward_kl") > 1e-3


def test_iit_loss_is_the_sum_over_counted_positions(ids):
    base, source = ids
    teacher, student = tiny(0), tiny(1)
    positions = sample_positions((B, T), "span", 0.5, torch.Generator().manual_seed(4))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -3:] = False
    loss = iit_loss(student, teacher, base, source, (2, 1), positions, "jsd", mask=mask, beta=0.3)
    with torch.no_grad():
        s = interchange_logits(student, base, source, 2, positions).reshape(-1, VOCAB)
        t = interchange_logits(teacher, base, source, 1, positions).reshape(-1, VOCAB)
    per_row = [
        forward_kl(s[i : i + 1], t[i : i + 1], torch.ones(1, dtype=torch.bool))
        for i in range(B * T)
    ]
    kl = iit_loss(student, teacher, base, source, (2, 1), positions, mask=mask)
    torch.testing.assert_close(kl, torch.stack(per_row)[mask.reshape(-1)].sum())
    assert loss > 0 and kl > 0
    with pytest.raises(DistilleryError, match="divergence between"):
        iit_loss(student, teacher, base, source, (2, 1), positions, "ce")


@pytest.mark.parametrize("source_grad", [True, False])
def test_gradients_reach_the_student_only(ids, source_grad):
    base, source = ids
    teacher, student = tiny(0), tiny(1)
    positions = sample_positions((B, T), "fraction", 0.5, torch.Generator().manual_seed(5))
    loss = iit_loss(student, teacher, base, source, (1, 1), positions, source_grad=source_grad)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    student_grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is not None for g in student_grads.values())
    assert all(g.abs().sum() > 0 for g in student_grads.values())
    assert hook_counts(student) == hook_counts(teacher) == [(0, 0)] * N_LAYERS


def test_source_grad_adds_the_source_runs_gradient(ids):
    base, source = ids
    teacher = tiny(0)
    positions = torch.zeros(B, T, dtype=torch.bool)
    positions[:, 4:] = True
    embed_grads = []
    for source_grad in (False, True):
        student = tiny(1)
        iit_loss(
            student, teacher, base, source, (1, 1), positions, source_grad=source_grad
        ).backward()
        embed_grads.append(student.model.embed_tokens.weight.grad)
    only_in_source = sorted(set(source[:, 4:].flatten().tolist()) - set(base.flatten().tolist()))
    assert only_in_source, "the test needs a token that appears only in the source's span"
    assert embed_grads[0][only_in_source].eq(0).all()
    assert embed_grads[1][only_in_source].abs().sum(-1).gt(0).all()


# --------------------------------------------------------------------------- pairing, sampling


def test_pair_batch_is_a_derangement():
    input_ids = torch.arange(8)[:, None].expand(8, 5)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        base, source = pair_batch(input_ids, g)
        assert base is input_ids
        rows = source[:, 0]
        assert sorted(rows.tolist()) == list(range(8))
        assert (rows != torch.arange(8)).all()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(pair_index(8, g1), pair_index(8, g2))


def test_sample_positions_statistics():
    shape = (256, 128)
    g = torch.Generator().manual_seed(0)
    assert sample_positions(shape, "all").all()
    for fraction in (0.1, 0.3, 0.8):
        mask = sample_positions(shape, "fraction", fraction, g)
        assert mask.shape == shape and mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - fraction) < 0.01

    span = sample_positions(shape, "span", 0.25, g)
    assert (span.sum(1) == 32).all()
    edges = span.int().diff(dim=1, prepend=torch.zeros(shape[0], 1, dtype=torch.int32))
    assert (edges.eq(1).sum(1) == 1).all(), "each row is one contiguous run"
    starts = span.int().argmax(1)
    assert starts.unique().numel() > 50  # starts spread over the row
    assert starts.max() <= 128 - 32
    assert sample_positions((3, 5), "span", 0.01, g).sum(1).eq(1).all()  # at least one position

    a = sample_positions(shape, "fraction", 0.5, torch.Generator().manual_seed(9))
    b = sample_positions(shape, "fraction", 0.5, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
