"""Tests for distillery.data: sources, splits, BPE tokenizers, token caches, batch order."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from distillery.data import (
    BBC_NEWS,
    PackedTokens,
    bbc_news_labelled,
    bbc_news_root,
    build_token_cache,
    cached_bpe_tokenizer,
    global_batch_indices,
    load_documents,
    load_tokenizer,
    sequential_batches,
    split_documents,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from distillery.errors import DistilleryError

NON_ASCII = "Café naïve — £5, 日本語 “quotes” and émojis 🙂!"


@pytest.fixture(scope="module")
def bbc() -> list[str]:
    return load_documents(BBC_NEWS)


@pytest.fixture(scope="module")
def small_docs(bbc: list[str]) -> list[str]:
    return bbc[::20]  # ~110 articles spread over every label


@pytest.fixture(scope="module")
def bpe(small_docs: list[str], tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tok") / "bpe512"
    return train_bpe_tokenizer(small_docs, 512, folder), folder


# --- sources -------------------------------------------------------------------------------


def test_bbc_news_corpus(bbc: list[str]) -> None:
    labelled = bbc_news_labelled()
    assert len(labelled) == 2225
    counts = Counter(label for _, label in labelled)
    assert set(counts) == {"business", "entertainment", "politics", "sport", "tech"}
    assert counts["sport"] == 511
    assert all(text and text == text.strip() for text, _ in labelled)
    assert bbc == [text for text, _ in labelled]
    # the one cp1252 article is decoded, not dropped or mangled
    raw = (bbc_news_root() / "sports" / "199.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert (raw.decode("cp1252").strip(), "sport") in labelled
    assert "£" in raw.decode("cp1252")


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [{"text": "first doc"}, {"text": "  second doc \n"}, {"text": "   "}, {"body": "x"}]
    path.write_text("\n".join(json.dumps(o) for o in lines[:3]) + "\n\n", encoding="utf-8")
    assert load_documents(path) == ["first doc", "second doc"]
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"body": "café"}) + "\n", encoding="utf-8")
    assert load_documents(other, text_field="body") == ["café"]


def test_jsonl_errors_name_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DistilleryError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_documents(path)
    path.write_text('{"text": "ok"}\n{"body": "x", "id": 1}\n', encoding="utf-8")
    with pytest.raises(
        DistilleryError, match=r"line 2: no field 'text' \(keys present: body, id\)"
    ):
        load_documents(path)
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DistilleryError, match="line 1: field 'text' must be a string"):
        load_documents(path)


def test_load_csv(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('id,text\n1,"a, quoted\nmultiline doc"\n2,\n3,last\n', encoding="utf-8")
    assert load_documents(path) == ["a, quoted\nmultiline doc", "last"]
    with pytest.raises(DistilleryError, match=r"no column 'body' \(columns available: id, text\)"):
        load_documents(path, text_field="body")


def test_load_text_folder_and_file(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "z.txt").write_text("nested doc\n", encoding="utf-8")
    (folder / "a.md").write_text("# markdown\n\nsame doc", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "ignored.json").write_text("{}", encoding="utf-8")
    assert load_documents(folder) == ["# markdown\n\nsame doc", "nested doc"]

    file = tmp_path / "c.txt"
    file.write_text("one\nstill one\n\n\n  \ntwo\r\n\r\nthree\n", encoding="utf-8")
    assert load_documents(file) == ["one\nstill one", "two", "three"]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DistilleryError, match=r"data source '.*nope' not found: give 'bbc-news'"):
        load_documents(tmp_path / "nope")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DistilleryError, match=r"unsupported type '\.parquet'.*\.jsonl"):
        load_documents(tmp_path / "x.parquet")
    (tmp_path / "blank.txt").write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(DistilleryError, match=r"corpus at '.*blank\.txt' is empty"):
        load_documents(tmp_path / "blank.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DistilleryError, match="is empty"):
        load_documents(tmp_path / "emptydir")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DistilleryError, match="not valid UTF-8"):
        load_documents(tmp_path / "latin.txt")


# --- splits --------------------------------------------------------------------------------


def test_split_bbc_deterministic_and_order_independent(bbc: list[str]) -> None:
    splits = split_documents(bbc, 0.05, 0.05)
    assert splits == split_documents(bbc, 0.05, 0.05)
    shuffled = list(bbc)
    random.Random(0).shuffle(shuffled)
    again = split_documents(shuffled, 0.05, 0.05)
    for name in ("train", "val", "test"):
        assert Counter(again[name]) == Counter(splits[name])
    sets = {name: set(docs) for name, docs in splits.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"])
    assert not sets["val"] & sets["test"]
    assert sum(len(v) for v in splits.values()) == len(bbc)
    for name in ("val", "test"):
        assert 0.03 < len(splits[name]) / len(bbc) < 0.07
    # input order is kept within a split
    chosen = set(splits["val"])
    assert splits["val"] == [doc for doc in bbc if doc in chosen]
    # a different salt gives a different split
    assert split_documents(bbc, 0.05, 0.05, salt="x")["val"] != splits["val"]


def test_split_duplicates_and_small_corpora() -> None:
    docs = [f"doc {i}" for i in range(200)] * 2
    splits = split_documents(docs, 0.1, 0.1)
    for part in splits.values():
        assert all(Counter(part)[d] == 2 for d in part)  # both copies land together
    tiny = split_documents(["a", "b", "c"], 0.05, 0.05)
    assert [len(tiny[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    assert split_documents(["a", "b", "c"], 0.0, 0.0) == {
        "train": ["a", "b", "c"],
        "val": [],
        "test": [],
    }
    with pytest.raises(DistilleryError, match="must be below 1"):
        split_documents(docs, 0.6, 0.5)


# --- tokenizers ----------------------------------------------------------------------------


def test_bpe_trains_round_trips_and_loads(bpe, small_docs: list[str]) -> None:
    tokenizer, folder = bpe
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    texts = [small_docs[0], "Hello , world . It's  spaced\n\n out ? ", NON_ASCII]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer(small_docs[0])["input_ids"]) < 0.7 * len(small_docs[0].encode())
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded(NON_ASCII)["input_ids"] == tokenizer(NON_ASCII)["input_ids"]
    assert reloaded.decode(reloaded(texts[1])["input_ids"]) == texts[1]
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DistilleryError, match="vocab_size 100 is too small"):
        train_bpe_tokenizer(["some text"], 100, tmp_path / "t")
    with pytest.raises(DistilleryError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistilleryError, match="has no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_cached_bpe_tokenizer_reuses_folder(small_docs: list[str], tmp_path: Path) -> None:
    docs = small_docs[:30]
    tok1, folder1 = cached_bpe_tokenizer(docs, 400, tmp_path)
    mtime = (folder1 / "tokenizer.json").stat().st_mtime_ns
    tok2, folder2 = cached_bpe_tokenizer(docs, 400, tmp_path)
    assert folder2 == folder1 and folder1.parent == tmp_path / "tokenizers"
    assert (folder1 / "tokenizer.json").stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok1)
    _, folder3 = cached_bpe_tokenizer(docs, 420, tmp_path)
    assert folder3 != folder1
    tok4, folder4 = cached_bpe_tokenizer(docs[:20], 400, tmp_path)
    assert folder4 != folder1 and tokenizer_fingerprint(tok4) != tokenizer_fingerprint(tok1)


# --- token caches and blocks ---------------------------------------------------------------


def test_token_cache_stream_and_reuse(bpe, small_docs: list[str], tmp_path: Path) -> None:
    tokenizer, _ = bpe
    splits = {"train": small_docs[:40], "val": [*small_docs[40:45], NON_ASCII]}
    folder = build_token_cache(splits, tokenizer, tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    assert meta["documents"] == {"train": 40, "val": 6}
    assert meta["tokenizer"] == tokenizer_fingerprint(tokenizer)

    eos = tokenizer.eos_token_id
    for name, docs in splits.items():
        stream = np.fromfile(folder / f"{name}.bin", dtype=np.uint16)
        assert stream.size == meta["tokens"][name]
        assert stream[-1] == eos and int((stream == eos).sum()) == len(docs)
        cuts = np.flatnonzero(stream == eos)
        pieces = np.split(stream, cuts + 1)[:-1]
        assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == docs

    mtime = (folder / "train.bin").stat().st_mtime_ns
    assert build_token_cache(splits, tokenizer, tmp_path) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "tokens").iterdir())) == 1

    other, _ = cached_bpe_tokenizer(small_docs[:30], 400, tmp_path)
    assert build_token_cache(splits, other, tmp_path) != folder
    changed = {"train": splits["train"], "val": splits["val"][:-1]}
    assert build_token_cache(changed, tokenizer, tmp_path) != folder


def test_packed_tokens_blocks(bpe, small_docs: list[str], tmp_path: Path) -> None:
    tokenizer, _ = bpe
    folder = build_token_cache({"train": small_docs[:40], "val": ["tiny"]}, tokenizer, tmp_path)
    stream = np.fromfile(folder / "train.bin", dtype=np.uint16).astype(np.int64)
    data = PackedTokens(folder, "train", 64)
    assert data.seq_len == 64 and data.vocab_size == 512
    assert data.num_tokens == stream.size and data.num_blocks == stream.size // 64
    batch = data.blocks([3, 0, data.num_blocks - 1])
    assert batch.dtype == torch.long and batch.shape == (3, 64)
    assert torch.equal(batch[0], torch.from_numpy(stream[3 * 64 : 4 * 64]))
    assert torch.equal(batch[2], torch.from_numpy(stream[(data.num_blocks - 1) * 64 :][:64]))
    assert data.blocks(np.array([], dtype=np.int64)).shape == (0, 64)
    with pytest.raises(IndexError):
        data.blocks([data.num_blocks])

    batches = list(sequential_batches(data, 8))
    assert [b.shape[0] for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert torch.equal(torch.cat(batches), data.blocks(range(data.num_blocks)))
    assert len(list(sequential_batches(data, 8, max_batches=2))) == 2

    with pytest.raises(DistilleryError, match=r"split 'val' has \d+ tokens, fewer than seq_len=64"):
        PackedTokens(folder, "val", 64)
    with pytest.raises(DistilleryError, match="no split 'test'"):
        PackedTokens(folder, "test", 64)
    with pytest.raises(DistilleryError, match="missing or corrupt"):
        PackedTokens(tmp_path / "nowhere", "train", 64)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(DistilleryError, match="missing or corrupt"):
        PackedTokens(folder, "train", 64)


# --- batch order ---------------------------------------------------------------------------


def test_global_batch_indices() -> None:
    n, bs = 10, 4
    first = [global_batch_indices(n, s, bs, seed=7) for s in range(10)]
    assert all(np.array_equal(a, global_batch_indices(n, s, bs, 7)) for s, a in enumerate(first))
    flat = np.concatenate(first)  # 40 positions = exactly 4 epochs
    for e in range(4):
        epoch = flat[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))
        assert np.array_equal(epoch, np.random.default_rng([7, e]).permutation(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # a fresh order each epoch
    # step 2 covers positions 8..11: the end of epoch 0 and the start of epoch 1
    perm0, perm1 = (np.random.default_rng([7, e]).permutation(n) for e in (0, 1))
    assert first[2].tolist() == [*perm0[8:], *perm1[:2]]
    other = np.concatenate([global_batch_indices(n, s, bs, seed=8) for s in range(3)])
    assert not np.array_equal(other, flat[:12])
    # a batch larger than an epoch wraps through several permutations
    big = global_batch_indices(3, 0, 7, seed=1)
    assert sorted(big[:3].tolist()) == sorted(big[3:6].tolist()) == [0, 1, 2]
    assert big.dtype == np.int64


# --- the tokenizer's special-token convention in blocks ------------------------------------


def test_lab_bpe_blocks_and_cache_key_are_unchanged(bpe, small_docs: list[str], tmp_path: Path):
    """A tokenizer that adds no special tokens keeps its cache key (the formula written out
    again here) and plain blocks of the stream."""
    import hashlib

    from distillery.data.tokenizer import special_layout

    tokenizer, _ = bpe
    assert special_layout(tokenizer) == ([], [])
    splits = {"train": small_docs[:5]}
    digest = hashlib.sha256(f"distillery-tokens-v1\0{tokenizer_fingerprint(tokenizer)}".encode())
    digest.update(b"\0split\0train\0" + b"5\0")
    for doc in splits["train"]:
        digest.update(len(doc.encode()).to_bytes(8, "little") + doc.encode())
    folder = build_token_cache(splits, tokenizer, tmp_path)
    assert folder.name == digest.hexdigest()
    assert "prefix" not in json.loads((folder / "meta.json").read_text())


def test_blocks_start_with_bos_when_the_tokenizer_adds_one(small_docs: list[str], tmp_path):
    """A Llama-style tokenizer (it adds a BOS to every text) gets every block starting with
    that BOS: a teacher scored on packed blocks without it would see text it never saw."""
    from distillery.config import DataConfig
    from distillery.distributed import DistEnv
    from distillery.recipes.common import prepare_data
    from tests.test_families import family_tokenizer

    tokenizer = family_tokenizer("llama", small_docs)
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos  # what the convention is read from
    splits = {"train": small_docs[:20]}
    folder = build_token_cache(splits, tokenizer, tmp_path)
    stream = np.fromfile(folder / "train.bin", dtype=np.uint16).astype(np.int64)
    assert (stream == bos).sum() == 0  # the stream on disk is the same as without it
    data = PackedTokens(folder, "train", 16)
    assert data.num_blocks == stream.size // 15
    blocks = data.blocks(range(data.num_blocks))
    assert (blocks[:, 0] == bos).all()
    assert torch.equal(blocks[3, 1:], torch.from_numpy(stream[45:60]))
    _, labels = data.examples([3])
    assert labels[0, 0] == stream[45] and labels[0, -1] == -100  # BOS predicts the first token
    # Without the template the same vocabulary gives another cache with plain blocks.
    tokenizer.backend_tokenizer.post_processor = None
    plain = build_token_cache(splits, tokenizer, tmp_path)
    assert plain != folder and (PackedTokens(plain, "train", 16).blocks([0])[0, 0] != bos)

    # Through a run's data preparation with the teacher's tokenizer folder.
    tokenizer = family_tokenizer("llama", small_docs)
    tokenizer.save_pretrained(tmp_path / "teacher")
    source = tmp_path / "docs.txt"
    source.write_text("\n\n".join(small_docs[:30]), encoding="utf-8")
    cfg = DataConfig(source=str(source), seq_len=24, cache_dir=tmp_path / "cache")
    _, train, val = prepare_data(cfg, DistEnv(), tmp_path / "teacher")
    for data in (train, val):
        assert (data.blocks(range(data.num_blocks))[:, 0] == bos).all()


def test_encoder_blocks_are_framed_and_never_masked(small_docs: list[str], tmp_path: Path):
    """BERT's tokenizer puts [CLS] before and [SEP] after a text: so does every block; the
    masked-LM data never masks them, and a causal label never predicts the [SEP]."""
    from distillery.data import MaskedBlocks, encode_labelled
    from tests.test_families import family_tokenizer

    tokenizer = family_tokenizer("bert", small_docs)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    folder = build_token_cache({"train": small_docs[:20]}, tokenizer, tmp_path)
    data = PackedTokens(folder, "train", 12)
    stream = np.fromfile(folder / "train.bin", dtype=np.uint16).astype(np.int64)
    blocks = data.blocks(range(data.num_blocks))
    assert data.num_blocks == stream.size // 10
    assert (blocks[:, 0] == cls).all() and (blocks[:, -1] == sep).all()
    assert torch.equal(blocks[2, 1:-1], torch.from_numpy(stream[20:30]))
    _, labels = data.examples([2])
    assert labels[0, -2:].tolist() == [-100, -100] and labels[0, -3] == stream[29]
    masked = MaskedBlocks(
        data, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
        special_ids=tokenizer.all_special_ids, probability=0.9,
    )  # fmt: skip
    inputs, labels = masked.examples(range(data.num_blocks))
    assert (inputs[:, 0] == cls).all() and (inputs[:, -1] == sep).all()
    assert (labels[:, [0, -1]] == -100).all() and (labels != -100).float().mean() > 0.5

    llama = family_tokenizer("llama", small_docs)  # a decoder classifier: bos + tokens + eos
    llama.pad_token = llama.eos_token
    rows = encode_labelled([("Hello there", "a"), ("Bye", "b")], llama, 8, ["a", "b"])
    bye = llama("Bye", add_special_tokens=False)["input_ids"]
    assert (rows.ids[:, 0] == llama.bos_token_id).all()
    assert rows.ids[1, : len(bye) + 2].tolist() == [llama.bos_token_id, *bye, llama.eos_token_id]
