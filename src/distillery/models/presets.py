"""Built-in decoder presets: Llama-style configs (RMSNorm, RoPE, SwiGLU, SDPA attention).

Sizes with a 32k vocabulary: tiny ≈ 2M (tests), mini ≈ 11M, small ≈ 42M, 125m ≈ 110M,
350m ≈ 340M. The vocabulary size always comes from the tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distillery.errors import DistilleryError

if TYPE_CHECKING:
    from transformers import LlamaConfig

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
}


def preset_config(
    name: str, vocab_size: int, overrides: dict[str, Any] | None = None, **special: int | None
) -> LlamaConfig:
    """A ``LlamaConfig`` for preset ``name`` sized to ``vocab_size``, with ``overrides`` applied.

    ``special`` carries the tokenizer's ``pad_token_id``/``bos_token_id``/``eos_token_id``.
    """
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise DistilleryError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields: dict[str, Any] = dict(
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
    defaults = LlamaConfig()
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
    fields.update({k: v for k, v in special.items() if v is not None})
    return LlamaConfig(**fields)
