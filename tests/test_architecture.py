"""The package's layering, checked from its source: imports point down only, and files and
functions stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "distillery"

# Lower layers first. A module may import its own package or any package on a lower layer;
# packages on the same layer may not import each other.
LAYERS = [
    {"errors", "files", "interrupt", "__init__"},
    {"data", "distributed"},
    {"objectives"},
    {"models"},
    {"config"},
    {"parallel"},  # sharding plans (FSDP2) for student and teacher
    {"teachers"},
    {"step", "pool"},
    {"engine", "eval"},
    {"api"},  # the drop-in distillation loss for users' own loops
    {"integrations"},  # transformers.Trainer and other outside loops
    {"report"},
    {"recipes"},
    {"cli"},
    {"__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def _package(module: str) -> str:
    """``distillery.a.b`` → ``a`` (the top-level part of the package it belongs to)."""
    return module.split(".")[1] if "." in module else "__init__"


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        found.append((".".join(p for p in parts if p != "__init__"), path))
    return found


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n for n in names if n == "distillery" or n.startswith("distillery.")]


def test_every_package_has_a_layer():
    packages = {_package(m) for m, _ in _modules()}
    assert packages <= set(LEVEL), sorted(packages - set(LEVEL))


def test_imports_point_down_only():
    upward = []
    for module, path in _modules():
        mine = _package(module)
        for imported in _imports(path):
            theirs = _package(imported)
            if theirs != mine and LEVEL[theirs] >= LEVEL[mine]:
                upward.append(f"{module} → {imported}")
    assert not upward, upward


@pytest.mark.parametrize("leaf", ["objectives"])
def test_objectives_are_a_leaf(leaf: str):
    """Objectives import nothing of teachers, models, step, engine or recipes."""
    allowed = {"errors", "data", leaf}
    for module, path in _modules():
        if _package(module) == leaf:
            assert {_package(i) for i in _imports(path)} <= allowed, module


def test_the_checker_sees_an_upward_import(tmp_path: Path):
    """The walk above would catch an edge such as objectives → teachers."""
    bad = tmp_path / "bad.py"
    bad.write_text("from distillery.teachers import LiveTeacher\nimport distillery.engine\n")
    edges = [_package(i) for i in _imports(bad)]
    assert edges == ["teachers", "engine"]
    assert all(LEVEL[e] > LEVEL["objectives"] for e in edges)


def test_files_and_functions_are_small():
    long_files, long_functions = [], []
    for module, path in _modules():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(module)
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:  # type: ignore[union-attr,operator]
                long_functions.append(f"{module}.{node.name}")  # type: ignore[union-attr]
    assert not long_files, long_files
    assert not long_functions, long_functions
