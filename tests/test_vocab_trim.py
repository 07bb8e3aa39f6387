"""Vocabulary trimming: the trimmed tokenizer and model agree with the teacher's, and a trimmed
student distils from its untrimmed teacher over its own tokens (the teacher conditioned on them).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distillery.errors import DistilleryError
from distillery.models.vocab_trim import (
    kept_tokens,
    load_vocab_map,
    save_vocab_map,
    trim_model,
    trim_tokenizer,
)
from tests.test_families import family_tokenizer

OTHER_TEXT = [
    "Zyzzyva quokkas juxtapose wolfram — naïve façades cost €12,345.67 ✓ 🚀 日本語のテキスト",
    "  leading spaces, tabs\tand\nnewlines; UPPER lower MiXeD 0x1F <not special>",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    from distillery.data import bbc_news_labelled

    return [text for text, _ in bbc_news_labelled()[::45]]


def _with_string_merges(tokenizer: Any) -> PreTrainedTokenizerFast:
    """The same tokenizer with merges stored as ``"a b"`` strings and a Sequence post-processor
    around its template (the other layouts ``tokenizer.json`` files use)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    backend = Tokenizer.from_str(json.dumps(spec))
    template = backend.post_processor
    backend.post_processor = processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), template]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        clean_up_tokenization_spaces=False,
    )


@pytest.mark.parametrize("layout", ["llama", "qwen2", "llama-string-merges"])
def test_trimmed_tokenizer_is_the_teachers_on_the_corpus_and_round_trips_other_text(
    layout: str, docs: list[str]
):
    """On corpus text: exactly the teacher's ids, renumbered (specials added by the template
    included); on other text: only kept ids, decoding to the teacher's text."""
    teacher = family_tokenizer(layout.split("-")[0], docs, vocab_size=1500)
    if layout.endswith("string-merges"):
        teacher = _with_string_merges(teacher)
    corpus = docs[:6]
    kept = kept_tokens(teacher, corpus)
    assert kept == sorted(set(kept)) and len(kept) < len(teacher)
    assert set(teacher.all_special_ids) <= set(kept)
    trimmed = trim_tokenizer(teacher, kept)
    new_id = {t: i for i, t in enumerate(kept)}
    assert len(trimmed) == len(kept)
    assert (trimmed.eos_token, trimmed.bos_token) == (teacher.eos_token, teacher.bos_token)
    assert trimmed.eos_token_id == new_id[teacher.eos_token_id]
    for text in corpus:
        assert trimmed(text).input_ids == [new_id[t] for t in teacher(text).input_ids]
    for text in [*OTHER_TEXT, *docs[20:26]]:
        ids = trimmed(text).input_ids
        assert max(ids) < len(kept)
        assert trimmed.decode(ids) == teacher.decode(teacher(text).input_ids)


def test_min_count_keeps_fewer_tokens_and_every_merge_input(docs: list[str]):
    teacher = family_tokenizer("qwen2", docs, vocab_size=1500)
    once, often = kept_tokens(teacher, docs[:6]), kept_tokens(teacher, docs[:6], min_count=5)
    assert set(often) < set(once)
    spec = json.loads(teacher.backend_tokenizer.to_str())["model"]
    vocab, kept = spec["vocab"], set(often)
    for a, b in spec["merges"]:
        if vocab[a + b] in kept:
            assert vocab[a] in kept and vocab[b] in kept
    trimmed = trim_tokenizer(teacher, often)
    assert trimmed.decode(trimmed(OTHER_TEXT[0]).input_ids) == OTHER_TEXT[0]
    rounded = kept_tokens(teacher, docs[:6], multiple_of=64)
    assert len(rounded) % 64 == 0 and set(once) <= set(rounded)
    assert len(rounded) - len(once) < 64 + 8  # the most frequent others, with a few inputs
    trimmed = trim_tokenizer(teacher, rounded)
    new_id = {t: i for i, t in enumerate(rounded)}
    for text in docs[:6]:
        assert trimmed(text).input_ids == [new_id[t] for t in teacher(text).input_ids]


def test_a_non_bpe_tokenizer_and_bad_kept_lists_are_refused_in_one_line(docs: list[str]):
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    with pytest.raises(DistilleryError, match=r"BPE tokenizers only.*WordLevel") as err:
        kept_tokens(PreTrainedTokenizerFast(tokenizer_object=words), ["the"])
    assert "\n" not in str(err.value)
    teacher = family_tokenizer("qwen2", docs, vocab_size=600)
    with pytest.raises(DistilleryError, match="not closed under BPE merges"):
        trim_tokenizer(teacher, [*range(300), len(teacher) - 1])
    with pytest.raises(DistilleryError, match="strictly increasing"):
        trim_tokenizer(teacher, [3, 2])


def _tiny(family: str, vocab: int) -> Any:
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=vocab,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=3, bos_token_id=5,
                  eos_token_id=[7, 8])  # fmt: skip
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied, tied
def test_trimmed_logits_are_the_teachers_gathered_at_the_kept_columns(family: str, tmp_path):
    teacher = _tiny(family, 123)
    drawn = torch.randperm(123, generator=torch.Generator().manual_seed(1))[:40].tolist()
    kept = sorted((set(drawn) - {5, 8}) | {3, 7})  # pad 3 and eos 7 kept, bos 5 and eos 8 not
    student = trim_model(teacher, kept).eval()
    assert teacher.get_input_embeddings().weight.shape[0] == 123  # the teacher is untouched
    new_id = {t: i for i, t in enumerate(kept)}
    ids = torch.randint(0, len(kept), (3, 11), generator=torch.Generator().manual_seed(2))
    columns = torch.tensor(kept)
    with torch.no_grad():
        expected = teacher(input_ids=columns[ids]).logits[..., columns]  # (B, T, K)
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    config = student.config
    assert (config.vocab_size, config.pad_token_id) == (len(kept), new_id[3])
    assert config.bos_token_id is None and config.eos_token_id == [new_id[7]]
    tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert tied == (family == "qwen2")
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, got)
    save_vocab_map(tmp_path, kept, 123)
    assert load_vocab_map(tmp_path) == kept and load_vocab_map(tmp_path / "nowhere") is None


def test_the_mapped_teacher_answers_the_same_whole_or_chunk_by_chunk():
    from distillery.teachers import LiveTeacher
    from distillery.teachers.vocab_map import VocabMappedTeacher

    teacher = _tiny("llama", 97)
    kept = list(range(0, 97, 3))
    mapped = VocabMappedTeacher(LiveTeacher(teacher), kept)
    ids = torch.randint(0, len(kept), (2, 9), generator=torch.Generator().manual_seed(0))
    whole = mapped.run(ids, hidden_states=True)
    assert whole.logits is not None and whole.logits.shape == (2, 9, len(kept))
    chunks = mapped.run(ids, logits=False).chunk_logits
    assert chunks is not None
    torch.testing.assert_close(torch.cat([chunks(slice(0, 5)), chunks(slice(5, 18))]),
                               whole.logits.reshape(18, -1))  # fmt: skip
    direct = teacher(input_ids=torch.tensor(kept)[ids], output_hidden_states=True)
    torch.testing.assert_close(whole.hidden_states[-1], direct.hidden_states[-1])


# ----------------------------------------------------------------- prune → distil → export


@pytest.fixture(scope="module")
def trimmed(docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Qwen2 teacher (2,000-word BPE, 64 padding rows, tied) → ``prune`` to 1 layer with its
    vocabulary trimmed to a corpus."""
    from distillery.recipes.prune import PruneConfig, prune

    root = tmp_path_factory.mktemp("vocab-trim")
    tokenizer = family_tokenizer("qwen2", docs, vocab_size=2000)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer) + 64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, initializer_range=0.3,  # peaked logits
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    teacher = root / "teacher"
    Qwen2ForCausalLM(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    source = root / "docs.txt"
    source.write_text("\n\n".join(d.split("\n\n")[1][:500] for d in docs[:30]), encoding="utf-8")
    data = {"source": str(source), "seq_len": 16, "batch_size": 2, "batches": 2,
            "cache_dir": str(root / "cache")}  # fmt: skip
    summary = prune(PruneConfig.model_validate({
        "teacher": str(teacher), "out": str(root / "pruned"), "data": data,
        "target": {"layers": 1}, "vocab": {"min_count": 1, "repeats": 2},
    }))  # fmt: skip
    return {"root": root, "teacher": teacher, "source": source, "summary": summary,
            "student": root / "pruned" / "model", "vocab": len(tokenizer)}  # fmt: skip


def test_prune_with_vocab_writes_a_trimmed_student_and_reports_the_gain(trimmed: dict[str, Any]):
    trim = trimmed["summary"]["vocab_trim"]
    kept = load_vocab_map(trimmed["student"])
    assert kept is not None and trim["vocab_size_after"] == len(kept) < trimmed["vocab"]
    assert trim["vocab_size_before"] == trimmed["vocab"] + 64  # the padding rows go too
    assert trim["teacher_tokenizer_size"] == trimmed["vocab"]
    assert trim["params_after"] < trim["params_before"]
    assert trim["compute_params_after"] < trim["compute_params_before"]
    assert trim["size_on_disk_after"] < trim["size_on_disk_before"]
    assert trim["trim_speedup"] > 0 and trim["timing"]["repeats"] == 2
    assert trimmed["summary"]["params"] == trim["params_after"]
    saved = json.loads((trimmed["student"] / "vocab_map.json").read_text())
    assert saved == {"teacher_ids": kept, "teacher_vocab_size": trimmed["vocab"]}
    student = AutoModelForCausalLM.from_pretrained(trimmed["student"])
    assert student.config.vocab_size == len(kept) and student.config.num_hidden_layers == 1
    assert not (trimmed["root"] / "pruned" / ".untrimmed-size").exists()


def _distil_config(trimmed: dict[str, Any], student: Path, out: Path, **teacher: Any) -> Any:
    from distillery.config import RunConfig

    return RunConfig.model_validate({
        "data": {"source": str(trimmed["source"]), "seq_len": 16, "val_fraction": 0.1,
                 "cache_dir": str(trimmed["root"] / "cache")},
        "teacher": {"path": str(trimmed["teacher"]), "precision": "fp32", **teacher},
        "model": {"path": str(student)},
        "objectives": [{"kind": "forward_kl", "temperature": 1.0}],
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "logit_chunk_size": 8,
                  "eval_batches": 1, "log_every": 1, "tensorboard": False,
                  "generation_tokens": 4, "draft_prompts": 2, "seed": 0},
        "out": str(out),
    })  # fmt: skip


def _hand_loss(cfg: Any, trimmed: dict[str, Any], columns: str = "kept") -> float:
    """Step 1's forward KL, by hand: the first global batch, the teacher on the kept ids,
    softmax over its kept columns (or, wrongly, its first K) against the untrained student's."""
    from distillery.data import global_batch_indices
    from distillery.distributed import DistEnv
    from distillery.recipes.common import prepare_data

    _, train, _ = prepare_data(cfg.data, DistEnv(), trimmed["student"])
    ids, labels = train.examples(global_batch_indices(train.num_blocks, 0, 2, 0))
    kept = torch.tensor(load_vocab_map(trimmed["student"]))
    teacher = AutoModelForCausalLM.from_pretrained(trimmed["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(trimmed["student"]).eval()
    with torch.no_grad():
        full = teacher(input_ids=kept[ids]).logits  # (B, T, V + padding)
        chosen = full[..., kept] if columns == "kept" else full[..., : len(kept)]
        p = torch.log_softmax(chosen.double(), -1)
        q = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)  # (B, T)
    mask = labels != -100
    return float(kl[mask].mean())


def test_a_trimmed_student_distils_from_its_teacher_and_exports(trimmed: dict[str, Any], tmp_path):
    """2 chunked steps of forward KL: step 1's loss is KL(teacher at the kept columns ‖ student)
    computed by hand; the exported folder reloads with plain Auto classes and generates."""
    from distillery.recipes.run import run

    out = tmp_path / "run"
    cfg = _distil_config(trimmed, trimmed["student"], out)
    summary = run(cfg, name="distill")
    assert summary["finished"] and summary["steps"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(_hand_loss(cfg, trimmed), rel=1e-4)
    assert first["loss"] != pytest.approx(_hand_loss(cfg, trimmed, "first"), rel=1e-2)
    assert torch.isfinite(torch.tensor(summary["kl_teacher_student"]))
    exported = out / "model"
    kept = load_vocab_map(exported)
    assert kept == load_vocab_map(trimmed["student"])
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert model.config.vocab_size == len(tokenizer) == len(kept)
    teacher_tok = AutoTokenizer.from_pretrained(trimmed["teacher"])
    text = "The government said"
    assert [kept[i] for i in tokenizer(text).input_ids] == teacher_tok(text).input_ids
    prompt = tokenizer(text, return_tensors="pt")
    new = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert new.shape[1] == prompt.input_ids.shape[1] + 4
    assert isinstance(tokenizer.decode(new[0]), str)


def test_a_mismatched_vocab_map_and_unsupported_teachers_are_refused(
    trimmed: dict[str, Any], tmp_path
):
    from distillery.recipes.prune import PruneConfig
    from distillery.recipes.run import run
    from distillery.teachers.vocab_map import trimmed_student

    student = tmp_path / "student"
    shutil.copytree(trimmed["student"], student)
    kept = load_vocab_map(student)
    save_vocab_map(student, kept, trimmed["vocab"] + 1)
    with pytest.raises(DistilleryError, match=r"teacher vocabulary of .* but the teacher") as err:
        run(_distil_config(trimmed, student, tmp_path / "r1"), name="distill")
    assert "\n" not in str(err.value)
    cache = _distil_config(trimmed, trimmed["student"], tmp_path / "r2", kind="cache", cache="c")
    with pytest.raises(DistilleryError, match="teacher cache"):
        trimmed_student(cache)
    own = _distil_config(trimmed, trimmed["student"], tmp_path / "r3", tokenizer="own")
    with pytest.raises(DistilleryError, match="tokenizer: own"):
        trimmed_student(own)
    with pytest.raises(Exception, match="at least one of layers"):
        PruneConfig.model_validate({"teacher": "t", "out": "o"})
    assert PruneConfig.model_validate({"teacher": "t", "out": "o", "vocab": {}}).target.empty
