"""``distillery generate``: a model folder completes prompt data into JSONL shards — the data of
sequence-level KD (Kim & Rush 2016: the student trains on the teacher's own outputs).

Protocol: config → tokenizer and prompts → model → for each missing shard, seeded sampling →
the shard written atomically. Each line holds ``prompt``, ``completion`` (the model's),
``reference`` (the data's completion), ``index`` and ``generator`` (sha256 of the model
folder's config and weights). Row i is seeded by (seed, 0, i), so a shard's text does not
depend on the batch size or on which shards were made before; an interrupted run keeps its
finished shards and redoes the rest. The folder (or any shard) is prompt/completion data for a
later run: ``--data OUT data.task=prompts``.

Also here: ``prepare_prompts``, the prompt data of ``data.task: prompts`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from distillery.config import DataConfig, Strict
from distillery.data import (
    BBC_NEWS,
    PromptExamples,
    bbc_news_prompt_splits,
    cached_bpe_tokenizer,
    encode_prompts,
    load_prompt_records,
    load_tokenizer,
    split_prompts,
)
from distillery.distributed import DistEnv, resolve_device
from distillery.errors import DistilleryError
from distillery.files import atomic_write_text, write_json
from distillery.models import compute_params, load_pretrained
from distillery.models.generation import Sampling, row_generator, sample
from distillery.recipes.common import once_per_job
from distillery.teachers.cache import model_fingerprint

MANIFEST = "generate.json"


def prepare_prompts(
    cfg: DataConfig,
    env: DistEnv,
    tokenizer_dir: Path | None = None,
    splits: tuple[str, ...] = ("train", "val"),
    *,
    need_completion: bool = True,
) -> tuple[Any, ...]:
    """(tokenizer, one ``PromptExamples`` per split) for ``data.task: prompts``. The tokenizer
    is ``cfg.tokenizer``, else ``tokenizer_dir``'s, else a BPE trained on the training split
    (for bbc-news the same articles, so the same BPE, as a ``task: lm`` run's)."""

    def build() -> tuple[Any, dict[str, list[Any]]]:
        folder = cfg.tokenizer or tokenizer_dir
        tokenizer = load_tokenizer(Path(folder)) if folder is not None else None
        if cfg.source == BBC_NEWS:
            parts = bbc_news_prompt_splits(
                cfg.val_fraction, cfg.test_fraction, cfg.completion_chars
            )
        else:
            records = load_prompt_records(
                cfg.source,
                tokenizer,
                prompt_field=cfg.prompt_field,
                completion_field=cfg.completion_field,
                messages_field=cfg.messages_field,
                need_completion=need_completion,
            )
            parts = split_prompts(records, cfg.val_fraction, cfg.test_fraction)
        for name in splits:
            if not parts[name]:
                raise DistilleryError(
                    f"prompt data {cfg.source}: the {name} split is empty; raise "
                    f"data.{name}_fraction or give more records"
                )
        if tokenizer is None:
            if cfg.source == BBC_NEWS:
                from distillery.data import bbc_news_labelled, split_documents

                texts = split_documents(
                    [t for t, _ in bbc_news_labelled()], cfg.val_fraction, cfg.test_fraction
                )["train"]
            else:
                texts = [r.prompt + r.completion for r in parts["train"]]
            tokenizer, _ = cached_bpe_tokenizer(texts, cfg.vocab_size, cfg.cache_dir)
        return tokenizer, parts

    tokenizer, parts = once_per_job(env, build)  # type: ignore[misc]
    data = [
        encode_prompts(
            parts[name], tokenizer, cfg.seq_len, prompt_tokens=cfg.prompt_tokens, name=name
        )
        for name in splits
    ]
    return tokenizer, *data


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the tokenizer's eos and the model's own."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)


def complete(
    model: Any,
    tokenizer: Any,
    data: PromptExamples,
    indices: list[int],
    sampling: Sampling,
    seed: int,
    *,
    step: int = 0,
) -> list[list[int]]:
    """The new tokens of rows ``indices`` of ``data``, row i seeded by (seed, step, i)."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    prompts = data.prompt_ids(indices)
    return sample(
        model,
        prompts,
        sampling,
        [row_generator(seed, step, i, device) for i in indices],
        pad_token_id=tokenizer.pad_token_id,
        stop_ids=stop_ids(model, tokenizer),
        vocab=len(tokenizer),
        max_new=[limit - len(p) for p in prompts],
    )


def completion_text(tokenizer: Any, tokens: list[int], stops: list[int]) -> str:
    """The text of new tokens, a final stop token dropped."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


class GenerateConfig(Strict):
    """``distillery generate``: ``teacher`` (a model folder) completes the ``split`` of the
    prompt data (``data``, read as ``task: prompts``) into shards of ``shard_size`` lines."""

    teacher: Path
    data: DataConfig = Field(default_factory=lambda: DataConfig(task="prompts"))
    split: Literal["train", "val", "test"] = "train"
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, gt=0)
    seed: int = Field(0, ge=0, lt=2**63)
    batch_size: int = Field(16, gt=0)
    shard_size: int = Field(256, gt=0)
    limit: int | None = Field(None, gt=0)  # only the first N prompts of the split
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: Path = Path("runs/generated")


def _key(cfg: GenerateConfig, fingerprint: str, data: PromptExamples) -> dict[str, Any]:
    """What decides the shards: any change makes a finished shard stale."""
    return {
        "generator": fingerprint,
        "data": data.identity,
        "sampling": [cfg.temperature, cfg.top_p, cfg.max_new_tokens],
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "rows": data.num_blocks if cfg.limit is None else min(cfg.limit, data.num_blocks),
    }


def _check_out(out: Path, key: dict[str, Any], overwrite: bool) -> None:
    """Shards made with another key are replaced only with ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise DistilleryError(f"--out {out} is a file; give a folder")
    manifest = out / MANIFEST
    if not manifest.is_file():
        if out.is_dir() and any(out.glob("shard-*.jsonl")) and not overwrite:
            raise DistilleryError(f"--out {out} holds shards without {MANIFEST}: use --overwrite")
        return
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        saved = None
    if saved != key and not overwrite:
        raise DistilleryError(
            f"--out {out} holds generations made with other settings, model or data; "
            "use --overwrite to replace them, or another --out"
        )


def generate(cfg: GenerateConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the missing shards of ``cfg.out``; returns the manifest."""
    out = Path(cfg.out)
    env = DistEnv()
    tokenizer, data = prepare_prompts(
        cfg.data.model_copy(update={"task": "prompts"}), env, cfg.teacher, (cfg.split,),
        need_completion=False,
    )  # fmt: skip
    key = _key(cfg, model_fingerprint(cfg.teacher), data)
    _check_out(out, key, overwrite)
    device = resolve_device(cfg.device)
    model = load_pretrained(cfg.teacher, "teacher", "lm").to(device)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    stops = stop_ids(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and (out / MANIFEST).is_file():
        saved = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("key")
        if saved != key:
            for old in out.glob("shard-*.jsonl"):
                old.unlink()
    manifest = {"key": key, "teacher": str(cfg.teacher), "split": cfg.split, "shards": []}
    write_json(out / MANIFEST, manifest)
    rows, made, tokens = key["rows"], 0, 0
    for start in range(0, rows, cfg.shard_size):
        shard = out / f"shard-{start // cfg.shard_size:05d}.jsonl"
        manifest["shards"].append(shard.name)
        if shard.is_file():  # written atomically: it exists only when complete
            continue
        lines = []
        indices = list(range(start, min(start + cfg.shard_size, rows)))
        for b in range(0, len(indices), cfg.batch_size):
            batch = indices[b : b + cfg.batch_size]
            new = complete(model, tokenizer, data, batch, sampling, cfg.seed)
            tokens += sum(
                int(data.prompt_lengths[i]) + len(t) for i, t in zip(batch, new, strict=True)
            )
            for i, sampled in zip(batch, new, strict=True):
                record = data.records[i]
                lines.append(json.dumps({
                    "prompt": record.prompt,
                    "completion": completion_text(tokenizer, sampled, stops),
                    "reference": record.completion,
                    "index": i,
                    "new_tokens": len(sampled),
                    "generator": key["generator"],
                }, ensure_ascii=False))  # fmt: skip
        atomic_write_text(shard, "\n".join(lines) + "\n")
        made += 1
        print(f"[generate] {shard.name}: {len(lines)} completions", flush=True)
    per_token = 2.0 * compute_params(model)  # the prompt's forward and each sampled token
    total = sum(int(n) for n in data.prompt_lengths[:rows]) + sum(
        json.loads(line)["new_tokens"]
        for name in manifest["shards"]
        for line in (out / name).read_text(encoding="utf-8").splitlines()
        if line
    )
    manifest |= {"rows": rows, "made_now": made, "tokens_now": tokens,
                 "flops_now": per_token * tokens, "tokens": total,
                 "flops": per_token * total}  # fmt: skip
    write_json(out / MANIFEST, manifest)
    return manifest
