"""Prompt/completion data: JSONL records, chat conversations through a template, the BBC News
prompt set, a deterministic held-out split, and padded rows whose loss is on the completion.

A row is ``prompt tokens + completion tokens``, right-padded to ``seq_len``; its labels are the
next tokens of the completion only (the prompt and the padding carry ``IGNORE_INDEX``), so
position ``P - 1`` (the prompt's last token) predicts the completion's first. The prompt keeps
its last ``prompt_tokens`` tokens when it is longer; the completion is cut to what is left.

Chat records (``messages``: ``role`` and ``content``) become one prompt and one completion: the
last message must be the assistant's and is the completion; everything before it, earlier
assistant turns included, is the prompt (no loss on it). A tokenizer's own ``chat_template`` is
used when it has one; otherwise (the lab's BPE tokenizers) ``plain_chat_prompt``: each
message as ``<|role|>`` on a line, then its content and a newline, and the prompt ends with
``<|assistant|>`` and a newline (plain text markers, not special tokens).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillery.data.labelled import TensorRows
from distillery.data.packed import IGNORE_INDEX, _encode
from distillery.data.sources import BBC_NEWS, bbc_news_labelled, iter_jsonl, split_documents
from distillery.errors import DistilleryError

ROLES = ("system", "user", "assistant")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")


@dataclass(frozen=True)
class PromptRecord:
    """One example as text: what the model is given and the reference continuation."""

    prompt: str
    completion: str


def plain_chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The plain template of ``messages`` followed by the assistant's turn marker."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def render_chat(
    messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase | None, where: str = ""
) -> PromptRecord:
    """(prompt, completion) text of a conversation whose last message is the assistant's."""
    where = f"{where}: " if where else ""
    if not messages:
        raise DistilleryError(f"{where}'messages' is empty: give at least a user and an assistant")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DistilleryError(
                f"{where}message {i} must be an object with a string 'content' and a 'role'"
            )
        if message.get("role") not in ROLES:
            raise DistilleryError(
                f"{where}message {i} has role {message.get('role')!r}; "
                f"use one of {', '.join(ROLES)}"
            )
    if messages[-1]["role"] != "assistant":
        raise DistilleryError(
            f"{where}the last message is the {messages[-1]['role']}'s: end each conversation "
            "with the assistant's reply (it is the completion)"
        )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return PromptRecord(plain_chat_prompt(plain[:-1]), plain[-1]["content"])
    assert tokenizer is not None
    prompt = tokenizer.apply_chat_template(plain[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(plain, tokenize=False)
    if not full.startswith(prompt):
        raise DistilleryError(
            f"{where}the tokenizer's chat template does not render the conversation's start as "
            "a prefix of the whole, so the assistant's reply cannot be cut out"
        )
    return PromptRecord(prompt, full[len(prompt) :])


def _record(obj: dict[str, Any], fields: tuple[str, str, str], where: str, tokenizer: Any,
            need_completion: bool) -> PromptRecord:  # fmt: skip
    """One JSON object as a record (``fields``: prompt, completion, messages)."""
    prompt_field, completion_field, messages_field = fields
    if messages_field in obj:
        if not isinstance(obj[messages_field], list):
            raise DistilleryError(f"{where}: '{messages_field}' must be a list of messages")
        return render_chat(obj[messages_field], tokenizer, where)
    keys = ", ".join(map(str, obj)) or "none"
    wanted = [prompt_field, completion_field] if need_completion else [prompt_field]
    for name in wanted:
        if name not in obj:
            raise DistilleryError(
                f"{where}: no field '{name}' (keys present: {keys}); give '{prompt_field}' and "
                f"'{completion_field}', or '{messages_field}'"
            )
    values = [obj.get(prompt_field), obj.get(completion_field, "")]
    for name, value in zip((prompt_field, completion_field), values, strict=True):
        if not isinstance(value, str):
            raise DistilleryError(
                f"{where}: field '{name}' must be a string, got {type(value).__name__}"
            )
    if not values[0].strip():
        raise DistilleryError(f"{where}: the prompt is empty")
    return PromptRecord(values[0], values[1])


def load_prompt_records(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    need_completion: bool = True,
) -> list[PromptRecord]:
    """Records of a JSONL file or a folder of them (each line ``prompt``/``completion`` or
    ``messages``), or the BBC News prompt set for ``bbc-news``. A bad line is one error naming
    its file and line."""
    if str(source) == BBC_NEWS:
        return bbc_news_prompts()
    path = Path(source)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or any(f.suffix.lower() != ".jsonl" or not f.is_file() for f in files):
        raise DistilleryError(
            f"prompt data '{source}': give 'bbc-news', a .jsonl file or a folder of them (e.g. "
            f"`distillery generate` shards) with '{prompt_field}'/'{completion_field}' or "
            f"'{messages_field}' on each line"
        )
    fields = (prompt_field, completion_field, messages_field)
    records = [
        _record(obj, fields, f"{file}, line {number}", tokenizer, need_completion)
        for file in files
        for number, obj in iter_jsonl(file)
    ]
    if not records:
        raise DistilleryError(f"prompt data '{source}' has no records")
    return records


def article_prompt(article: str, max_chars: int = 600) -> PromptRecord | None:
    """An article's headline (first line) and first sentence as the prompt, and the text
    after it, cut at a word boundary within ``max_chars``, as the reference completion."""
    headline, _, body = article.partition("\n")
    body_start = len(headline) + 1 + (len(body) - len(body.lstrip()))
    match = _SENTENCE_END.search(article, body_start)
    if not headline.strip() or match is None:
        return None
    cut = match.end()
    rest = article[cut : cut + max_chars + 1]
    if len(rest) > max_chars:
        rest = rest[: max(rest.rfind(" "), 1)]
    rest = rest.rstrip()
    return PromptRecord(article[:cut], rest) if rest.strip() else None


def bbc_news_prompts(max_chars: int = 600) -> list[PromptRecord]:
    """The embedded corpus's prompt set: one record per article (``article_prompt``)."""
    made = (article_prompt(text, max_chars) for text, _ in bbc_news_labelled())
    return [r for r in made if r is not None]


def split_prompts(
    records: list[PromptRecord], val_fraction: float, test_fraction: float
) -> dict[str, list[PromptRecord]]:
    """Train/val/test by a hash of each prompt (``split_documents``): deterministic,
    order-independent, the same prompt always on one side."""
    order = split_documents([r.prompt for r in records], val_fraction, test_fraction)
    split_of = {prompt: name for name, prompts in order.items() for prompt in prompts}
    out: dict[str, list[PromptRecord]] = {"train": [], "val": [], "test": []}
    for record in records:
        out[split_of[record.prompt]].append(record)
    return out


def bbc_news_prompt_splits(
    val_fraction: float, test_fraction: float, max_chars: int = 600
) -> dict[str, list[PromptRecord]]:
    """The BBC prompt set split as the language-model data is: by article (``split_documents``
    over the articles), so held-out prompts come from articles no run trained on."""
    articles = split_documents([t for t, _ in bbc_news_labelled()], val_fraction, test_fraction)
    return {
        name: [r for r in map(lambda a: article_prompt(a, max_chars), docs) if r is not None]
        for name, docs in articles.items()
    }


@dataclass
class PromptExamples(TensorRows):
    """Rows ``prompt + completion`` right-padded to ``seq_len``; labels on the completion only.

    ``ids``/``labels`` ``(N, T)``; ``prompt_lengths`` ``(N,)`` (the prompt's tokens, bos
    included); the engine reads ``examples``, generation ``prompt_ids``.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: torch.Tensor
    records: list[PromptRecord]
    truncated: int  # rows whose prompt or completion was cut
    digest: str
    name: str = "prompts"
    pad_token_id: int = 0

    @property
    def identity(self) -> str:
        return f"{self.name}/{self.digest[:16]}/{self.num_blocks}x{self.seq_len}"

    def prompt_ids(self, indices: Sequence[int] | np.ndarray) -> list[list[int]]:
        """Each row's prompt tokens (no padding), for generation."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        return [self.ids[i, : int(self.prompt_lengths[i])].tolist() for i in rows]


def prompt_tokens_of(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A prompt's tokens: the tokenizer's bos first (when it has one and the text does not
    already begin with it, as a chat template's may), then the text's."""
    ids = _encode(tokenizer, [text])[0]
    bos = tokenizer.bos_token_id
    if bos is not None and not (ids and ids[0] == bos):
        ids = [bos, *ids]
    return list(ids)


def encode_prompts(
    records: list[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    prompt_tokens: int | None = None,
    name: str = "prompts",
    eos_after_completion: bool = True,
) -> PromptExamples:
    """Token rows of ``records`` (module docstring). ``prompt_tokens`` (default ``seq_len //
    2``) caps the prompt, keeping its end; eos follows each completion that is not cut."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise DistilleryError("the tokenizer needs an eos and a pad token for prompt data")
    cap = seq_len // 2 if prompt_tokens is None else prompt_tokens
    if not 1 <= cap < seq_len:
        raise DistilleryError(
            f"data.prompt_tokens={cap} must be at least 1 and below data.seq_len={seq_len}, "
            "leaving room for the completion"
        )
    ids = torch.full((len(records), seq_len), pad, dtype=torch.int64)
    labels = torch.full_like(ids, IGNORE_INDEX)
    lengths = torch.zeros(len(records), dtype=torch.int64)
    completions = _encode(tokenizer, [r.completion for r in records])
    digest, truncated = hashlib.sha256(f"{seq_len}\0{cap}".encode()), 0
    for row, (record, completion) in enumerate(zip(records, completions, strict=True)):
        prompt = prompt_tokens_of(tokenizer, record.prompt)
        tail = [*completion, eos] if eos_after_completion else list(completion)
        cut = len(prompt) > cap or len(prompt[-cap:]) + len(tail) > seq_len
        prompt = prompt[-cap:]
        tail = tail[: seq_len - len(prompt)]
        truncated += cut
        full = torch.tensor([*prompt, *tail], dtype=torch.int64)
        ids[row, : full.numel()] = full
        p = len(prompt)
        labels[row, p - 1 : p - 1 + len(tail)] = full[p:]  # position t predicts token t+1
        lengths[row] = p
        digest.update(np.asarray(full, dtype=np.int64).tobytes() + b"\0" + p.to_bytes(4, "little"))
    return PromptExamples(ids, labels, lengths, list(records), truncated, digest.hexdigest(),
                          name, pad)  # fmt: skip
