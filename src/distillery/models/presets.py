"""Built-in presets. Decoders: Llama-style configs (RMSNorm, RoPE, SwiGLU, SDPA attention).
Encoders (``bert-*``): BERT configs (post-norm, learned positions, GELU, dropout 0.1) for masked
LM and classification.

Decoder sizes with a 32k vocabulary: tiny ≈ 2M (tests), mini ≈ 11M, small ≈ 42M, 125m ≈ 110M,
350m ≈ 340M; ``bert-base`` is BERT-base's shape (110M at BERT's 30k vocabulary). The vocabulary
size always comes from the tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distillery.errors import DistilleryError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4),
    "mini": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4
    ),
    "small": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8
    ),
    "125m": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12
    ),
    "350m": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16
    ),
    # Encoders (BERT): the names of Turc et al.'s compact BERTs where the shapes agree.
    "bert-tiny": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    ),
    "bert-mini": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
    ),
    "bert-small": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8
    ),
    "bert-medium": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8
    ),
    "bert-base": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
}


def is_encoder(name: str) -> bool:
    """Whether preset ``name`` is a bidirectional encoder (masked LM / classifier)."""
    return name.startswith("bert-")


def preset_config(
    name: str, vocab_size: int, overrides: dict[str, Any] | None = None, **special: int | None
) -> PretrainedConfig:
    """A ``LlamaConfig`` (or ``BertConfig`` for ``bert-*``) for preset ``name`` sized to
    ``vocab_size``, with ``overrides`` applied.

    ``special`` carries the tokenizer's ``pad_token_id``/``bos_token_id``/``eos_token_id``.
    """
    from transformers import BertConfig, LlamaConfig

    if name not in PRESETS:
        raise DistilleryError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    if is_encoder(name):
        family: type[PretrainedConfig] = BertConfig
        fields: dict[str, Any] = dict(
            PRESETS[name],
            vocab_size=vocab_size,
            max_position_embeddings=512,
            type_vocab_size=2,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            initializer_range=0.02,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    else:
        family = LlamaConfig
        fields = dict(
            PRESETS[name],
            vocab_size=vocab_size,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            initializer_range=0.02,
            attn_implementation="sdpa",
        )
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    defaults = family()
    for key, value in (overrides or {}).items():
        if key == "vocab_size" or not hasattr(defaults, key):
            raise DistilleryError(f"model.overrides.{key}: not a field a preset can change")
        fields[key] = value
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    bad = [k for k in sizes if not isinstance(fields[k], int) or fields[k] <= 0]
    if bad:
        raise DistilleryError(f"model.overrides: {', '.join(bad)} must be positive integers")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise DistilleryError(
            f"model: hidden_size {fields['hidden_size']} is not divisible by "
            f"num_attention_heads {fields['num_attention_heads']}"
        )
    heads = fields["num_attention_heads"]
    kv = fields.get("num_key_value_heads", heads)
    if isinstance(kv, int) and (kv <= 0 or heads % kv):
        raise DistilleryError(
            f"model.overrides: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv}"
        )
    fields.update({k: v for k, v in special.items() if v is not None})
    try:  # transformers checks many fields itself (RoPE, ranges): its message, one line
        return family(**fields)
    except Exception as exc:
        lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
        raise DistilleryError(f"model.overrides: {(lines or [type(exc).__name__])[-1]}") from None
