"""The model families users bring, built from their transformers config classes with random
weights at their real vocabulary sizes (small widths, 2 layers) and saved as folders with a
real tokenizer (a byte-level BPE trained on a few BBC articles, with the family's special
tokens and its way of adding them): each is loaded as a teacher, cut into a student, distilled
for 2 steps on the chunked path, exported and reloaded with plain ``AutoModelFor*``.

The tokenizers are smaller than the embedding tables (as Qwen 2.5's 151,665 tokens are smaller
than its 151,936 rows): the rows past the tokenizer are padding that no loss may count.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    RobertaConfig,
)

# name: (special tokens in id order, the role of each, the template around a text)
_SPECIALS: dict[str, tuple[dict[str, str], str | None]] = {
    "llama": ({"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}, "bos"),
    "qwen2": ({"eos": "<|endoftext|>", "pad": "<|pad|>"}, None),
    "gemma3": ({"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}, "bos"),
    "phi3": ({"unk": "<unk>", "bos": "<s>", "eos": "<|endoftext|>"}, None),
    "gpt2": ({"eos": "<|endoftext|>"}, None),
    "bert": (
        {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
        "cls-sep",
    ),
    "roberta": (
        {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
        "bos-eos",
    ),
}
ENCODERS = ("bert", "roberta")


def family_tokenizer(family: str, docs: list[str], vocab_size: int = 400) -> Any:
    """A real fast tokenizer for ``family``: byte-level BPE trained on ``docs``, its special
    tokens first, adding them around a text as the family's tokenizer does."""
    roles, template = _SPECIALS[family]
    names = list(roles.values())
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=names,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(docs, trainer=trainer)
    ids = {role: backend.token_to_id(tok) for role, tok in roles.items()}
    if template is not None:
        first, *last = template.split("-")
        single = " ".join([roles[first], "$A", *(roles[r] for r in last)])
        used = [(roles[r], ids[r]) for r in (first, *last)]
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=used)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{role}_token": tok for role, tok in roles.items()},
        clean_up_tokenization_spaces=False,
    )


def family_config(family: str, tokenizer: Any) -> Any:
    """The family's config at its real vocabulary size: hidden 32 (Gemma 3: 64), 2 layers."""
    special = {
        f"{role}_token_id": getattr(tokenizer, f"{role}_token_id")
        for role in ("bos", "eos", "pad")
        if getattr(tokenizer, f"{role}_token_id") is not None
    }
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":  # Llama 3: 128,256 words, untied head, grouped-query attention
        return LlamaConfig(
            vocab_size=128256, num_key_value_heads=2, tie_word_embeddings=False, **small, **special
        )
    if family == "qwen2":  # Qwen 2.5: a 151,936-row table for a smaller tokenizer, q/k/v bias
        return Qwen2Config(
            vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, **small, **special
        )
    if family == "gemma3":  # 262,144 words, tied and scaled embeddings, a sliding-window layer
        return Gemma3TextConfig(
            vocab_size=262144,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            **special,
        )
    if family == "phi3":  # fused qkv and gate_up projections
        return Phi3Config(vocab_size=32064, num_key_value_heads=4, **small, **special)
    if family == "gpt2":  # Conv1D projections, learned positions
        return GPT2Config(
            vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=256, **special
        )
    if family == "bert":  # post-norm encoder
        return BertConfig(vocab_size=30522, **small, **special)
    if family == "roberta":
        return RobertaConfig(vocab_size=50265, max_position_embeddings=258, **small, **special)
    raise KeyError(family)


def family_folder(family: str, docs: list[str], folder: Path, seed: int = 0) -> Path:
    """A random ``family`` model (seeded) and its tokenizer saved in ``folder``."""
    tokenizer = family_tokenizer(family, docs)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(family_config(family, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def docs() -> list[str]:
    from distillery.data import bbc_news_labelled

    return [text for text, _ in bbc_news_labelled()[::45]]


@pytest.fixture(scope="module")
def source(docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("family-data") / "docs.txt"
    # Short documents: a small validation split keeps the big-vocabulary evaluation quick.
    path.write_text("\n\n".join(d.split("\n\n")[1][:400] for d in docs[:40]), encoding="utf-8")
    return path


def _distil(source: Path, tmp: Path, teacher: Path, model: dict[str, Any], task: str) -> Path:
    """``distillery distill`` for 2 steps (causal LMs on the chunked path; the config refuses
    chunks for masked LMs); the exported student's folder."""
    from distillery.config import RunConfig
    from distillery.recipes.run import run

    cfg = RunConfig.model_validate(
        {
            "data": {"source": str(source), "seq_len": 16, "task": task,
                     "cache_dir": str(tmp / "cache"), "val_fraction": 0.1},
            "teacher": str(teacher),
            "model": model,
            "objectives": [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}],
            "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1,
                      "logit_chunk_size": 8 if task == "lm" else 0,  # chunks: causal LMs
                      "eval_batches": 1, "log_every": 1, "tensorboard": False,
                      "generation_tokens": 4, "draft_prompts": 2},
            "out": str(tmp / "run"),
        }
    )  # fmt: skip
    summary = run(cfg, name="distill")
    assert summary["finished"] and summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["val_loss"]))
    return tmp / "run" / "model"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "gpt2"])
def test_decoder_family_prune_distil_export_generate(family, docs, source, tmp_path):
    """Teacher folder → a student pruned from it (1 layer, half the MLP) → 2 distillation
    steps → export → plain ``AutoModelForCausalLM`` loads it and generates."""
    from transformers import AutoTokenizer

    from distillery.recipes.prune import PruneConfig, prune

    teacher = family_folder(family, docs, tmp_path / "teacher")
    rows = AutoModelForCausalLM.from_pretrained(teacher).get_input_embeddings().weight.shape[0]
    cut = prune(
        PruneConfig.model_validate(
            {
                "teacher": str(teacher),
                "out": str(tmp_path / "pruned"),
                "target": {"layers": 1, "intermediate_size": 32},
                "data": {"source": str(source), "seq_len": 16, "batch_size": 2, "batches": 2,
                         "cache_dir": str(tmp_path / "cache")},
            }
        )
    )  # fmt: skip
    assert cut["kept_layers"] in ([0], [1])
    exported = _distil(
        source, tmp_path, teacher, {"path": str(tmp_path / "pruned" / "model")}, "lm"
    )
    student = AutoModelForCausalLM.from_pretrained(exported)
    assert type(student).__name__ == type(AutoModelForCausalLM.from_pretrained(teacher)).__name__
    assert student.get_input_embeddings().weight.shape[0] == rows  # the table stays padded
    assert student.config.num_hidden_layers == 1
    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompt = tokenizer("The government said", return_tensors="pt")
    if _SPECIALS[family][1] == "bos":
        assert prompt.input_ids[0, 0] == tokenizer.bos_token_id
    out = student.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert out.shape[1] == prompt.input_ids.shape[1] + 5


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_family_distil_export_fill_mask(family, docs, source, tmp_path):
    """A BERT / RoBERTa masked-LM teacher at its real vocabulary → a small BERT student for 2
    chunked steps → plain ``AutoModelForMaskedLM`` loads it and fills a mask."""
    from transformers import AutoTokenizer

    teacher = family_folder(family, docs, tmp_path / "teacher")
    exported = _distil(source, tmp_path, teacher, {"preset": "bert-tiny"}, "mlm")
    student = AutoModelForMaskedLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = f"The government {tokenizer.mask_token} said"
    batch = tokenizer(text, return_tensors="pt")
    first, last = _SPECIALS[family][1].split("-")
    assert batch.input_ids[0, 0] == getattr(tokenizer, f"{first}_token_id")
    assert batch.input_ids[0, -1] == getattr(tokenizer, f"{last}_token_id")
    logits = student(**batch).logits
    where = (batch.input_ids[0] == tokenizer.mask_token_id).nonzero()[0, 0]
    assert logits.shape[-1] == family_config(family, tokenizer).vocab_size
    assert 0 <= int(logits[0, where, : len(tokenizer)].argmax()) < len(tokenizer)
