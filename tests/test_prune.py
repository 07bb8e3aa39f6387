"""Pruning a teacher into a student: importance with hooks, exact cuts, the recipe's folder."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from distillery.errors import DistilleryError
from distillery.models.pruning import Shape, prune_model
from distillery.models.pruning_rank import find_layout, measure_importance

V = 128


def small(family: str, layers: int = 2, kv: int = 4, seed: int = 0, vocab: int = V) -> Any:
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, vocab_size=vocab)
    if family == "llama":
        return LlamaForCausalLM(
            LlamaConfig(num_attention_heads=4, num_key_value_heads=kv, **common)
        )
    if family == "phi3":
        return Phi3ForCausalLM(
            Phi3Config(num_attention_heads=4, num_key_value_heads=kv, pad_token_id=0, **common)
        )
    return GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_inner=48, n_layer=layers, n_head=4, vocab_size=V, n_positions=64)
    )


def ids(seed: int = 1, shape: tuple[int, int] = (3, 12)) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def zeroing(model: Any, plan: Any, layout: Any) -> list[Any]:
    """Hooks that zero, in the teacher, every head output and neuron the plan drops."""
    handles = []
    for i, block in enumerate(layout.layers):
        modules = dict(block.named_modules())
        keep_q = torch.zeros(layout.heads * layout.head_dim, dtype=torch.bool)
        for h in plan.heads[i]:
            keep_q[h * layout.head_dim : (h + 1) * layout.head_dim] = True
        keep_n = torch.zeros(layout.neurons, dtype=torch.bool)
        keep_n[plan.neurons[i]] = True
        for path, keep in ((layout.attn_out, keep_q), (layout.mlp_out, keep_n)):
            handles.append(
                modules[path].register_forward_pre_hook(
                    lambda _m, args, keep=keep: (args[0] * keep.to(args[0].dtype),)
                )
            )
    return handles


@pytest.mark.parametrize(
    ("family", "kv", "shape"),
    [
        ("llama", 4, Shape(num_attention_heads=2, intermediate_size=20)),
        ("llama", 2, Shape(num_attention_heads=2, intermediate_size=20)),  # grouped-query
        ("phi3", 4, Shape(num_attention_heads=3, intermediate_size=20)),  # fused projections
        ("gpt2", 4, Shape(intermediate_size=20)),  # Conv1D
    ],
)
def test_pruned_forward_equals_teacher_with_dropped_parts_zeroed(family, kv, shape):
    teacher = small(family, kv=kv).eval()
    importance = measure_importance(teacher, [ids(1), ids(2)])
    student, plan = prune_model(teacher, importance, shape)
    layout = find_layout(teacher)
    if shape.num_attention_heads:
        assert student.config.num_attention_heads == shape.num_attention_heads
        if kv == 2:  # each key/value group keeps one of its two query heads
            assert [h // 2 for h in plan.heads[0]] == [0, 1]
    # The kept heads and neurons are the most important ones of each layer.
    for i in range(len(layout.layers)):
        kept = importance.neurons[i][plan.neurons[i]]
        dropped = importance.neurons[i][~torch.isin(torch.arange(layout.neurons), plan.neurons[i])]
        assert kept.min() >= dropped.max()
    handles = zeroing(teacher, plan, layout)
    try:
        expected = teacher(ids(3)).logits
    finally:
        for h in handles:
            h.remove()
    assert not torch.allclose(expected, teacher(ids(3)).logits, atol=1e-4)  # zeroing matters
    torch.testing.assert_close(student.eval()(ids(3)).logits, expected, atol=2e-5, rtol=1e-4)


def test_depth_drops_the_blocks_that_turn_the_stream_least():
    teacher = small("llama", layers=3).eval()
    with torch.no_grad():  # block 1 adds nothing to the residual stream: an identity
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    importance = measure_importance(teacher, [ids(1)])
    assert importance.layers[1].item() == pytest.approx(0.0, abs=1e-6)
    assert (importance.layers[[0, 2]] > 0.01).all()
    # Written another way: the angle between hidden states before and after block 0.
    hidden = teacher(ids(1), output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hidden[0].double(), hidden[1].double(), dim=-1)
    assert importance.layers[0].item() == pytest.approx((cos.acos() / torch.pi).mean().item())
    student, plan = prune_model(teacher, importance, Shape(layers=2))
    assert plan.layers == [0, 2] and student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.eval()(ids(4)).logits, teacher(ids(4)).logits)


def test_importance_of_silent_and_scaled_neurons_heads_and_channels():
    teacher = small("llama").eval()
    with torch.no_grad():
        teacher.model.layers[0].mlp.up_proj.weight[5].zero_()  # neuron 5 is never active
        teacher.model.layers[1].self_attn.v_proj.weight[8:16].zero_()  # head 1 outputs zeros
        for norm in (teacher.model.layers[0].input_layernorm, teacher.model.norm):
            norm.weight[7] = 0.0
        for layer in teacher.model.layers:
            layer.input_layernorm.weight[7] = layer.post_attention_layernorm.weight[7] = 0.0
    before = measure_importance(teacher, [ids(1)])
    assert before.neurons[0, 5] == 0 and before.heads[1, 1] == 0 and before.channels[7] == 0
    with torch.no_grad():  # an activation three times larger is three times as important
        teacher.model.layers[0].mlp.up_proj.weight[9].mul_(3.0)
    after = measure_importance(teacher, [ids(1)])
    assert after.neurons[0, 9].item() == pytest.approx(3 * before.neurons[0, 9].item())
    others = torch.arange(48) != 9  # the layer's other neurons do not depend on neuron 9
    assert torch.equal(after.neurons[0, others], before.neurons[0, others])
    _, plan = prune_model(teacher, before, Shape(hidden_size=31, num_attention_heads=3))
    assert 7 not in plan.channels.tolist() and 1 not in plan.heads[1]
    assert 5 not in prune_model(teacher, before, Shape(intermediate_size=47))[1].neurons[0]


def test_shapes_a_family_cannot_take_are_refused_in_one_line():
    with pytest.raises(DistilleryError, match="multiple of 2"):
        prune_model(small("llama", kv=2), measure_importance(small("llama", kv=2), [ids()]),
                    Shape(num_attention_heads=3))  # fmt: skip
    gpt2 = small("gpt2")
    with pytest.raises(DistilleryError, match="head_dim = hidden_size / heads"):
        prune_model(gpt2, measure_importance(gpt2, [ids()]), Shape(hidden_size=16))
    student, _ = prune_model(  # GPT-2 can take heads and width together (head_dim 8 kept)
        gpt2, measure_importance(gpt2, [ids()]), Shape(hidden_size=16, num_attention_heads=2)
    )
    assert student(ids()).logits.shape == (3, 12, V)
    with pytest.raises(DistilleryError, match=r"target\.layers=5"):
        prune_model(gpt2, measure_importance(gpt2, [ids()]), Shape(layers=5))


@pytest.fixture(scope="module")
def docs() -> list[str]:
    from distillery.data import bbc_news_labelled

    return [text for text, _ in bbc_news_labelled()[::45]]


def test_prune_recipe_writes_a_folder_that_loads_and_generates(docs, tmp_path: Path):
    from transformers import AutoTokenizer

    from distillery.config.loader import build_config
    from distillery.recipes.prune import PruneConfig, prune
    from tests.test_families import family_folder, family_tokenizer

    teacher_dir = tmp_path / "teacher"
    tokenizer = family_tokenizer("llama", docs)
    small("llama", layers=3, kv=2, vocab=len(tokenizer)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    source = tmp_path / "calib.txt"
    source.write_text("\n\n".join(docs[:10]), encoding="utf-8")
    raw = {
        "teacher": str(teacher_dir),
        "out": str(tmp_path / "out"),
        "target": {"layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                   "intermediate_size": 32},
        "data": {"source": str(source), "seq_len": 16, "batch_size": 2, "batches": 3,
                 "cache_dir": str(tmp_path / "cache")},
    }  # fmt: skip
    summary = prune(PruneConfig.model_validate(raw))
    folder = tmp_path / "out" / "model"
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(
        json.dumps(summary)
    )
    assert summary["calibration_tokens"] == 3 * 2 * 16 and len(summary["kept_layers"]) == 2
    assert summary["params"] < summary["teacher_params"]
    student = AutoModelForCausalLM.from_pretrained(folder)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 24)
    assert student.num_parameters() == summary["params"]
    reloaded = AutoTokenizer.from_pretrained(folder)
    prompt = reloaded("The government said", return_tensors="pt").input_ids
    assert prompt[0, 0] == tokenizer.bos_token_id
    out = student.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, prompt.shape[1] + 4)

    with pytest.raises(DistilleryError, match="already holds a run"):
        prune(PruneConfig.model_validate(raw))
    with pytest.raises(DistilleryError, match="at least one of layers"):
        build_config(PruneConfig, None, [f"teacher={teacher_dir}", "out=x", "target={}"])
    bert = family_folder("bert", docs, tmp_path / "bert")
    with pytest.raises(DistilleryError, match="bidirectional 'bert' encoder"):
        prune(PruneConfig.model_validate({**raw, "teacher": str(bert), "out": str(tmp_path / "b")}))


def test_prune_study_builds_scratch_students_of_the_pruned_shapes(tmp_path: Path):
    """The study's random-init arms have the pruned students' shapes, parameter for parameter."""
    from distillery.models import build_model, load_pretrained
    from distillery.models.pruning import Shape, prune_model
    from distillery.models.pruning_rank import measure_importance
    from distillery.recipes.prune_study import PruneStudyConfig, _inits

    cfg = PruneStudyConfig.model_validate({
        "teacher": {"preset": "mini", "overrides": {"hidden_size": 64, "intermediate_size": 96}},
        "width": {"num_attention_heads": 2, "intermediate_size": 40},
    })  # fmt: skip
    teacher = build_model("mini", 300, cfg.teacher.overrides)
    importance = measure_importance(teacher, [ids(seed=s, shape=(2, 10)) for s in range(2)])
    folders = {}
    for name, shape in (("depth", Shape(layers=2)), ("width", Shape(**cfg.width.model_dump()))):
        student, _ = prune_model(teacher, importance, shape)
        student.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    inits = _inits(cfg, folders["depth"], folders["width"])
    for cut, scratch in (("depth", "scratch (depth shape)"), ("width", "scratch (width shape)")):
        pruned = load_pretrained(folders[cut], "student")
        spec = inits[scratch]
        fresh = build_model(spec.preset, 300, spec.overrides)
        assert fresh.num_parameters() == pruned.num_parameters()
        assert fresh.config.head_dim == pruned.config.head_dim == 16
    assert inits["every-other"].init_from_teacher == "every_other"
    assert inits["depth-pruned"].path == folders["depth"]
