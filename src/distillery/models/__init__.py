"""Models: presets from transformers configs, loading from local folders, layer surgery."""

from distillery.models.loading import (
    build_model,
    check_classes,
    check_fits_data,
    check_same_tokenizer,
    compute_params,
    folder_is_encoder,
    load_pretrained,
    num_params,
    spec_is_encoder,
    uses_encoder_layout,
)
from distillery.models.presets import PRESETS, is_encoder, preset_config
from distillery.models.surgery import decoder_layers, every_other, init_from_teacher

__all__ = [
    "PRESETS",
    "build_model",
    "check_classes",
    "check_fits_data",
    "check_same_tokenizer",
    "compute_params",
    "decoder_layers",
    "every_other",
    "folder_is_encoder",
    "init_from_teacher",
    "is_encoder",
    "load_pretrained",
    "num_params",
    "preset_config",
    "spec_is_encoder",
    "uses_encoder_layout",
]
