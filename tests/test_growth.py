"""Growth operators: identity growth preserves the function, stacking copies, both round-trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.errors import DistilleryError
from distillery.models.growth import grow_layers, stack_layers
from distillery.models.surgery import decoder_layers
from tests.conftest import tiny_llama


def _train_a_little(model) -> None:
    """Move the weights off their initialisation so zeros and copies are not trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("where", ["top", "interleave"])
def test_identity_growth_computes_the_same_function(where):
    torch.manual_seed(0)
    model = tiny_llama(101, layers=3)
    _train_a_little(model)
    ids = torch.randint(0, 101, (3, 17))
    before = _logits(model, ids)
    grow_layers(model, 2, where=where, identity=True)
    assert model.config.num_hidden_layers == 5 and len(decoder_layers(model)[1]) == 5
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)
    # Not identity: the same growth changes the function.
    other = tiny_llama(101, layers=3)
    _train_a_little(other)
    reference = _logits(other, ids)
    grow_layers(other, 2, where=where, identity=False)
    assert not torch.allclose(_logits(other, ids), reference, atol=1e-3)


def test_grown_layers_sit_where_asked_and_learn():
    model = tiny_llama(101, layers=3)
    _train_a_little(model)
    old = list(decoder_layers(model)[1])
    grow_layers(model, 2, where="interleave")
    layers = decoder_layers(model)[1]
    assert [layers[i] is old[j] for i, j in ((0, 0), (2, 1), (4, 2))] == [True] * 3
    new = layers[1]
    assert all(m not in old for m in (layers[1], layers[3]))
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2, 3, 4]
    assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    # Only the branch outputs start at zero; the rest is freshly initialised, not a copy.
    assert new.self_attn.q_proj.weight.std() > 0
    assert not torch.equal(new.self_attn.q_proj.weight, old[-1].self_attn.q_proj.weight)
    # Training signal reaches the new block: its output projections get gradients.
    model.train()
    ids = torch.randint(0, 101, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0
    assert new.mlp.down_proj.weight.grad.abs().sum() > 0


def test_stack_copies_the_blocks_and_the_result_round_trips(tmp_path):
    model = tiny_llama(101, layers=2)
    _train_a_little(model)
    stack_layers(model)
    layers = decoder_layers(model)[1]
    assert model.config.num_hidden_layers == 4
    for i in range(2):
        a, b = layers[i].state_dict(), layers[i + 2].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert layers[i].self_attn.q_proj.weight is not layers[i + 2].self_attn.q_proj.weight
    ids = torch.randint(0, 101, (2, 11))
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_hidden_layers == 4
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-6)


def test_bad_growth_is_refused():
    model = tiny_llama(101, layers=2)
    with pytest.raises(DistilleryError, match="must be ≥1"):
        grow_layers(model, 0)
    with pytest.raises(DistilleryError, match="interleave"):
        grow_layers(model, 3, where="interleave")
