"""Corpora, tokenizers and packed token caches."""

from distillery.data.packed import (
    PackedTokens,
    build_token_cache,
    global_batch_indices,
    sequential_batches,
)
from distillery.data.sources import (
    BBC_NEWS,
    bbc_news_labelled,
    bbc_news_root,
    load_documents,
    split_documents,
)
from distillery.data.tokenizer import (
    cached_bpe_tokenizer,
    has_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

__all__ = [
    "BBC_NEWS",
    "PackedTokens",
    "bbc_news_labelled",
    "bbc_news_root",
    "build_token_cache",
    "cached_bpe_tokenizer",
    "global_batch_indices",
    "has_tokenizer",
    "load_documents",
    "load_tokenizer",
    "sequential_batches",
    "split_documents",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]
