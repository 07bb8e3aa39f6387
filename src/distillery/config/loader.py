"""Reading configs: YAML files (``safe_load``) plus ``key=value`` overrides, merged, then
validated into a schema; every problem gathered into one error line that names the fields, e.g.
``invalid config: train.lrr: unknown field; train.steps: must be > 0``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from distillery.errors import DistilleryError

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def _check_paths(value: Any, field: str) -> None:
    """Paths with a NUL byte or longer than the system allows are refused here, not by the
    first ``open`` deep inside a run."""
    if isinstance(value, list | tuple):
        for item in value:
            _check_paths(item, field)
    elif isinstance(value, Path):
        text = str(value)
        if "\x00" in text:
            raise ValueError(f"{field}: the path contains a NUL byte")
        if len(text) > MAX_PATH_CHARS or any(len(p) > 255 for p in value.parts):
            raise ValueError(f"{field}: the path is longer than the system allows")


class Strict(BaseModel):
    """Base for every config section: unknown keys are rejected; paths are checked."""

    # No NaN or infinity in any float field (a budget of .inf, a weight decay of .inf).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _sane_paths(self) -> Strict:
        for name in type(self).model_fields:
            _check_paths(getattr(self, name), name)
        return self


C = TypeVar("C", bound=BaseModel)


def format_validation_error(err: ValidationError) -> str:
    """All problems of a pydantic error on one line, each naming its dotted field."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], YAML-parsed value)."""
    if "=" not in item:
        raise DistilleryError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise DistilleryError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def deep_merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep-merge ``update`` into ``tree`` (mappings merge, everything else replaces)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_merge(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)


MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is not a config


class _StrictLoader(yaml.SafeLoader):
    """``safe_load`` that refuses a key given twice in one mapping (YAML would keep the last,
    silently replacing a whole section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (safe, duplicate keys refused), or one clear error."""
    if not path.is_file():
        raise DistilleryError(f"config file {path} not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise DistilleryError(f"config file {path} is larger than 1 MiB: not a config")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except (UnicodeDecodeError, OSError) as exc:
        raise DistilleryError(f"config file {path} cannot be read as UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        problem = getattr(exc, "problem", None)
        why = f": {problem}" if problem and "duplicate key" in problem else ""
        raise DistilleryError(f"config file {path}{where} is not valid YAML{why}") from None
    except (RecursionError, ValueError) as exc:  # absurd nesting; a 4,300-digit integer
        what = "nested too deeply" if isinstance(exc, RecursionError) else "a value is too large"
        raise DistilleryError(f"config file {path}: {what}") from None
    if data is None:
        raise DistilleryError(f"config file {path} is empty: give a mapping of fields")
    if not isinstance(data, dict):
        raise DistilleryError(f"config file {path} must hold a mapping of fields")
    return data


def build_config(
    cls: type[C],
    path: Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> C:
    """Merge ``base`` ← YAML file ← overrides, then validate into ``cls``."""
    tree: dict[str, Any] = {}
    deep_merge(tree, base or {})
    if path is not None:
        deep_merge(tree, load_yaml(path))
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_path(tree, keys, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise DistilleryError(format_validation_error(err)) from None


def config_to_yaml(cfg: BaseModel) -> str:
    """The config as YAML, paths as strings, so a run folder records what it ran."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
