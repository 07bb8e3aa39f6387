"""Steps shared by recipes: output folders, data preparation, exporting a model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import PreTrainedModel

from distillery.config import DataConfig
from distillery.data import (
    PackedTokens,
    build_token_cache,
    cached_bpe_tokenizer,
    load_documents,
    load_tokenizer,
    split_documents,
)
from distillery.distributed import DistEnv
from distillery.errors import DistilleryError
from distillery.files import publish_folder, temp_folder_next_to

RUN_ITEMS = ("checkpoints", "model", "metrics.jsonl", "summary.json", "tensorboard")


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready: writable, and never silently reusing a finished run."""
    if out.exists() and not out.is_dir():
        raise DistilleryError(f"--out {out} is a file; give a folder")
    existing = [name for name in RUN_ITEMS if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise DistilleryError(
            f"--out {out} already holds a run ({', '.join(existing)}); use --resume to continue "
            "it, --overwrite to replace it, or another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise DistilleryError(
            f"cannot write to --out {out} ({exc.strerror or exc}); choose a writable folder"
        ) from None
    if overwrite and not resume:
        for name in existing:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def _once_per_job(env: DistEnv, fn: Any) -> Any:
    """Run ``fn`` on rank 0 first, then on the others (which then hit its caches)."""
    if env.active and not env.is_main:
        dist.barrier()
    result = fn()
    if env.active and env.is_main:
        dist.barrier()
    return result


def prepare_data(
    cfg: DataConfig, env: DistEnv, tokenizer_dir: Path | None = None
) -> tuple[Any, PackedTokens, PackedTokens]:
    """Documents → split → tokenizer → packed token cache; returns (tokenizer, train, val).

    The tokenizer is ``cfg.tokenizer``, else ``tokenizer_dir`` (the teacher's), else a byte-level
    BPE trained on the training split and cached by content.
    """

    def build() -> tuple[Any, Path]:
        docs = load_documents(cfg.source, cfg.text_field)
        splits = split_documents(docs, cfg.val_fraction, cfg.test_fraction)
        if not splits["val"]:
            raise DistilleryError(
                f"data {cfg.source}: the validation split is empty; raise data.val_fraction "
                "or give more documents"
            )
        source = cfg.tokenizer or tokenizer_dir
        if source is not None:
            tokenizer = load_tokenizer(Path(source))
        else:
            tokenizer, _ = cached_bpe_tokenizer(splits["train"], cfg.vocab_size, cfg.cache_dir)
        return tokenizer, build_token_cache(splits, tokenizer, cfg.cache_dir)

    tokenizer, folder = _once_per_job(env, build)
    return (
        tokenizer,
        PackedTokens(folder, "train", cfg.seq_len),
        PackedTokens(folder, "val", cfg.seq_len),
    )


def export_model(model: PreTrainedModel, tokenizer: Any, dest: Path) -> Path:
    """``save_pretrained`` (safetensors + config + tokenizer), published atomically at ``dest``."""
    tmp = temp_folder_next_to(dest)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, dest, replace=True)
    return dest
