"""Steps shared by recipes: output folders, data preparation, exporting a model."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml
from transformers import PreTrainedModel

from distillery.config import DataConfig, RunConfig
from distillery.data import (
    MASK_TOKEN,
    MaskedBlocks,
    PackedTokens,
    build_token_cache,
    cached_bpe_tokenizer,
    class_names,
    encode_labelled,
    load_documents,
    load_labelled,
    load_tokenizer,
    split_documents,
    split_labelled,
)
from distillery.distributed import DistEnv
from distillery.engine import list_checkpoints
from distillery.errors import DistilleryError
from distillery.files import atomic_write_text, publish_folder, temp_folder_next_to, write_json

# What a run leaves; the first three are worth keeping (resumable or finished).
KEPT_ITEMS = ("checkpoints", "model", "summary.json")
RUN_ITEMS = (*KEPT_ITEMS, "metrics.jsonl", "tensorboard")
T = TypeVar("T")


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool, resumable: bool = True) -> None:
    """Make ``out`` ready: writable, never silently replacing a checkpointed or finished run."""
    if out.exists() and not out.is_dir():
        raise DistilleryError(f"--out {out} is a file; give a folder")
    kept = [name for name in KEPT_ITEMS if (out / name).exists()]
    if kept and not resume and not overwrite:
        how = "use --resume to continue it, " if resumable and "checkpoints" in kept else "use "
        raise DistilleryError(
            f"--out {out} already holds a run ({', '.join(kept)}); {how}--overwrite to replace "
            "it, or another --out"
        )
    if resume and not list_checkpoints(out):
        raise DistilleryError(
            f"--resume: no checkpoint in {out / 'checkpoints'}; start again without --resume "
            "(with --overwrite if the folder holds an unfinished run)"
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
    if not resume:  # a fresh start: clear what an earlier attempt left
        for name in RUN_ITEMS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def once_per_job(env: DistEnv, fn: Callable[[], T], *, everyone: bool = True) -> T | None:
    """Run ``fn`` on rank 0 first; the other ranks then run it too (hitting its caches) if
    ``everyone``, or skip it. If rank 0 fails, every rank stops with one clear line."""
    if not env.active:
        return fn()
    if env.is_main:
        try:
            result = fn()
        except BaseException:
            dist.broadcast_object_list([False], src=0)
            raise
        dist.broadcast_object_list([True], src=0)
        return result
    flag: list[Any] = [None]
    dist.broadcast_object_list(flag, src=0)
    if not flag[0]:
        raise DistilleryError(f"rank {env.rank}: stopping because rank 0 failed (see its error)")
    return fn() if everyone else None


def prepare_data(
    cfg: DataConfig,
    env: DistEnv,
    tokenizer_dir: Path | None = None,
    splits: tuple[str, ...] = ("train", "val"),
    *,
    encoder: bool = False,
    seed: int = 0,
) -> tuple[Any, ...]:
    """Texts → split → tokenizer → examples; returns (tokenizer, one dataset per split).

    ``task: lm``: documents packed into a token cache on disk (``PackedTokens``);
    ``task: mlm``: the same blocks with BERT's dynamic masking (``MaskedBlocks``; the training
    split's masks follow ``seed``, the others' are fixed so every run is scored on the same
    masked tokens); ``task: classify``: labelled texts, each cut to ``seq_len`` tokens
    (``LabelledExamples``, laid out for an ``encoder`` or a decoder; the classes are the
    training split's labels). The tokenizer is ``cfg.tokenizer``, else ``tokenizer_dir`` (the
    teacher's), else a byte-level BPE trained on the training split and cached by content (for
    masked-LM runs with a mask token added).
    """
    classify = cfg.task == "classify"

    def build() -> tuple[Any, Any]:
        if classify:
            labelled = split_labelled(
                load_labelled(cfg.source, cfg.text_field, cfg.label_field),
                cfg.val_fraction,
                cfg.test_fraction,
            )
            parts: dict[str, Any] = labelled
            train_texts = [text for text, _ in labelled["train"]]
        else:
            parts = split_documents(
                load_documents(cfg.source, cfg.text_field), cfg.val_fraction, cfg.test_fraction
            )
            train_texts = parts["train"]
        for name in splits:
            if not parts[name]:
                raise DistilleryError(
                    f"data {cfg.source}: the {name} split is empty; raise data.{name}_fraction "
                    "or give more documents"
                )
        source = cfg.tokenizer or tokenizer_dir
        try:
            if source is not None:
                tokenizer = load_tokenizer(Path(source))
            else:
                tokenizer, _ = cached_bpe_tokenizer(train_texts, cfg.vocab_size, cfg.cache_dir)
                if cfg.task == "mlm":
                    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
            if classify:
                return tokenizer, parts
            return tokenizer, build_token_cache(parts, tokenizer, cfg.cache_dir)
        except OSError as exc:
            raise DistilleryError(
                f"cannot write the token cache under data.cache_dir={cfg.cache_dir} "
                f"({exc.strerror or exc}); give a writable folder"
            ) from None

    tokenizer, built = once_per_job(env, build)  # type: ignore[misc]
    if classify:
        classes = class_names(built["train"])
        return tokenizer, *(
            encode_labelled(built[name], tokenizer, cfg.seq_len, classes, name, encoder=encoder)
            for name in splits
        )
    blocks = [PackedTokens(built, name, cfg.seq_len) for name in splits]
    if cfg.task == "mlm":
        blocks = [  # type: ignore[misc]
            MaskedBlocks(
                data,
                mask_id=tokenizer.mask_token_id,
                vocab_size=len(tokenizer),
                special_ids=tokenizer.all_special_ids,
                probability=cfg.mask_probability,
                seed=seed if name == "train" else 0,
            )
            for name, data in zip(splits, blocks, strict=True)
        ]
    return tokenizer, *blocks


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


def run_or_reuse(cfg: RunConfig, name: str, *, reuse: bool = True) -> tuple[dict[str, Any], bool]:
    """(summary, reused): ``run(cfg)``, unless ``cfg.out`` holds a finished run of exactly this
    config. The summary is read back from disk, so every rank of a torchrun job has it."""
    from distillery.recipes.run import run  # run builds on this module

    out = Path(cfg.out)
    saved, summary = out / "config.yaml", out / "summary.json"

    def finished() -> dict[str, Any] | None:
        if not summary.is_file():
            return None
        result = json.loads(summary.read_text(encoding="utf-8"))
        return result if result.get("finished") else None

    same = False
    if saved.is_file():  # read back through today's config: fields added since take defaults
        try:
            same = (
                RunConfig.model_validate(yaml.safe_load(saved.read_text(encoding="utf-8"))) == cfg
            )
        except (ValueError, yaml.YAMLError):
            same = False
    if reuse and same and (result := finished()):
        if is_main_process():
            print(f"[distillery] {name}: finished before, reusing {out}", flush=True)
        return result, True
    run(cfg, overwrite=True, name=name)
    result = finished()
    if result is None:
        raise DistilleryError(f"{name}: the run in {out} did not finish")
    return result, False


def write_study(
    name: str,
    result: dict[str, Any],
    table: str,
    folders: list[Path | None],
    plot: Callable[[Path], None] | None = None,
) -> None:
    """A study's ``NAME.json`` and ``NAME.md`` (and its ``plot``) into each folder given; the
    table printed. Only the main process writes."""
    if not is_main_process():
        return
    for folder in [Path(f) for f in folders if f is not None]:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{name}.json", result)
        atomic_write_text(folder / f"{name}.md", table)
        if plot is not None:
            plot(folder)
    print(table)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def hardware() -> str:
    """A short name of the machine for result folders and tables."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def against_spread(gap: float, stds: list[float], seeds: int, digits: int = 1) -> str:
    """Whether ``gap`` is larger than twice the larger seed std, in words."""
    if seeds < 2:
        return "one seed only, so no seed spread to compare it with"
    spread = max(stds)
    size = "larger" if abs(gap) > 2 * spread else "not larger"
    return f"{size} than twice the larger seed std ({spread:.{digits}f})"
