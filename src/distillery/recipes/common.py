"""Steps shared by recipes: output folders, data preparation, exporting a model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from transformers import PreTrainedModel

from distillery.config import DataConfig
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
from distillery.engine.moments import MOMENTS_FILE
from distillery.errors import DistilleryError
from distillery.files import publish_folder, temp_folder_next_to

# What a run leaves; the first three are worth keeping (resumable or finished).
KEPT_ITEMS = ("checkpoints", "model", "summary.json")
DIVERGED = "diverged.txt"  # a run that diverged: its message (a tuning grid skips the point)
RUN_ITEMS = (
    *KEPT_ITEMS, "metrics.jsonl", "tensorboard", "report.html", MOMENTS_FILE, DIVERGED
)  # fmt: skip
T = TypeVar("T")


def prepare_out_dir(
    out: Path, *, resume: bool, overwrite: bool, resumable: bool = True, clear: bool = True
) -> None:
    """Make ``out`` ready: writable, never silently replacing a checkpointed or finished run.
    ``clear=False``: check only; the caller clears (``clear_out_dir``) once its own inputs have
    been checked, so a failed start leaves an earlier run as it was."""
    if out.exists() and not out.is_dir():
        raise DistilleryError(f"--out {out} is a file; give a folder")
    kept = [name for name in KEPT_ITEMS if (out / name).exists()]
    if kept and not resume and not overwrite:
        how = "use --resume to continue it, " if resumable and "checkpoints" in kept else "use "
        raise DistilleryError(
            f"--out {out} already holds a run ({', '.join(kept)}); {how}--overwrite to replace "
            "it, or another --out"
        )
    foreign = [n for n in RUN_ITEMS[3:] if (out / n).exists()]
    if foreign and not (out / "config.yaml").is_file() and not resume and not overwrite:
        raise DistilleryError(
            f"--out {out} holds {', '.join(foreign)} that no distillery run wrote there; a run "
            "would replace them: choose another --out, or --overwrite"
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
    if clear and not resume:
        clear_out_dir(out)


def clear_out_dir(out: Path) -> None:
    """A fresh start: remove what an earlier run or attempt left in ``out``."""
    for name in RUN_ITEMS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def check_inputs_outside(out: Path, inputs: list[Path | None]) -> None:
    """Refuse inputs (teacher, student, cache folders) that live in the parts of ``out`` a
    fresh start replaces."""
    replaced = [(out / name).resolve() for name in RUN_ITEMS]
    for given in inputs:
        if given is None:
            continue
        path = Path(given).resolve()
        if any(path == r or r in path.parents for r in replaced):
            raise DistilleryError(
                f"{given} is inside --out {out}, which this run replaces; copy it elsewhere or "
                "choose another --out"
            )


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


def _split(cfg: DataConfig) -> tuple[dict[str, Any], list[str]]:
    """The splits of the data (labelled pairs, or documents) and the texts a BPE trains on."""
    if cfg.task == "classify":
        labelled = split_labelled(
            load_labelled(cfg.source, cfg.text_field, cfg.label_field),
            cfg.val_fraction,
            cfg.test_fraction,
            cfg.transfer_fraction,
        )
        return labelled, [text for text, _ in labelled["train"]]
    parts = split_documents(
        load_documents(cfg.source, cfg.text_field),
        cfg.val_fraction,
        cfg.test_fraction,
        transfer_fraction=cfg.transfer_fraction,
    )
    return parts, parts["train"]


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
    masked-LM runs with a mask token added). ``"train"`` in ``splits`` is the split runs train
    on, ``cfg.train_split``: the held-out ``transfer`` split when it says so (the tokenizer and
    the classes still come from the training split proper).
    """
    classify = cfg.task == "classify"
    names = tuple(cfg.train_split if name == "train" else name for name in splits)

    def build() -> tuple[Any, Any]:
        parts, train_texts = _split(cfg)
        for name in names:
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
            for name in names
        )
    blocks = [PackedTokens(built, name, cfg.seq_len) for name in names]
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


def say_truncated(env: DistEnv, data: Any, seq_len: int) -> None:
    """Tell how many labelled training texts are cut to ``seq_len`` tokens."""
    if env.is_main and getattr(data, "classes", None) is not None and data.truncated:
        print(
            f"[distillery] {data.truncated} of {data.num_blocks} training texts are longer than "
            f"data.seq_len={seq_len} tokens: each is cut to its first tokens",
            flush=True,
        )
