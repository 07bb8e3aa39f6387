"""Vocabulary trimming: a student that keeps only the teacher's tokens a corpus uses.

A big-vocabulary teacher spends most of a small student's parameters (and its output layer's
time) on tokens a user's corpus never produces. ``kept_tokens`` picks the tokens to keep: those
the teacher's tokenizer makes of the corpus, every special or added token, the BPE base alphabet
(tokens no merge produces) and, recursively, both inputs of every merge producing a kept token.
``trim_tokenizer`` renumbers them 0..K-1 in teacher-id order and drops the other tokens and the
merges producing them: on the corpus it gives the teacher's tokens (renumbered), and any other
text still becomes kept tokens that decode to the same text (the alphabet is kept). ``trim_model``
keeps the same rows of the embedding and output head. ``vocab_map.json`` beside the student
records the map: student id ``i`` is teacher id ``teacher_ids[i]``.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from distillery.errors import DistilleryError
from distillery.files import atomic_write_text

VOCAB_MAP_FILE = "vocab_map.json"
_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_BATCH = 256  # documents encoded at a time


def _bpe_spec(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's backend as JSON; refuses, in one line, anything but a BPE model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistilleryError(
            f"vocabulary trimming needs a fast tokenizer (tokenizer.json); "
            f"this one is a slow {type(tokenizer).__name__}"
        )
    spec = json.loads(backend.to_str())
    kind = spec["model"].get("type")
    if kind != "BPE":
        raise DistilleryError(
            f"vocabulary trimming supports BPE tokenizers only; this tokenizer's model is "
            f"{kind}: prune without the vocab block"
        )
    return spec


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The merges as pairs (stored as ``[a, b]`` lists or ``"a b"`` strings)."""
    pairs = []
    for merge in model.get("merges", []):
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2:
            raise DistilleryError(f"cannot read the BPE merge {merge!r}: expected two tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def _merge_output(model: dict[str, Any], a: str, b: str) -> str:
    """The token a merge makes (the continuing-subword prefix of ``b`` dropped, as BPE does)."""
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix) :] if prefix and b.startswith(prefix) else b)


def _processor_ids(processor: dict[str, Any] | None) -> list[int]:
    """Token ids a post-processor adds (TemplateProcessing, Bert/Roberta, Sequence of them)."""
    if not processor:
        return []
    kind = processor.get("type")
    if kind == "Sequence":
        return [i for p in processor.get("processors", []) for i in _processor_ids(p)]
    if kind == "TemplateProcessing":
        return [int(i) for t in processor.get("special_tokens", {}).values() for i in t["ids"]]
    return [int(processor[k][1]) for k in ("sep", "cls") if k in processor]


def _remap_processor(processor: dict[str, Any] | None, new_id: dict[int, int]) -> Any:
    """``processor`` with every token id it adds renumbered."""
    if not processor:
        return processor
    out = copy.deepcopy(processor)
    kind = out.get("type")
    try:
        if kind == "Sequence":
            out["processors"] = [_remap_processor(p, new_id) for p in out["processors"]]
        elif kind == "TemplateProcessing":
            for token in out.get("special_tokens", {}).values():
                token["ids"] = [new_id[int(i)] for i in token["ids"]]
        else:
            for key in ("sep", "cls"):
                if key in out:
                    out[key] = [out[key][0], new_id[int(out[key][1])]]
    except KeyError as exc:
        raise DistilleryError(
            f"the tokenizer's post-processor adds token id {exc.args[0]}, which is not kept; "
            "keep every special token"
        ) from None
    return out


def _corpus_counts(spec: dict[str, Any], docs: Iterable[str]) -> Counter[int]:
    """How often each teacher token occurs in ``docs`` (no special tokens added, no truncation)."""
    encoder = Tokenizer.from_str(json.dumps(spec))
    encoder.no_truncation()
    encoder.no_padding()
    counts: Counter[int] = Counter()
    docs = list(docs)
    for start in range(0, len(docs), _BATCH):
        for enc in encoder.encode_batch(docs[start : start + _BATCH], add_special_tokens=False):
            counts.update(enc.ids)
    return counts


def _close(kept: set[int], makers: dict[int, list[tuple[int, int]]], new: Iterable[int]) -> None:
    """Add ``new`` to ``kept`` with both inputs of every merge making a kept token, recursively."""
    stack = [t for t in new if t not in kept]
    kept.update(stack)
    while stack:
        for pair in makers.get(stack.pop(), ()):
            for part in pair:
                if part not in kept:
                    kept.add(part)
                    stack.append(part)


def kept_tokens(
    tokenizer: Any, docs: Iterable[str], min_count: int = 1, *, multiple_of: int = 1
) -> list[int]:
    """Sorted teacher ids to keep: tokens the teacher's tokenizer makes ``min_count`` times or
    more of ``docs``, special and added tokens, the BPE base alphabet, closed under merges;
    then, while their number is not a multiple of ``multiple_of`` (matmuls over an output layer
    of such a size run faster), the most frequent other tokens (lowest id first on ties)."""
    if min_count < 1 or multiple_of < 1:
        raise DistilleryError(
            f"vocab.min_count and vocab.multiple_of must be at least 1, got {min_count}, "
            f"{multiple_of}"
        )
    spec = _bpe_spec(tokenizer)
    counts = _corpus_counts(spec, docs)
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    makers: dict[int, list[tuple[int, int]]] = {}  # output id → the (a, b) ids merged into it
    for a, b in _merge_pairs(model):
        out = vocab.get(_merge_output(model, a, b))
        if out is not None and a in vocab and b in vocab:
            makers.setdefault(out, []).append((vocab[a], vocab[b]))
    added = {int(t["id"]) for t in spec.get("added_tokens", [])}
    seeds = {t for t, c in counts.items() if c >= min_count} | added
    seeds |= {int(i) for i in tokenizer.all_special_ids}
    seeds |= set(_processor_ids(spec.get("post_processor")))
    if model.get("unk_token") in vocab:
        seeds.add(vocab[model["unk_token"]])
    seeds |= {i for i in vocab.values() if i not in makers}  # the base alphabet
    kept: set[int] = set()
    _close(kept, makers, seeds)
    others = sorted(set(vocab.values()) - kept, key=lambda t: (-counts[t], t))
    for token in others:
        if len(kept) % multiple_of == 0:
            break
        _close(kept, makers, [token])
    return sorted(kept)


def _new_ids(kept: Sequence[int], size: int) -> dict[int, int]:
    """teacher id → student id; ``kept`` must be strictly increasing ids below ``size``."""
    kept = [int(t) for t in kept]
    if not kept or any(b <= a for a, b in itertools.pairwise(kept)):
        raise DistilleryError("kept token ids must be a non-empty, strictly increasing list")
    if kept[0] < 0 or kept[-1] >= size:
        raise DistilleryError(f"kept token ids must lie in [0, {size}), got {kept[0]}..{kept[-1]}")
    return {t: i for i, t in enumerate(kept)}


def _special_kwargs(tokenizer: Any, kept_strings: set[str]) -> dict[str, Any]:
    """The special tokens, chat template and text settings the trimmed tokenizer carries over."""
    kwargs: dict[str, Any] = {}
    for role in _ROLES:
        token = getattr(tokenizer, f"{role}_token", None)
        kept_token = token is not None and str(token) in kept_strings
        kwargs[f"{role}_token"] = str(token) if kept_token else None
    extra = [str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []]
    if extra and isinstance(tokenizer.extra_special_tokens, list):
        kwargs["extra_special_tokens"] = [t for t in extra if t in kept_strings]
    for name in ("chat_template", "model_max_length", "padding_side", "truncation_side"):
        if getattr(tokenizer, name, None) is not None:
            kwargs[name] = getattr(tokenizer, name)
    kwargs["clean_up_tokenization_spaces"] = bool(
        getattr(tokenizer, "clean_up_tokenization_spaces", False)
    )
    return kwargs


def trim_tokenizer(tokenizer: Any, kept: Sequence[int]) -> PreTrainedTokenizerFast:
    """The teacher's BPE tokenizer keeping only ``kept`` (ids renumbered 0..K-1 in their order);
    ``kept`` must hold the base alphabet and be closed under merges (``kept_tokens`` is)."""
    spec = _bpe_spec(tokenizer)
    model = spec["model"]
    strings = {i: tok for tok, i in model["vocab"].items()}
    strings |= {int(t["id"]): t["content"] for t in spec.get("added_tokens", [])}
    new_id = _new_ids(kept, max(strings) + 1)
    model["vocab"] = {tok: new_id[i] for tok, i in model["vocab"].items() if i in new_id}
    merges = []
    for merge, (a, b) in zip(model.get("merges", []), _merge_pairs(model), strict=True):
        if _merge_output(model, a, b) in model["vocab"]:
            if a not in model["vocab"] or b not in model["vocab"]:
                raise DistilleryError(
                    f"kept tokens are not closed under BPE merges ({a!r} + {b!r}): "
                    "use kept_tokens to choose them"
                )
            merges.append(merge)
    model["merges"] = merges
    if model.get("unk_token") is not None and model["unk_token"] not in model["vocab"]:
        model["unk_token"] = None
    spec["added_tokens"] = [
        {**t, "id": new_id[int(t["id"])]} for t in spec.get("added_tokens", []) if t["id"] in new_id
    ]
    spec["post_processor"] = _remap_processor(spec.get("post_processor"), new_id)
    padding = spec.get("padding")
    if padding and padding.get("pad_id") is not None:
        padding["pad_id"] = new_id.get(int(padding["pad_id"]), 0)
    kept_strings = {strings[t] for t in new_id if t in strings}
    trimmed = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        **_special_kwargs(tokenizer, kept_strings),
    )
    expected = tokenizer.convert_ids_to_tokens([int(t) for t in kept])
    if len(trimmed) != len(new_id) or trimmed.convert_ids_to_tokens(range(len(new_id))) != expected:
        raise DistilleryError(
            "the trimmed tokenizer does not number the kept tokens in the teacher's order "
            "(added tokens outside the model vocabulary?): prune without the vocab block"
        )
    return trimmed


def _remap_token_ids(config: Any, new_id: dict[int, int]) -> None:
    """pad/bos/eos ids of a (generation) config renumbered; a dropped one becomes None."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, new_id.get(value))
        elif isinstance(value, list):
            ids = [new_id[v] for v in value if v in new_id]
            setattr(config, name, ids or None)


@torch.no_grad()
def trim_model(model: PreTrainedModel, kept: Sequence[int]) -> PreTrainedModel:
    """A copy of the causal LM ``model`` whose embedding (and untied output head) keep only the
    ``kept`` rows, in that order; tied weights stay tied; ``vocab_size`` and token ids follow."""
    emb = model.get_input_embeddings()
    new_id = _new_ids(kept, emb.weight.shape[0])
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    trimmed = copy.deepcopy(model)
    rows = torch.tensor([int(t) for t in kept], device=emb.weight.device)
    emb, head = trimmed.get_input_embeddings(), trimmed.get_output_embeddings()
    emb.weight = nn.Parameter(emb.weight.index_select(0, rows).clone())
    emb.num_embeddings = len(rows)
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = new_id.get(emb.padding_idx)
    if head is not None:
        head.weight = emb.weight if tied else nn.Parameter(head.weight.index_select(0, rows))
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.index_select(0, rows).clone())
        head.out_features = len(rows)
    for config in {id(c): c for c in (trimmed.config, trimmed.config.get_text_config())}.values():
        config.vocab_size = len(rows)
        _remap_token_ids(config, new_id)
    if getattr(trimmed, "generation_config", None) is not None:
        _remap_token_ids(trimmed.generation_config, new_id)
    for module in trimmed.modules():  # models that keep their own copy (e.g. for the loss)
        if isinstance(getattr(module, "vocab_size", None), int):
            module.vocab_size = len(rows)
    return trimmed


def save_vocab_map(folder: Path, kept: Sequence[int], teacher_vocab_size: int) -> Path:
    """Write ``vocab_map.json``: student id ``i`` is teacher id ``kept[i]``."""
    _new_ids(kept, teacher_vocab_size)
    path = Path(folder) / VOCAB_MAP_FILE
    payload = {"teacher_ids": [int(t) for t in kept], "teacher_vocab_size": teacher_vocab_size}
    atomic_write_text(path, json.dumps(payload, separators=(",", ":")) + "\n")  # one line
    return path


def read_vocab_map(folder: Path) -> tuple[list[int], int] | None:
    """(teacher ids, teacher vocabulary size) from ``folder/vocab_map.json``; None without one."""
    path = Path(folder) / VOCAB_MAP_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        kept, size = [int(t) for t in raw["teacher_ids"]], int(raw["teacher_vocab_size"])
        _new_ids(kept, size)
    except (OSError, ValueError, KeyError, TypeError, DistilleryError) as exc:
        raise DistilleryError(
            f"{path} is unreadable ({type(exc).__name__}): prune the student again"
        ) from None
    return kept, size


def load_vocab_map(folder: Path) -> list[int] | None:
    """The teacher id of each student token (``vocab_map.json``), or None for a full vocabulary."""
    found = read_vocab_map(folder)
    return None if found is None else found[0]
