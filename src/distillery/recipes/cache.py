"""``distillery cache-teacher``: run a teacher once over the training blocks, keep its top-k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.config import CacheTeacherConfig
from distillery.data import has_tokenizer, load_tokenizer
from distillery.distributed import DistEnv, resolve_device
from distillery.models import check_fits_data, check_same_tokenizer, load_pretrained
from distillery.recipes.common import prepare_data
from distillery.teachers import LiveTeacher
from distillery.teachers.cache import build_teacher_cache, cache_key
from distillery.teachers.factory import lean_teacher


def cache_teacher(cfg: CacheTeacherConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the cache to ``cfg.out`` (atomically) and return its ``cache.json``."""
    device = resolve_device(cfg.device)
    model = load_pretrained(cfg.teacher, "teacher")
    tokenizer, train, _ = prepare_data(cfg.data, DistEnv(), cfg.teacher)
    if cfg.data.tokenizer is not None and has_tokenizer(cfg.teacher):
        check_same_tokenizer(load_tokenizer(cfg.teacher), tokenizer)
    check_fits_data(model, tokenizer, cfg.data.seq_len, "teacher")
    key = {
        **cache_key(Path(cfg.teacher), tokenizer, train),
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
    }
    step = max(1, train.num_blocks // 10)

    def progress(done: int, total: int) -> None:
        if done % step < cfg.batch_size or done == total:
            print(f"[cache-teacher] {done}/{total} blocks", flush=True)

    return build_teacher_cache(
        LiveTeacher(lean_teacher(model.to(device), cfg.precision, device)),
        train,
        Path(cfg.out),
        key=key,
        device=device,
        batch_size=cfg.batch_size,
        codec=cfg.codec,
        overwrite=overwrite,
        progress=progress,
    )
