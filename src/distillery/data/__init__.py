"""Corpora, tokenizers, packed token caches and labelled examples."""

from distillery.data.labelled import (
    Examples,
    LabelledExamples,
    class_names,
    encode_labelled,
    split_labelled,
)
from distillery.data.masking import MASK_TOKEN, MaskedBlocks, mask_tokens
from distillery.data.packed import (
    IGNORE_INDEX,
    PackedTokens,
    build_token_cache,
    global_batch_indices,
    sequential_batches,
    shift_labels,
)
from distillery.data.prompts import (
    PromptExamples,
    PromptRecord,
    bbc_news_prompt_splits,
    bbc_news_prompts,
    encode_prompts,
    load_prompt_records,
    render_chat,
    split_prompts,
)
from distillery.data.sources import (
    BBC_NEWS,
    bbc_news_labelled,
    bbc_news_root,
    load_documents,
    load_labelled,
    split_documents,
)
from distillery.data.tokenizer import (
    cached_bpe_tokenizer,
    has_tokenizer,
    load_tokenizer,
    special_layout,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

__all__ = [
    "BBC_NEWS",
    "IGNORE_INDEX",
    "MASK_TOKEN",
    "Examples",
    "LabelledExamples",
    "MaskedBlocks",
    "PackedTokens",
    "PromptExamples",
    "PromptRecord",
    "bbc_news_labelled",
    "bbc_news_prompt_splits",
    "bbc_news_prompts",
    "bbc_news_root",
    "build_token_cache",
    "cached_bpe_tokenizer",
    "class_names",
    "encode_labelled",
    "encode_prompts",
    "global_batch_indices",
    "has_tokenizer",
    "load_documents",
    "load_labelled",
    "load_prompt_records",
    "load_tokenizer",
    "mask_tokens",
    "render_chat",
    "sequential_batches",
    "shift_labels",
    "special_layout",
    "split_documents",
    "split_labelled",
    "split_prompts",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]
