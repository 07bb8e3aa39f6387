"""Prompt/completion and chat data: templates, rows whose loss is on the completion only, the
BBC prompt set, the held-out split, and bad input as one error line naming the line."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from distillery.data import (
    IGNORE_INDEX,
    PromptRecord,
    bbc_news_labelled,
    encode_prompts,
    load_prompt_records,
    render_chat,
    split_documents,
    split_prompts,
    train_bpe_tokenizer,
)
from distillery.data.prompts import article_prompt, bbc_news_prompt_splits
from distillery.errors import DistilleryError
from distillery.objectives.logits import cross_entropy
from tests.conftest import run_cli

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def write_prompt_file(corpus: Path, dest: Path, max_chars: int = 300) -> Path:
    """The test corpus's articles as prompt/completion JSONL (headline + first sentence)."""
    with dest.open("w", encoding="utf-8") as out:
        for line in corpus.read_text(encoding="utf-8").splitlines():
            record = article_prompt(json.loads(line)["text"], max_chars)
            if record is not None:
                out.write(json.dumps({"prompt": record.prompt, "completion": record.completion}))
                out.write("\n")
    return dest


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    docs = ["the cat sat on the mat", "a dog ran in the park", "Paris is in France"] * 20
    return train_bpe_tokenizer(docs, 300, tmp_path_factory.mktemp("bpe") / "tok")


def test_plain_template_renders_a_conversation_by_hand():
    record = render_chat(CONVERSATION, None)
    assert record.prompt == (
        "<|system|>\nBe brief.\n<|user|>\nCapital of France?\n<|assistant|>\nParis.\n"
        "<|user|>\nAnd of Italy?\n<|assistant|>\n"
    )
    assert record.completion == "Rome."


def test_a_tokenizers_own_chat_template_is_used(bpe):
    tok = copy.deepcopy(bpe)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    record = render_chat(CONVERSATION[1:3], tok)
    assert record.prompt == "[user]Capital of France?[/][assistant]"
    assert record.completion == "Paris.[/]"


def test_rows_carry_loss_on_completion_tokens_only(bpe):
    records = [PromptRecord("the cat", " sat on the mat"), PromptRecord("a dog ran in", " the")]
    data = encode_prompts(records, bpe, 16, prompt_tokens=6)
    eos, bos, pad = bpe.eos_token_id, bpe.bos_token_id, bpe.pad_token_id
    for row, record in enumerate(records):
        prompt = [bos, *bpe(record.prompt, add_special_tokens=False).input_ids]
        completion = [*bpe(record.completion, add_special_tokens=False).input_ids, eos]
        p = len(prompt)
        assert int(data.prompt_lengths[row]) == p
        expected_ids = [*prompt, *completion] + [pad] * (16 - p - len(completion))
        assert data.ids[row].tolist() == expected_ids
        # by hand: label t is token t+1 exactly where token t+1 belongs to the completion
        expected = [
            expected_ids[t + 1] if p <= t + 1 < p + len(completion) else IGNORE_INDEX
            for t in range(16)
        ]
        assert data.labels[row].tolist() == expected
    # a loss on these rows gives the prompt positions' logits no gradient
    logits = torch.randn(2 * 16, 300, requires_grad=True)
    labels = data.labels.reshape(-1)
    cross_entropy(logits, labels, labels != IGNORE_INDEX).backward()
    prompt_rows = torch.cat([torch.arange(int(p) - 1) + 16 * i
                             for i, p in enumerate(data.prompt_lengths)])  # fmt: skip
    assert logits.grad[prompt_rows].abs().max() == 0
    assert data.prompt_ids([1]) == [[bos, *bpe("a dog ran in", add_special_tokens=False).input_ids]]


def test_long_prompts_keep_their_end_and_completions_are_cut(bpe):
    long_prompt = " ".join(["the cat sat on the mat"] * 5)
    data = encode_prompts([PromptRecord(long_prompt, " a dog ran in the park" * 3)], bpe, 12,
                          prompt_tokens=4)  # fmt: skip
    prompt = bpe(long_prompt, add_special_tokens=False).input_ids
    assert data.ids[0, :4].tolist() == prompt[-4:]
    assert data.truncated == 1
    assert (data.labels[0] != IGNORE_INDEX).sum() == 12 - 4 - 1 + 1  # up to the last position
    assert data.labels[0, -1] == IGNORE_INDEX  # the last position has no next token
    with pytest.raises(DistilleryError, match="prompt_tokens"):
        encode_prompts([PromptRecord("a", "b")], bpe, 8, prompt_tokens=8)


def test_bbc_prompts_are_headline_and_first_sentence():
    article = "Markets rally\n\nShares rose on Monday. Traders were pleased, said one analyst."
    record = article_prompt(article, max_chars=25)
    expected = PromptRecord("Markets rally\n\nShares rose on Monday.", " Traders were pleased,")
    assert record == expected
    assert article_prompt("Only a headline", 100) is None
    splits = bbc_news_prompt_splits(0.05, 0.05)
    articles = split_documents(
        [t for t, _ in bbc_news_labelled()],
        0.05,
        0.05,
    )
    held_out = {article_prompt(a).prompt for a in articles["val"] if article_prompt(a)}
    assert {r.prompt for r in splits["val"]} == held_out  # from held-out articles only
    assert len(splits["train"]) > 1900 and splits["val"] and splits["test"]


def test_the_split_is_deterministic_and_order_independent():
    records = [PromptRecord(f"prompt {i}", f" completion {i}") for i in range(200)]
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    a, b = split_prompts(records, 0.1, 0.1), split_prompts(shuffled, 0.1, 0.1)
    for name in a:
        assert sorted(r.prompt for r in a[name]) == sorted(r.prompt for r in b[name])
    assert 5 < len(a["val"]) < 40


def test_chat_and_prompt_records_from_jsonl(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}) + "\n\n"
        + json.dumps({"messages": CONVERSATION[1:3]}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    records = load_prompt_records(path)
    assert records[0] == PromptRecord("Q: 2+2?", " 4")
    assert records[1] == PromptRecord("<|user|>\nCapital of France?\n<|assistant|>\n", "Paris.")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ({"prompt": "hello"}, "line 2: no field 'completion'"),
        ({"messages": []}, "line 2: 'messages' is empty"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "line 2: message 0 has role 'robot'"),
        ({"messages": CONVERSATION[:2]}, "line 2: the last message is the user's"),
        ({"prompt": "hi", "completion": 3}, "line 2: field 'completion' must be a string"),
        ({"prompt": " ", "completion": "x"}, "line 2: the prompt is empty"),
    ],
)
def test_bad_records_name_their_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "a", "completion": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(DistilleryError, match=match):
        load_prompt_records(path)


def test_a_missing_completion_is_one_cli_line(tmp_path, cache_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', encoding="utf-8")
    out = tmp_path / "out"
    proc = run_cli("train", "--data", str(path), "--out", str(out), "data.task=prompts",
                   f"data.cache_dir={cache_dir}", "model.preset=tiny")  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distillery: error: ")
    assert "line 2: no field 'completion'" in lines[0]
    assert not any(out.glob("*")) if out.exists() else True
